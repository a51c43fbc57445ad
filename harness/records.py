"""Experiment records: one JSON file per experiment, written atomically; export to a DataFrame.

A record is written by the experiment's own process (or, if that process died without
writing one, by the launcher) to `<out>/<spec_hash>.json` through a temporary file and
`os.replace`, so a reader sees either nothing or a whole record. Its `outcome` is one of
ok | oom | error | timeout | crashed; an OOM is a result like any other.
"""

import glob
import json
import os
import tempfile

from .spec import SCHEMA_VERSION

OUTCOMES = ("ok", "oom", "error", "timeout", "crashed", "unsupported")


class RecordError(ValueError):
    """A record file that cannot be read as a record."""


def record_path(out_dir, spec_hash):
    return os.path.join(out_dir, f"{spec_hash}.json")


def write_record(out_dir, record):
    """Write `record` atomically as <out_dir>/<spec_hash>.json and return the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = record_path(out_dir, record["spec_hash"])
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=out_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_record(path):
    """Load one record; a truncated or foreign file is a RecordError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise RecordError(f"{path}: not a readable record ({e})") from None
    if not isinstance(rec, dict) or "spec_hash" not in rec or "outcome" not in rec:
        raise RecordError(f"{path}: not a vramlab record (no spec_hash/outcome)")
    if rec.get("schema_version") != SCHEMA_VERSION:
        raise RecordError(f"{path}: record schema {rec.get('schema_version')} (this vramlab reads {SCHEMA_VERSION})")
    return rec


def iter_records(path, on_error=None):
    """Records under a file or directory (recursively); unreadable ones go to on_error(path, exc)."""
    files = [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(path, "**", "*.json"), recursive=True))
    for f in files:
        if os.path.basename(f).startswith(".tmp-") or os.path.basename(f) in ("machine.json", "sweep.json"):
            continue
        try:
            yield read_record(f)
        except RecordError as e:
            if on_error:
                on_error(f, e)


def load_records_for(command, path, empty_ok=False):
    """Records under `path` for a CLI command: unreadable files are reported on stderr and skipped;
    None (after saying so) when there are none, unless empty_ok (the caller explains instead)."""
    import sys

    bad = []
    recs = list(iter_records(path, on_error=lambda p, e: bad.append(str(e))))
    for b in bad:
        print(f"vramlab {command}: skipped {b}", file=sys.stderr)
    if not recs and not empty_ok:
        print(f"vramlab {command}: no records under {path}", file=sys.stderr)
        return None
    return recs


def _get(d, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def records_frame(records):
    """One row per experiment, with the columns the issue names plus per-phase peaks."""
    import pandas as pd

    rows = []
    for r in records:
        spec = r.get("spec", {})
        env = r.get("env", {})
        m = r.get("measured") or {}
        row = {
            "spec_hash": r["spec_hash"],
            "source": r.get("source", ""),
            "model": spec.get("model"),
            "mode": spec.get("mode"),
            "method": spec.get("method"),
            "dtype": spec.get("dtype"),
            "batch": spec.get("batch"),
            "seq": spec.get("seq"),
            "gen": spec.get("gen"),
            "optimizer": spec.get("optimizer"),
            "grad_ckpt": spec.get("grad_ckpt"),
            "attn": spec.get("attn"),
            "gpu_name": _get(env, "gpu", "name"),
            "driver": _get(env, "gpu", "driver"),
            "outcome": r["outcome"],
            "predicted_peak_allocated_bytes": _get(r, "prediction", "peak_allocated_bytes"),
            "measured_peak_allocated_bytes": m.get("peak_allocated_bytes"),
            "predicted_peak_device_bytes": _get(r, "prediction", "peak_device_bytes"),
            "measured_peak_device_bytes": m.get("peak_device_bytes"),
            "measured_peak_reserved_bytes": m.get("peak_reserved_bytes"),
            "predicted_peak_phase": _get(r, "prediction", "peak_phase"),
            "measured_peak_phase": m.get("peak_phase"),
            "cuda_context_bytes": m.get("cuda_context_bytes"),
            "seconds": _get(r, "timings", "total_s"),
            "formula_hash": r.get("formula_hash"),
            "vramlab_commit": _get(env, "vramlab", "commit"),
            "error": (r.get("error") or {}).get("message"),
        }
        rows.append(row)
    return pd.DataFrame(rows)
