"""Time tracing on fake tensors, each case in its own process (wall seconds, peak RSS).

Bars: Llama-3.1-8B training step (batch 1, seq 2048, bf16 pure, full, AdamW) ≤ 60 s and
≤ 4 GiB RSS; Llama-3.1-70B inference prefill of 2048 tokens ≤ 120 s.

    python benchmarks/trace_bench.py            # both cases
    python benchmarks/trace_bench.py --case 8b-train
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from formulas.spec import Spec  # noqa: E402
from formulas.units import GiB  # noqa: E402

CASES = {
    "8b-train": (Spec(model="Llama-3.1-8B", mode="train", batch=1, seq=2048, dtype="bf16", precision="pure",
                      method="full", optimizer="adamw"), 60.0, 4 * GiB),
    "70b-prefill": (Spec(model="Llama-3.1-70B", mode="inference", batch=1, seq=2048, dtype="bf16"), 120.0, None),
}


def _child(case):
    from harness.tracing.tracer import trace  # cheap: torch and transformers are imported inside trace()

    t0 = time.perf_counter()
    result = trace(CASES[case][0])
    t1 = time.perf_counter()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"case": case, "trace_s": t1 - t0, "peak_rss_bytes": rss,
                      "ops": result.n_ops, "peak_allocated_bytes": result.peak_allocated_bytes,
                      "peak_phase": result.peak_phase, "estimated_reserved_bytes": result.estimated_reserved_bytes}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", choices=sorted(CASES), action="append", help="run only this case (repeatable)")
    ap.add_argument("--child", choices=sorted(CASES), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        _child(a.child)
        return 0
    ok = True
    for case in a.case or list(CASES):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", case], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if r.returncode:
            print(f"{case}: failed (exit {r.returncode})\n{r.stderr[-2000:]}")
            ok = False
            continue
        d = json.loads(r.stdout.strip().splitlines()[-1])
        _, max_s, max_rss = CASES[case]
        fits = wall <= max_s and (max_rss is None or d["peak_rss_bytes"] <= max_rss)
        ok &= fits
        bar = f"bar ≤ {max_s:.0f} s" + (f", ≤ {max_rss / GiB:.0f} GiB" if max_rss else "")
        print(f"{case:<12} process {wall:6.1f} s (trace() {d['trace_s']:.1f} s incl. importing torch, "
              f"{d['ops']:,} ops) · peak RSS {d['peak_rss_bytes'] / GiB:.2f} GiB · traced peak "
              f"{d['peak_allocated_bytes'] / GiB:.2f} GiB at {d['peak_phase']} · {bar}: {'ok' if fits else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
