"""A stand-in for harness.sweep.worker in launcher tests: behaves by the experiment's seq.

seq 11: hang; 12: SIGKILL itself; 13: exit 1 with no record; 14: die mid-write (temp file only);
15: (warm) ask for a fresh process unless it is the first experiment of this one; 16: SIGKILL the process that
started it (a Slurm or Ray task) and die with it; 40-99: take 0.2 s;
anything else: write an ok record with made-up figures — or an oom record where the environment's
STANDIN_LIMIT (`batch=N` or `seq=N`, several comma-separated) is exceeded, or an error record at
STANDIN_ERROR_AT (`batch=N`). The record's env holds the worker's PYTORCH_CUDA_ALLOC_CONF. Every completed run is appended to
<out>/.completed, so a test can count runs, not records. Cold: the experiment is the last argument; warm (--warm):
one JSON message per line on stdin, one reply per line on stdout, as the real worker does.
"""

import json
import os
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness.records import SCHEMA_VERSION, write_record  # noqa: E402
from harness.sweep.worker import die_with_launcher  # noqa: E402


def run(out, exp, mode, n, fallback=None):
    began = time.time()
    seq = exp["spec"]["seq"]
    if seq == 11:
        time.sleep(1000)
    if seq == 12:
        os.kill(os.getpid(), signal.SIGKILL)
    if seq == 13:
        print("boom", file=sys.stderr)
        sys.exit(1)
    if seq == 16:
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(1000)  # until the parent-death signal
    if seq == 14:
        fd, _ = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=out)
        os.write(fd, b'{"spec_hash": "trunc')
        os.kill(os.getpid(), signal.SIGKILL)
    if 40 <= seq < 100:
        time.sleep(0.2)
    process = {"pid": os.getpid(), "mode": mode, "experiment_in_process": n, "fallback": fallback}
    outcome = "ok"
    for item in filter(None, os.environ.get("STANDIN_LIMIT", "").split(",")):
        field, _, limit = item.partition("=")
        if exp["spec"][field] > int(limit):
            outcome = "oom"
    for item in filter(None, os.environ.get("STANDIN_ERROR_AT", "").split(",")):
        field, _, at = item.partition("=")
        if exp["spec"][field] == int(at):
            outcome = "error"
    write_record(out, {"schema_version": SCHEMA_VERSION, "spec_hash": exp["spec_hash"], "spec": exp["spec"],
                       "group": exp.get("group", ""), "search": exp.get("search"),
                       **{k: v for k, v in exp.items() if k not in ("spec", "spec_hash", "group", "search")},
                       "outcome": outcome, "source": "traced",
                       "traced": {"peak_allocated_bytes": 1000 + seq, "process": process},
                       "measured": None, "predicted": {"peak_allocated_bytes": 1000},
                       "env": {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "VRAMLAB_NVML_INDEX",
                                                             "CUDA_DEVICE_ORDER", "VRAMLAB_LAUNCHER_PID",
                                                             "PYTORCH_CUDA_ALLOC_CONF")},
                       "began": began, "started": time.time()})
    with open(os.path.join(out, ".completed"), "a") as f:
        f.write(exp["spec_hash"] + "\n")
    return outcome


def main():
    die_with_launcher()
    out = sys.argv[sys.argv.index("--out") + 1]
    if "--warm" not in sys.argv:
        run(out, json.loads(sys.argv[-1]), "cold", 1)
        return 0
    replies = os.fdopen(os.dup(1), "w")
    n = 0
    for line in sys.stdin:
        msg = json.loads(line)
        exp = msg["experiment"]
        if exp["spec"]["seq"] == 15 and n:
            replies.write(json.dumps({"spec_hash": exp["spec_hash"], "restart": True, "reason": "dirty"}) + "\n")
            replies.flush()
            return 0
        n += 1
        outcome = run(out, exp, "warm", n, msg.get("fallback"))
        replies.write(json.dumps({"spec_hash": exp["spec_hash"], "outcome": outcome}) + "\n")
        replies.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
