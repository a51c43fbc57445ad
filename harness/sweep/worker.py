"""One experiment in its own process → one record file. Its exit code is its status.

    python -m harness.sweep.worker --out DIR --mode measure|trace '<experiment JSON>'

measure: on an NVIDIA GPU (harness.gpu.measure), figures under the record's `measured`;
trace: fake tensors on the CPU (harness.tracing), figures under `traced`. An out-of-memory
error is a result (outcome `oom`, with the requested size and the free memory at that
moment), not a crash. Exit codes: 0 ok, 10 oom, 11 error, 12 unsupported.
"""

import argparse
import json
import re
import sys
import time
import traceback

from ..env import fingerprint
from ..records import new_record, write_record
from .schema import Experiment

EXIT = {"ok": 0, "oom": 10, "error": 11, "unsupported": 12}
SOURCE = {"measure": "measured", "trace": "traced"}  # the mode → the record key its figures go under
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
    """The figures of one experiment in this mode (the record's `traced` or `measured` part)."""
    if mode == "trace":
        from ..tracing.tracer import trace

        try:
            result = trace(exp.spec)
        except (ValueError, NotImplementedError) as e:
            raise Unsupported(str(e)) from e
        d = result.to_dict()
        keep = ("peak_allocated_bytes", "peak_phase", "breakdown", "phases", "estimated_reserved_bytes",
                "estimated_max_allocated_bytes", "device_breakdown", "n_params", "seconds")
        return {k: d[k] for k in keep}
    from ..gpu.measure import measure

    return measure(exp)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="harness.sweep.worker")
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", choices=tuple(SOURCE), required=True)
    ap.add_argument("experiment", help="experiment as JSON")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    exp = Experiment.from_dict(json.loads(a.experiment))
    source = SOURCE[a.mode]
    record = new_record(exp, source)
    figures = error = None
    try:
        figures, outcome = run_one(exp, a.mode), "ok"
    except Unsupported as e:
        outcome, error = "unsupported", {"type": "Unsupported", "message": str(e)}
    except BaseException as e:  # an OOM is a result; any other error is recorded too
        if isinstance(e, KeyboardInterrupt):
            raise
        if _is_oom(e):
            outcome, error = "oom", {"type": type(e).__name__, **oom_details(e)}
        else:
            outcome, error = "error", {
                "type": type(e).__name__, "message": str(e)[:2000], "traceback": traceback.format_exc()[-4000:]}
    record.update({source: figures, "outcome": outcome, "error": error,
                   "timings": {"total_s": round(time.perf_counter() - t0, 3), **((figures or {}).get("timings") or {})},
                   "env": fingerprint()})
    write_record(a.out, record)
    return EXIT[outcome]


if __name__ == "__main__":
    sys.exit(main())
