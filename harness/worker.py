"""One experiment in its own process → one record file. Its exit code is its status.

    python -m harness.worker --out DIR --mode measure|trace '<experiment JSON>'

measure: on an NVIDIA GPU (harness.measure); trace: fake tensors on the CPU (harness.trace).
An out-of-memory error is a result (outcome `oom`, with the requested size and the free
memory at that moment), not a crash. Exit codes: 0 ok, 10 oom, 11 error, 12 unsupported.
"""

import argparse
import json
import re
import sys
import time
import traceback

from .env import fingerprint, formula_hash
from .records import write_record
from .spec import SCHEMA_VERSION, Experiment

EXIT = {"ok": 0, "oom": 10, "error": 11, "unsupported": 12}
_OOM_REQ = re.compile(r"Tried to allocate ([\d.]+) (GiB|MiB|KiB|B)")
_UNIT = {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10, "B": 1}


class Unsupported(Exception):
    """This experiment cannot run in this mode (e.g. bitsandbytes layers under fake tensors)."""


def _is_oom(e):
    name = type(e).__name__
    return name == "OutOfMemoryError" or "out of memory" in str(e).lower()


def oom_details(e):
    """Requested bytes parsed from the allocator's message, and free device memory now."""
    d = {"message": str(e).splitlines()[0][:500]}
    m = _OOM_REQ.search(str(e))
    if m:
        d["requested_bytes"] = int(float(m.group(1)) * _UNIT[m.group(2)])
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        try:
            free, total = torch.cuda.mem_get_info()
            d["free_bytes"], d["total_bytes"] = int(free), int(total)
        except Exception:
            pass
    return d


def run_one(exp, mode):
    """(outcome, measured dict, error dict, source) for one experiment."""
    if mode == "trace":
        from . import trace as tr

        try:
            result = tr.trace(exp.spec)
        except (ValueError, NotImplementedError) as e:
            raise Unsupported(str(e)) from e
        d = result.to_dict()
        measured = {
            "peak_allocated_bytes": d["peak_allocated_bytes"],
            "peak_phase": d["peak_phase"],
            "breakdown": d["breakdown"],
            "phases": d["phases"],
            "estimated_reserved_bytes": d.get("estimated_reserved_bytes"),
            "peak_device_bytes": None,
        }
        return "ok", measured, None, "traced"
    from . import measure

    return "ok", measure.measure(exp), None, "measured"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="harness.worker")
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", choices=("measure", "trace"), required=True)
    ap.add_argument("experiment", help="experiment as JSON")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    exp = Experiment.from_dict(json.loads(a.experiment))
    record = {
        "schema_version": SCHEMA_VERSION,
        "spec_hash": exp.spec_hash,
        "formula_hash": formula_hash(),
        **exp.to_dict(),
    }
    try:
        from formulas.predict import predict

        pred = predict(exp.spec).to_dict()
        pred.pop("spec", None)
        record["prediction"] = pred
    except Exception as e:
        record["prediction"] = {"error": str(e)}
    source = "measured" if a.mode == "measure" else "traced"
    try:
        outcome, measured, error, source = run_one(exp, a.mode)
    except Unsupported as e:
        outcome, measured, error = "unsupported", None, {"type": "Unsupported", "message": str(e)}
    except BaseException as e:  # an OOM is a result; any other error is recorded too
        if isinstance(e, KeyboardInterrupt):
            raise
        if _is_oom(e):
            outcome, measured, error = "oom", None, {"type": type(e).__name__, **oom_details(e)}
        else:
            outcome, measured, error = "error", None, {
                "type": type(e).__name__, "message": str(e)[:2000], "traceback": traceback.format_exc()[-4000:]}
    record.update(source=source, outcome=outcome, measured=measured, error=error,
                  timings={"total_s": round(time.perf_counter() - t0, 3), **((measured or {}).get("timings") or {})})
    record["env"] = fingerprint()
    write_record(a.out, record)
    return EXIT[outcome]


if __name__ == "__main__":
    sys.exit(main())
