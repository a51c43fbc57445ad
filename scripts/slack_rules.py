"""Where the slack rules of formulas/overhead.py come from: traced workloads replayed through the allocator simulation.

    python scripts/slack_rules.py generate --out results/allocator/slack_dataset.json   # trace the grid (slow)
    python scripts/slack_rules.py fit results/allocator/slack_dataset.json              # the rules' constants

`generate` traces a grid of float specs on fake tensors (no GPU), replays each allocation stream through
formulas/allocator.py under torch's default settings and under expandable_segments:True, and keeps per phase
the simulated allocated and reserved peaks beside the formula's figures for the same spec (its allocated
peak, transient bytes, KV cache, gradients). `fit` derives the rules' constants from those simulated
figures only (the formula's figures are computed again at fit time, so the dataset stays valid as the
formulas change) — no GPU record is used, so scoring the rules on GPU records is scoring them on data they
never saw.
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MiB = 2**20
CONFIGS = {"default": "", "expandable": "expandable_segments:True"}

INFERENCE_MODELS = ("Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.2-1B", "Qwen/Qwen3-1.7B", "EleutherAI/pythia-410m",
                    "facebook/opt-350m")
TRAIN_MODELS = ("Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.2-1B", "EleutherAI/pythia-410m")
# The torch whose kernel choices the grid was traced with (fp32 attention over grouped heads: the math kernel
# before 2.14), pinned so that the fit's formula figures stay those of the traced stream as the newest moves.
STACK = (("torch", "2.13.0"),)


def grid():
    """The specs traced, inference and training interleaved: inference prefill + decode at three batch and prompt
    sizes in bf16 and fp32; training (full, LoRA; with and without checkpointing) at two sizes."""
    from formulas.spec import Spec

    inference = [Spec(model=m, dtype=dtype, batch=batch, seq=seq, gen=8, stack=STACK)
                 for m in INFERENCE_MODELS for dtype in ("bf16", "fp32")
                 for batch, seq in ((1, 256), (1, 2048), (8, 2048))]
    train = [Spec(model=m, mode="train", method=method, dtype="bf16", precision="pure", grad_ckpt=ckpt, batch=batch,
                  seq=seq, stack=STACK)
             for m in TRAIN_MODELS for method in ("full", "lora") for ckpt in (False, True)
             for batch, seq in ((1, 512), (4, 1024))]
    out = []
    for i in range(max(len(inference), len(train))):
        out += inference[i:i + 1] + train[i:i + 1]
    return out


def _grid_key(d):
    """What tells the grid's specs apart (a row's or a Spec's fields): the resume key, stable when Spec gains fields."""
    return tuple(d[k] for k in ("model", "mode", "method", "dtype", "batch", "seq", "grad_ckpt"))


def features(spec):
    """The formula's figures for a spec: per phase its allocated bytes, transient bytes, KV cache and gradients."""
    from formulas import categories as C
    from formulas.overhead import DEFAULT_OVERHEADS
    from formulas.predict import predict

    p = predict(spec)
    ov = DEFAULT_OVERHEADS
    out = {}
    for ph, bd in p.phases.items():
        out[ph] = {"allocated": sum(bd.values()), "transient": ov.transient(bd), "kv": bd.get(C.KV_CACHE, 0),
                   "gradients": bd.get(C.GRADIENTS, 0), "activations": bd.get(C.ACTIVATIONS, 0)}
    return {"phases": out, "peak_phase": p.peak_phase, "peak_allocated": p.peak_allocated_bytes}


def generate(out_path, limit=None):
    from formulas.allocator import CachingAllocatorModel, parse_alloc_conf
    from harness.tracing.tracer import trace

    rows = []
    if os.path.exists(out_path):
        with open(out_path, encoding="utf-8") as f:
            rows = json.load(f)["rows"]
    done = {_grid_key(r) for r in rows}
    for spec in grid()[:limit]:
        key = json.dumps(spec.to_dict(), sort_keys=True)
        if _grid_key(vars(spec)) in done:
            continue
        t0 = time.perf_counter()
        try:
            res = trace(spec, keep_stream=True)
        except Exception as e:  # a spec this transformers cannot build on fake tensors: said, not fatal
            print(f"skipped {spec.model} {spec.mode}: {type(e).__name__}: {e}", flush=True)
            continue
        sims = {}
        for name, text in CONFIGS.items():
            sim = CachingAllocatorModel(parse_alloc_conf(text))
            for ev in res.stream:
                if ev[0] == "malloc":
                    sim.malloc(ev[1], ev[2])
                elif ev[0] == "free":
                    sim.free(ev[1])
                else:
                    sim.mark(ev[1])
            sims[name] = {ph: dict(v) for ph, v in sim.stats.phases.items()}
        rows.append({"spec": key, "model": spec.model, "mode": spec.mode, "method": spec.method, "dtype": spec.dtype,
                     "batch": spec.batch, "seq": spec.seq, "grad_ckpt": spec.grad_ckpt, "simulated": sims,
                     "formula": features(spec), "seconds": round(time.perf_counter() - t0, 1)})
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        tmp = out_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"about": __doc__.splitlines()[0], "rows": rows}, f)
        os.replace(tmp, out_path)
        print(f"{len(rows)} {spec.model} {spec.mode} {spec.method} {spec.dtype} b{spec.batch} s{spec.seq} "
              f"ckpt={spec.grad_ckpt} [{rows[-1]['seconds']} s]", flush=True)
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--out", default=os.path.join(ROOT, "results", "allocator", "slack_dataset.json"))
    g.add_argument("--limit", type=int, default=None)
    f = sub.add_parser("fit")
    f.add_argument("dataset")
    a = ap.parse_args(argv)
    if a.cmd == "generate":
        return generate(a.out, a.limit)
    with open(a.dataset, encoding="utf-8") as fh:
        rows = json.load(fh)["rows"]
    fitted = fit(rows)
    print(json.dumps(fitted, indent=1))
    return 0


def fit(rows):
    """{config: {mode: share}}: per row, the share of the peak phase's transient bytes that makes the formula's
    reserved peak (its allocated peak + the weights' load slack + share × transient) equal the simulated one; the
    median over rows of a mode. Also the error that leaves, per row, on the simulated reserved peak."""
    import statistics

    from formulas.allocator import parse_alloc_conf
    from formulas.catalog import get_shape
    from formulas.overhead import load_slack_bytes
    from harness.analysis.repredict import spec_of

    out = {}
    for config, text in CONFIGS.items():
        cfg = parse_alloc_conf(text) if text else None
        ratios, cache = {}, {}
        for r in rows:
            f = features(spec_of({"spec": json.loads(r["spec"])}))  # the formulas as they are now
            pk = f["phases"][f["peak_phase"]]
            sim = r["simulated"][config]
            reserved = max(v["max_reserved_bytes"] for v in sim.values())
            key = (r["model"], r["dtype"])
            if key not in cache:
                cache[key] = load_slack_bytes(get_shape(r["model"]), r["dtype"], config=cfg)
            if pk["transient"] > 0:
                share = (reserved - f["peak_allocated"] - cache[key]) / pk["transient"]
                ratios.setdefault(r["mode"], []).append((share, f, reserved, cache[key]))
        out[config] = {}
        for mode, items in sorted(ratios.items()):
            share = max(statistics.median(x[0] for x in items), 0.0)
            errs = sorted(abs((f["peak_allocated"] + load + share * f["phases"][f["peak_phase"]]["transient"]) / res - 1)
                          for _, f, res, load in items)
            out[config][mode] = {"share": round(share, 4), "n": len(items),
                                 "median_abs_error_on_simulated_reserved": round(statistics.median(errs), 4),
                                 "worst": round(errs[-1], 4)}
    return out


if __name__ == "__main__":
    sys.exit(main())
