"""How many device seconds each step of scripts/gpu_calibration.sh should take, from the H200 window's records.

    python3 scripts/window_estimate.py                  # both kinds' lists, step by step
    python3 scripts/window_estimate.py --tracker-share 0.6

An estimate, not a measurement: it prices every experiment a step would run, with what the records of the
first window (results/runs/*/nvidia-h200-580.159.04) say and three assumptions, each printed with the result:

- a dispatched op cost `per_op_us` end to end in the warm mode (the median of workload_s / tracked ops over
  those records), of which `tracker_share` was the category tracker's (benchmarks/measure_bench.py on a CPU:
  the tracker's µs per op over the tracked workload's); counting only the last steps leaves the rest;
- ops per experiment: the record's own count where the H200 measured the same experiment, else ops per decoder
  layer per forward (inference) or per layer per training step, taken from those records, times the layers and
  forwards or steps;
- compute: 2 FLOPs per active parameter and token (inference), 6 (training; 8 with checkpointing) at
  `tflops` (bitsandbytes weights at a third of it);
- a worker start (imports, CUDA, the first model class) as the first experiments of the H200's processes paid
  it, and one more per paged 8-bit optimizer (its state outlives the experiment: a fresh process follows);
- a boundary search: `probes` probes at vramlab plan's answer.
"""

import argparse
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from formulas.catalog import get_shape  # noqa: E402
from harness.records import iter_records  # noqa: E402
from harness.sweep.schema import load_sweep  # noqa: E402

H200 = "nvidia-h200-580.159.04"
BNB = ("nf4", "fp4", "int8")


def calibrate(runs):
    """(µs per op, ops per layer-forward in inference, ops per layer-step in training, worker start s, build s)
    from the H200 records."""
    recs = [r for r in iter_records(runs) if r.get("outcome") == "ok" and r.get("source") == "measured"
            and ((r.get("env") or {}).get("gpu") or {}).get("name") == "NVIDIA H200"]
    warm = [r for r in recs if (r["measured"].get("process") or {}).get("experiment_in_process", 1) > 1]
    per_op = statistics.median(r["timings"]["workload_s"] / r["measured"]["tracked"]["n_ops"] for r in warm)
    inf = [r["measured"]["tracked"]["n_ops"] / ((r["spec"]["gen"] + 1) * get_shape(r["spec"]["model"]).n_layers)
           for r in recs if r["spec"]["mode"] == "inference"]
    train = [r["measured"]["tracked"]["n_ops"] / (r["steps"] * get_shape(r["spec"]["model"]).n_layers)
             for r in recs if r["spec"]["mode"] == "train"]
    first = [r["timings"]["total_s"] - r["timings"]["workload_s"] for r in recs
             if (r["measured"].get("process") or {}).get("experiment_in_process") == 1]
    build = statistics.median(r["timings"]["build_s"] for r in warm)
    ops = {r["spec_hash"]: r["measured"]["tracked"]["n_ops"] for r in recs}
    return per_op, statistics.median(inf), statistics.median(train), statistics.median(first), build, ops


def experiment_seconds(exp, a, cal):
    """One warm experiment's seconds: untracked ops, counted ops, compute, build, replay and bookkeeping."""
    per_op, inf_ops, train_ops, _, build, known = cal
    s = exp.spec
    shape = get_shape(s.model)
    layers = shape.n_layers
    if s.mode == "inference":
        ops = known.get(exp.spec_hash) or inf_ops * layers * (s.gen + 1)
        counted = ops * min(1.0, 3 / (s.gen + 1))  # the prefill and the last two decode steps
        flops = 2 * shape.n_active_params() * s.batch * (s.seq + s.gen)
    else:
        ops = known.get(exp.spec_hash) or train_ops * layers * exp.steps * s.grad_accum
        counted = ops / exp.steps  # the last optimizer step
        flops = (8 if s.grad_ckpt else 6) * shape.n_active_params() * s.batch * s.seq * exp.steps * s.grad_accum
    tflops = a.tflops / (3 if s.dtype in BNB or s.method == "qlora" else 1)
    us = per_op * 1e6
    seconds = ops * us * (1 - a.tracker_share) / 1e6 + counted * us * a.tracker_share / 1e6
    seconds += flops / (tflops * 1e12) + build * (3 if s.dtype in BNB or s.method == "qlora" else 1)
    seconds += counted * a.replay_us / 1e6 + a.bookkeeping_s
    return seconds


def step_seconds(path, a, cal, only_alloc, env_has, starts=1):
    """(experiments, probes, seconds, [seconds per experiment]) of one `vramlab run` step over what this
    environment has not recorded."""
    _, exps = load_sweep(os.path.join(ROOT, path))
    todo = [e for e in exps if bool(e.alloc_conf) == only_alloc and e.spec_hash not in env_has]
    probes = [s for s in exps.searches if bool(s.base.alloc_conf) == only_alloc]
    each = [experiment_seconds(e, a, cal) for e in todo]
    for s in probes:
        each += [experiment_seconds(s.probe(min(max(s.predicted() or s.lo, s.lo), s.hi)), a, cal)] * a.probes
    seconds = cal[3] * starts + sum(each) + cal[3] * sum(1 for e in todo if e.spec.optimizer == "paged_adamw8bit")
    return len(todo), len(probes) * a.probes, seconds, each


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default=os.path.join(ROOT, "results", "runs"))
    ap.add_argument("--tracker-share", type=float, default=0.7,
                    help="share of a tracked op's cost that is the tracker's (benchmarks/measure_bench.py, CPU "
                         "seconds: 63-78 %% across its cases)")
    ap.add_argument("--replay-us", type=float, default=2.5,
                    help="tracker replay per counted op, µs (1.2 on the CPU box, where the old replay took 5.1; the "
                         "H200's host took ~10 for the old one)")
    ap.add_argument("--bookkeeping-s", type=float, default=0.15, help="prediction, fingerprint, record per experiment")
    ap.add_argument("--tflops", type=float, default=300.0, help="effective bf16 TFLOP/s of a small-batch workload")
    ap.add_argument("--probes", type=int, default=3, help="probes per boundary search")
    a = ap.parse_args()
    cal = calibrate(a.runs)
    print(f"from the H200 records: {cal[0] * 1e6:.0f} µs per tracked op (warm, median), {cal[1]:.0f} ops per layer "
          f"and forward, {cal[2]:.0f} per layer and training step, worker start {cal[3]:.1f} s, build {cal[4]:.2f} s")
    print(f"assumed: tracker share {a.tracker_share:.0%}, replay {a.replay_us:.1f} µs per counted op, bookkeeping "
          f"{a.bookkeeping_s:.2f} s, {a.tflops:.0f} TFLOP/s (bitsandbytes a third), {a.probes} probes per search")
    h200 = {r["spec_hash"] for sweep in ("smoke", "reference") for r in
            iter_records(os.path.join(a.runs, sweep, H200)) if r.get("outcome") in ("ok", "oom")}
    lists = {
        "nvidia-h200 (resume)": [("reference", "experiments/reference.yaml", False, h200),
                                 ("rtx4090", "experiments/rtx4090.yaml", False, set()),
                                 ("reference-expandable", "experiments/reference.yaml", True, set()),
                                 ("rtx4090-expandable", "experiments/rtx4090.yaml", True, set())],
        "nvidia-h100-x1 (new)": [("smoke", "experiments/smoke.yaml", False, set()),
                                 ("reference", "experiments/reference.yaml", False, set()),
                                 ("rtx4090", "experiments/rtx4090.yaml", False, set()),
                                 ("reference-expandable", "experiments/reference.yaml", True, set()),
                                 ("rtx4090-expandable", "experiments/rtx4090.yaml", True, set())],
    }
    for kind, steps in lists.items():
        total, every = 0, []
        print(f"\n{kind}:")
        for name, path, twins, has in steps:
            n, probes, seconds, each = step_seconds(path, a, cal, twins, has)
            total += seconds
            every += each
            print(f"  {name:<22} {n:>4} experiments {probes:>3} probes  ~{seconds:5.0f} s   (cumulative ~{total:.0f} s)")
        print(f"  a warm experiment: median ~{statistics.median(every):.2f} s, p90 "
              f"~{sorted(every)[int(0.9 * len(every))]:.2f} s (worker starts apart)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
