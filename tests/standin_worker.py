"""A stand-in for harness.sweep.worker in launcher tests: behaves by the experiment's seq.

seq 11: hang; 12: SIGKILL itself; 13: exit 1 with no record; 14: die mid-write (temp file only);
anything else: write an ok record with made-up measurements.
"""

import json
import os
import signal
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness.records import SCHEMA_VERSION, write_record  # noqa: E402


def main():
    out = sys.argv[sys.argv.index("--out") + 1]
    exp = json.loads(sys.argv[-1])
    seq = exp["spec"]["seq"]
    if seq == 11:
        time.sleep(1000)
    if seq == 12:
        os.kill(os.getpid(), signal.SIGKILL)
    if seq == 13:
        print("boom", file=sys.stderr)
        sys.exit(1)
    if seq == 14:
        fd, _ = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=out)
        os.write(fd, b'{"spec_hash": "trunc')
        os.kill(os.getpid(), signal.SIGKILL)
    write_record(out, {"schema_version": SCHEMA_VERSION, "spec_hash": exp["spec_hash"], "spec": exp["spec"],
                       "outcome": "ok", "source": "traced", "traced": {"peak_allocated_bytes": 1000 + seq},
                       "measured": None, "predicted": {"peak_allocated_bytes": 1000}, "env": {},
                       "started": time.time()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
