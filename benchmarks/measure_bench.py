"""Where a measured experiment's seconds go, timed on the CPU: the parts of `harness.gpu.measure` that run
without CUDA.

The GPU window of 2026-11-30 spent 6.0 s per experiment (median; workload 4.2 s, build 0.1 s) and its
records count ~50,000 tracked ops each. On models this small a GPU step is bound by Python, not by
kernels, so the CPU shows the same per-op costs: the workload alone, under the category tracker
tracking every op (`track_window: all`), and tracking only the last step (`track_window: last`); the
tracker's replay after the workload; and the per-experiment bookkeeping of the worker (the prediction,
the environment fingerprint, writing the record).

    python benchmarks/measure_bench.py              # JSON lines, one per part
    python benchmarks/measure_bench.py --repeat 5   # the median of 5 runs of each

Seconds are CPU seconds of this process (`time.process_time`, one torch thread): on a shared machine wall time
mostly measures the neighbours.

A model of Qwen2.5-0.5B's depth (24 layers, GQA) with tiny widths keeps the op count of the real one
while the arithmetic costs nothing.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEEP_TINY = {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 24, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 176, "vocab_size": 1000,
             "max_position_embeddings": 4096, "tie_word_embeddings": True}
CASES = {  # name: (spec fields, steps)
    "inference-g16": (dict(mode="inference", batch=1, seq=64, gen=16), 2),
    "inference-g64": (dict(mode="inference", batch=1, seq=64, gen=64), 2),
    "train-full": (dict(mode="train", method="full", precision="pure", dtype="fp32", batch=2, seq=64), 2),
    "train-lora": (dict(mode="train", method="lora", dtype="fp32", batch=2, seq=64), 2),
}


def _spec(path, fields):
    from formulas.catalog import get_shape
    from formulas.spec import Spec, validate

    return validate(Spec(model=path, **fields), get_shape(path))


def _workload(model, spec, steps, mark):
    from harness.workload.steps import run_inference, run_training

    if spec.mode == "inference":
        run_inference(model, spec, mark=mark, device="cpu")
    else:
        run_training(model, spec, mark=mark, device="cpu", steps=steps)


def time_case(path, name, window):
    """Seconds of the workload (None: untracked), ops tracked, and the replay's seconds."""
    import torch

    from formulas.catalog import get_shape
    from harness.gpu.build import build_on_device
    from harness.tracing.tracker import CategoryTracker

    fields, steps = CASES[name]
    spec = _spec(path, fields)
    torch.manual_seed(0)
    model = build_on_device(spec, device="cpu")
    if window is None:
        t0 = time.process_time()
        _workload(model, spec, steps, lambda phase: None)
        return {"workload_s": time.process_time() - t0, "ops": 0, "replay_s": 0.0}
    tracker = CategoryTracker(model, spec, get_shape(path).vocab, device_type="cpu", window=window)
    t0 = time.process_time()
    with tracker:
        _workload(model, spec, steps, tracker.mark)
    t1 = time.process_time()
    mem = tracker.result(timeline=False, reserved=False)
    t2 = time.process_time()
    return {"workload_s": t1 - t0, "ops": mem.n_ops, "replay_s": t2 - t1,
            "peak_allocated_bytes": mem.peak_allocated_bytes, "peak_phase": mem.peak_phase}


def time_bookkeeping(path):
    """The worker's own seconds per experiment: new_record (the prediction), fingerprint, write_record."""
    from harness.env import fingerprint
    from harness.records import new_record, write_record
    from harness.sweep.schema import expand_sweep

    (exp,) = expand_sweep({"defaults": {"model": path, **CASES["train-lora"][0]}}, "bench.yaml")
    out = {}
    t0 = time.perf_counter()
    rec = new_record(exp, "measured")
    out["new_record_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rec["env"] = fingerprint()
    out["fingerprint_s"] = time.perf_counter() - t0
    rec["measured"] = {"sampler": {"timeline": [[i / 1000, "forward", 10**9 + i] for i in range(2000)]}}
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        write_record(d, rec)
        out["write_record_s"] = time.perf_counter() - t0
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--case", choices=sorted(CASES), action="append")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "deep_tiny.json")
        with open(path, "w") as f:
            json.dump(DEEP_TINY, f)
        time_case(path, "train-lora", "all")  # warm-up: imports, first-call caches
        for name in a.case or CASES:
            runs = {w: [time_case(path, name, w) for _ in range(a.repeat)] for w in (None, "all", "last")}
            med = {w: {k: statistics.median(r[k] for r in rs) for k in ("workload_s", "ops", "replay_s")}
                   for w, rs in runs.items()}
            base = med[None]["workload_s"]
            row = {"case": name, "untracked_workload_s": round(base, 4)}
            for w in ("all", "last"):
                m = med[w]
                row[w] = {"workload_s": round(m["workload_s"], 4), "ops": int(m["ops"]),
                          "replay_s": round(m["replay_s"], 4),
                          "us_per_op": round((m["workload_s"] - base) / m["ops"] * 1e6, 1) if m["ops"] else None,
                          "peak_allocated_bytes": runs[w][0]["peak_allocated_bytes"],
                          "peak_phase": runs[w][0]["peak_phase"]}
            print(json.dumps(row), flush=True)
        print(json.dumps({"bookkeeping": {k: round(v, 4) for k, v in time_bookkeeping(path).items()}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
