"""`vramlab doctor`: one command that says whether this machine is ready to measure (logic in harness/doctor.py)."""

import json
import sys

MARK = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "skip": "skip"}


def cmd_doctor(a):
    from ..doctor import run_checks, to_json

    checks = run_checks(a.out, progress=lambda msg: print(f"  … {msg}", file=sys.stderr))
    if a.json:
        print(json.dumps(to_json(checks), indent=2))
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            print(f"{MARK[c.status]}  {c.name:<{width}}  {c.detail}")
        failed = [c.name for c in checks if c.status == "fail"]
        print(f"\n{len(checks)} checks: " + (f"{len(failed)} failed ({', '.join(failed)})" if failed else "none failed"))
    return 1 if any(c.status == "fail" for c in checks) else 0


def add_parsers(sub):
    """Register `doctor`."""
    p = sub.add_parser("doctor", help="check what a sweep needs: NVML, CUDA, bitsandbytes, peft, tracer, a measurement",
                       description="Check this machine for measuring: NVML, the CUDA context, bitsandbytes kernels, "
                                   "peft's bitsandbytes LoRA layers, the tracer, and three small experiments measured "
                                   "with the category tracker off and on (on a GPU, in about two minutes). Without a "
                                   "GPU it says so and checks the rest. Exit 1 when a check fails.")
    p.add_argument("--out", default=None, help="keep the measured records in this folder (default: a temporary one)")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.set_defaults(func=cmd_doctor)
