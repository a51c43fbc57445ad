"""Experiment records: one JSON file per experiment, written atomically, named by source.

A record is written by the experiment's own process (or, if that process died without
writing one, by the launcher) to `<out>/<spec_hash>.json` through a temporary file and
`os.replace`, so a reader sees either nothing or a whole record. Its `outcome` is one of
OUTCOMES; an OOM is a result like any other.

Where a number came from is in its key. Schema 3:

    schema_version   3 (this module's SCHEMA_VERSION; not part of the spec hash)
    spec_hash        the experiment's hash (harness.sweep.schema), formula_hash the predictor's code
    spec, steps, timeout_s, sample_interval_ms, real_model_dir, group   the experiment
    source           "measured" (a GPU run), "traced" (fake tensors on the CPU), "rehearsed" (real tensors
                     on the CPU, `vramlab run --mode rehearse`) or "published" (a published measurement,
                     `vramlab import`, harness/analysis/published.py: with `published` and `citation`)
    outcome          ok | oom | error | timeout | crashed | unsupported
    predicted        formulas.predict at run time: breakdown (allocated categories — tensors and the
                     workspaces inside the allocator — and device categories), peaks, phases (per GPU
                     for a multi-GPU spec)
    traced           the tracer's figures (harness.tracing), or null
    measured         the GPU's figures (harness.gpu.measure), or null
    rehearsed        a rehearsal's figures (harness.sweep.ranks; present only in rehearsed records)
    error, timings, env

A multi-GPU experiment's `measured` or `rehearsed` holds `ranks` (each rank's figures), `world_size`,
`strategy`, `device`, `backend` and `peak_rank`; its other figures are those of the rank that needs
the most (harness.sweep.ranks.combine), so every reader treats it as a one-GPU record. Records of one
GPU do not change.

Records of an older schema are read through `migrate`; one that cannot be migrated without
guessing is refused as "older schema", never misread.

The format is written down as a JSON Schema (draft 2020-12) in record.schema.json beside this module
(SCHEMA_FILE, shipped in the wheel); tests/test_interfaces.py validates every committed record against it.
"""

import glob
import json
import os
import tempfile

from formulas import categories as C
from formulas.units import MiB

SCHEMA_VERSION = 3
SCHEMA_FILE = os.path.join(os.path.dirname(__file__), "record.schema.json")  # the format as a JSON Schema
OUTCOMES = ("ok", "oom", "error", "timeout", "crashed", "unsupported")
_NOT_RECORDS = ("machine.json", "sweep.json")  # what else a record folder may hold


class RecordError(ValueError):
    """A record file that cannot be read as a record."""


def record_path(out_dir, spec_hash):
    return os.path.join(out_dir, f"{spec_hash}.json")


def new_record(exp, source):
    """The fields every record starts with: schema, hashes, the experiment, its source and the prediction."""
    from formulas.predict import predict

    from .env import formula_hash

    try:
        spec = exp.spec
        if not spec.stack:  # the libraries this process runs (the spec, and so its hash, stays as written)
            from formulas.stack import make_stack

            from .env import installed_versions

            spec = spec.replace(stack=make_stack({}, installed_versions()).versions)
        p = predict(spec)
        predicted = p.to_dict()
        predicted["stack"] = dict(p.spec.stack)
        predicted.pop("spec", None)
    except Exception as e:  # the prediction must not stop the record
        predicted = {"error": str(e)}
    return {"schema_version": SCHEMA_VERSION, "spec_hash": exp.spec_hash, "formula_hash": formula_hash(),
            **exp.to_dict(), "source": source, "predicted": predicted, "traced": None, "measured": None, source: None}


def observed(rec):
    """The record's own observation: its `measured` or its `traced` dict (or {})."""
    return rec.get(rec.get("source")) or {}


def measured_device_breakdown(measured):
    """{device category: bytes or None} of a GPU measurement, in the predictor's vocabulary.

    cuda_context: what the device peak holds outside the caching allocator (peak device − peak reserved:
    the context made at CUDA init and the kernel images loaded since); allocator_slack: peak reserved −
    peak allocated; workspaces: the cuBLAS workspaces inside the allocated peak where the measurement read
    them (`workspaces_bytes`), else None (they are in peak allocated, not told apart)."""
    dev = measured.get("peak_device_bytes")
    res, alloc = measured.get("peak_reserved_bytes"), measured.get("peak_allocated_bytes")
    return {C.CUDA_CONTEXT: dev - res if None not in (dev, res) else None,
            C.WORKSPACES: measured.get("workspaces_bytes"),
            C.ALLOCATOR_SLACK: res - alloc if None not in (res, alloc) else None}


# ------------------------------------------------------------------ older schemas

# Schema 1 predicted with the uncalibrated defaults of its time and stored context + workspaces
# as one `cuda_context` figure: 512 MiB + 32 MiB (formulas/overhead.py at schema 1).
_V1_CONTEXT, _V1_WORKSPACES = 512 * MiB, 32 * MiB


def _migrate_2(rec):
    """Schema 2 → 3: the workspaces moved inside the allocated peak. A schema-2 prediction counted none there and put
    its workspaces figure outside the allocator with the context; its measured `workspaces` was the device peak
    less reserved less the context at init — both now part of `cuda_context` (everything outside the allocator)."""
    rec = dict(rec)
    predicted = rec.get("predicted")
    if isinstance(predicted, dict) and isinstance(predicted.get("breakdown"), dict):
        bd = dict(predicted["breakdown"])
        if C.CUDA_CONTEXT in bd:
            bd[C.CUDA_CONTEXT] = (bd.get(C.CUDA_CONTEXT) or 0) + (bd.get(C.WORKSPACES) or 0)
        bd[C.WORKSPACES] = 0
        rec["predicted"] = {**predicted, "breakdown": bd}
    for source in ("measured", "rehearsed"):
        m = rec.get(source)
        if isinstance(m, dict) and "device_breakdown" in m:
            rec[source] = {**m, "device_breakdown": measured_device_breakdown(m)}
    rec["schema_version"] = 3
    rec.setdefault("migrated_from_schema", 2)
    return rec


def migrate(rec, path="record"):
    """A record of any known schema in the current one; RecordError where that would mean guessing."""
    version = rec.get("schema_version")
    if version == SCHEMA_VERSION:
        return rec
    if version == 2:
        return _migrate_2(rec)
    if version != 1:
        raise RecordError(f"{path}: record schema {version!r}: this vramlab reads schemas 1 to {SCHEMA_VERSION}")
    rec = dict(rec)
    predicted = rec.pop("prediction", None)
    predicted = dict(predicted) if isinstance(predicted, dict) else {}
    bd = predicted.get("breakdown")
    if isinstance(bd, dict) and C.CUDA_CONTEXT in bd:
        if bd[C.CUDA_CONTEXT] != _V1_CONTEXT + _V1_WORKSPACES:
            raise RecordError(f"{path}: older schema 1: its predicted context and workspaces are one figure that "
                              "cannot be split; rerun the experiment")
        predicted["breakdown"] = {**bd, C.CUDA_CONTEXT: _V1_CONTEXT, C.WORKSPACES: _V1_WORKSPACES}
    rec["predicted"] = predicted
    source = rec.get("source")
    if source == "traced":  # schema 1 kept traced figures under "measured"
        rec["traced"], rec["measured"] = rec.get("measured"), None
    else:
        rec["traced"] = None
        if isinstance(rec.get("measured"), dict):
            rec["measured"] = {**rec["measured"], "device_breakdown": measured_device_breakdown(rec["measured"])}
    rec["schema_version"] = 2
    rec["migrated_from_schema"] = version
    return _migrate_2(rec)


# ------------------------------------------------------------------ files

def write_record(out_dir, record):
    """Write `record` atomically as <out_dir>/<spec_hash>.json and return the path."""
    return write_record_file(record_path(out_dir, record["spec_hash"]), record)


def write_record_file(path, record):
    """Write `record` atomically to `path` (its folder is made) and return the path."""
    out_dir = os.path.dirname(path) or "."
    os.makedirs(out_dir, exist_ok=True)
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


def _int_bytes(v):
    return isinstance(v, int) and not isinstance(v, bool)


def check_record(rec, path="record"):
    """The record, if its fields have the types the readers rely on; else RecordError naming the field."""
    def bad(field, why):
        raise RecordError(f"{path}: field {field}: {why}")

    if not isinstance(rec.get("spec_hash"), str):
        bad("spec_hash", f"{rec.get('spec_hash')!r} is not a string")
    if rec.get("outcome") not in OUTCOMES:
        bad("outcome", f"{rec.get('outcome')!r} is not one of {', '.join(OUTCOMES)}")
    if not isinstance(rec.get("spec"), dict):
        bad("spec", f"{rec.get('spec')!r} is not a mapping of the experiment's fields")
    for part in ("predicted", "traced", "measured", "rehearsed", "published", "env", "error", "timings"):
        if rec.get(part) is not None and not isinstance(rec[part], dict):
            bad(part, f"{rec[part]!r} is not a mapping (or null)")
        for k, v in (rec.get(part) or {}).items() if part in ("predicted", "traced", "measured", "rehearsed",
                                                                "published") else ():
            if k.endswith("_bytes") and v is not None and not _int_bytes(v):
                bad(f"{part}.{k}", f"{v!r} is not a whole number of bytes")
    if rec["outcome"] == "ok" and rec.get("source") in ("measured", "traced", "rehearsed"):
        peak = (rec.get(rec["source"]) or {}).get("peak_allocated_bytes")
        if not (_int_bytes(peak) and peak > 0):
            bad(f"{rec['source']}.peak_allocated_bytes", f"{peak!r}: an ok record needs a positive peak")
    if rec["outcome"] == "ok" and rec.get("source") == "published":
        pub = rec.get("published") or {}
        peaks = [pub.get(k) for k in ("peak_allocated_bytes", "peak_reserved_bytes", "peak_device_bytes",
                                      "peak_allocated_context_bytes")
                 if pub.get(k) is not None]
        if not peaks or not all(_int_bytes(v) and v > 0 for v in peaks):
            bad("published", "an ok published record needs a positive peak_allocated_bytes, peak_reserved_bytes or "
                             "peak_device_bytes")
    return rec


def read_record(path):
    """Load one record in the current schema; a truncated, foreign, ill-typed or unmigratable file is a
    RecordError naming it (and the field)."""
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError; so is NaN handling
        raise RecordError(f"{path}: not a readable record ({e})") from None
    if not isinstance(rec, dict) or "spec_hash" not in rec or "outcome" not in rec:
        raise RecordError(f"{path}: not a vramlab record (no spec_hash/outcome)")
    return check_record(migrate(rec, path), path)


def record_files(path):
    """Record files under a file or folder (recursively), in a stable order; temp files and fingerprints left out."""
    if os.path.isfile(path):
        return [path]
    files = sorted(glob.glob(os.path.join(path, "**", "*.json"), recursive=True))
    return [f for f in files if not os.path.basename(f).startswith((".tmp-", ".corrupt-"))
            and os.path.basename(f) not in _NOT_RECORDS]


def iter_records(path, on_error=None):
    """Records under a file or folder; unreadable ones go to on_error(path, exc)."""
    for f in record_files(path):
        try:
            yield read_record(f)
        except RecordError as e:
            if on_error:
                on_error(f, e)
