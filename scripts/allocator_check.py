"""The allocator simulation against GPU records: trace each measured spec on the CPU, replay its allocation stream
through harness/tracing/allocator.py, and compare reserved (and allocated) per phase with what the GPU measured.

    python scripts/allocator_check.py results/runs                  # every record it can trace
    python scripts/allocator_check.py results/runs --json out.json   # + every figure, per record and phase
    python scripts/allocator_check.py results/runs --streams DIR     # keep each stream (pickled) to replay again

A record is traced with its own stack (env.packages) and its GPU's architecture (the cuBLAS workspace size).
Quantized records (bitsandbytes int8/nf4) are not traceable on fake tensors and are listed as skipped.
"""

import argparse
import gzip
import json
import os
import pickle
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from formulas.spec import SpecError  # noqa: E402
from harness.analysis.repredict import overheads_of, spec_of  # noqa: E402
from harness.records import iter_records  # noqa: E402

MiB = 2**20


def check(rec, streams=None):
    """{phase: {measured/simulated allocated and reserved}} of one record, or raise SpecError where it cannot trace."""
    from harness.tracing.tracer import trace

    spec = spec_of(rec)
    t0 = time.perf_counter()
    res = trace(spec, overheads=overheads_of(rec), keep_stream=streams is not None)
    if streams is not None:
        os.makedirs(streams, exist_ok=True)
        with gzip.open(os.path.join(streams, rec["spec_hash"] + ".pkl.gz"), "wb") as f:
            pickle.dump(res.stream, f)
    m = rec["measured"]
    out = {"spec_hash": rec["spec_hash"], "model": spec.model, "mode": spec.mode, "dtype": spec.dtype,
           "batch": spec.batch, "seq": spec.seq, "seconds": round(time.perf_counter() - t0, 1), "phases": {}}
    for ph, meas in m["phases"].items():
        sim = res.estimated_phases.get(ph)
        if sim is None or meas.get("max_reserved_bytes") is None:
            continue
        out["phases"][ph] = {"measured_allocated": meas["max_allocated_bytes"], "measured_reserved": meas["max_reserved_bytes"],
                             "simulated_allocated": sim["max_allocated_bytes"], "simulated_reserved": sim["max_reserved_bytes"]}
    out["measured_reserved"] = m["peak_reserved_bytes"]
    out["simulated_reserved"] = res.estimated_reserved_bytes
    out["measured_allocated"] = m["peak_allocated_bytes"]
    out["simulated_allocated"] = res.estimated_max_allocated_bytes
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--json", default=None, help="write every figure here")
    ap.add_argument("--streams", default=None, help="keep each record's allocation stream in this folder")
    ap.add_argument("--only", default=None, help="spec hashes (comma list) to check")
    a = ap.parse_args(argv)
    recs = [r for p in a.paths for r in iter_records(p)]
    recs = [r for r in recs if r.get("outcome") == "ok" and r.get("source") == "measured"]
    if a.only:
        keep = set(a.only.split(","))
        recs = [r for r in recs if r["spec_hash"] in keep]
    rows, skipped = [], []
    for rec in recs:
        try:
            row = check(rec, a.streams)
        except SpecError as e:
            skipped.append((rec["spec_hash"], str(e).split(":")[0]))
            continue
        rows.append(row)
        e_res = row["simulated_reserved"] / row["measured_reserved"] - 1
        e_all = row["simulated_allocated"] / row["measured_allocated"] - 1
        print(f"{row['spec_hash']}  {row['model'].split('/')[-1][:16]:16} {row['mode'][:5]:5} {row['dtype']:5} "
              f"b{row['batch']:<3} s{row['seq']:<5} reserved {row['measured_reserved'] / MiB:9,.0f} MiB measured, "
              f"{row['simulated_reserved'] / MiB:9,.0f} simulated ({e_res:+6.1%}); allocated {e_all:+6.1%}  "
              f"[{row['seconds']} s]", flush=True)
    if rows:
        errs = sorted(abs(r["simulated_reserved"] / r["measured_reserved"] - 1) for r in rows)
        within = sum(e <= 0.03 for e in errs)
        print(f"{len(rows)} records simulated, {len(skipped)} skipped (not traceable): reserved peak median |error| "
              f"{statistics.median(errs):.2%}, worst {errs[-1]:.2%}; within 3 %: {within} of {len(rows)}")
    for h, why in skipped:
        print(f"skipped {h}: {why}")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({"rows": rows, "skipped": skipped}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
