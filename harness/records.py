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
guessing is refused as "older schema", never misread. A record of a newer schema is refused as
"written by a newer vramlab" (NewerSchemaError): readers skip it, a resume leaves it alone and never
reruns its experiment.

Every reader reads records here (`read_record`, `iter_records`), through formulas/documents.py's
limits (a regular file, MAX_RECORD_BYTES, UTF-8, nesting); every byte figure at any depth must be a
whole number from 0 to MAX_BYTES. Every writer writes them here (`write_record_file`), in a folder
it holds the lock of (`lock_folder`): `vramlab run`, `import` and `fit` take the same lock.

The format is written down as a JSON Schema (draft 2020-12) in record.schema.json beside this module
(SCHEMA_FILE, shipped in the wheel); tests/test_interfaces.py validates every committed record against it.
"""

import fcntl
import json
import math
import os
import stat
import tempfile

from formulas.documents import MAX_INT_DIGITS, DocumentError, load_json

from formulas import categories as C
from formulas.units import MiB

SCHEMA_VERSION = 3
SCHEMA_FILE = os.path.join(os.path.dirname(__file__), "record.schema.json")  # the format as a JSON Schema
OUTCOMES = ("ok", "oom", "error", "timeout", "crashed", "unsupported")
_NOT_RECORDS = ("machine.json", "sweep.json")  # what else a record folder may hold


MAX_RECORD_BYTES = 64 * 2**20  # the largest record written (a measured run with its samples) is about 0.3 MiB
MAX_BYTES = 2**60  # a byte figure beyond an exbibyte is no memory figure (and would overflow the tables' int64)
SIGNED_BYTES = ("nvml_residual_bytes", "margin_bytes")  # byte figures that are differences, and may be negative
MAX_INT = 2**63  # any other integer in a record: what the tables' int64 columns hold


class RecordError(ValueError):
    """A record file that cannot be read as a record."""


class NewerSchemaError(RecordError):
    """A record written by a newer vramlab: left as it is, never read as something else nor rerun."""


class RecordsLocked(ValueError):
    """Another vramlab command is writing records into the same folder."""


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
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise NewerSchemaError(f"{path}: written by a newer vramlab (record schema {version}; this one reads schemas "
                               f"1 to {SCHEMA_VERSION}): left as it is")
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


_PARTS = ("predicted", "traced", "measured", "rehearsed", "published", "env", "error", "timings", "citation")


def _check_numbers(obj, bad):
    """Every number under `obj`, walked without recursion: a byte figure (a `*_bytes` key, or a value of a
    `breakdown`, which maps categories to bytes) is null or a whole number from 0 to MAX_BYTES; no number is NaN or
    infinite; no integer is past MAX_INT. bad(field, why) is called with the first that is not."""
    def field(path):
        return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path).lstrip(".")

    stack = [(obj, (), False)]
    while stack:
        o, path, byte_figure = stack.pop()
        items = o.items() if isinstance(o, dict) else enumerate(o)
        for k, v in items:
            figure = byte_figure or (isinstance(k, str) and (k == "breakdown" or k.endswith("_bytes"))
                                     and k not in SIGNED_BYTES)
            if isinstance(v, (dict, list)):
                stack.append((v, path + (k,), figure))
            elif v is None or isinstance(v, (str, bool)):
                if figure and isinstance(v, str):
                    bad(field(path + (k,)), f"{v!r} is not a whole number of bytes")
            elif isinstance(v, float) and not math.isfinite(v):
                bad(field(path + (k,)), f"{v!r} is not a number")
            elif figure and not (isinstance(v, int) and 0 <= v <= MAX_BYTES):
                bad(field(path + (k,)), f"{v!r} is not a whole number of bytes from 0 to {MAX_BYTES:,}")
            elif isinstance(v, int) and not -MAX_INT < v < MAX_INT:
                bad(field(path + (k,)), f"{v!r} is out of range (a record's integers fit in 64 bits)")


def check_record(rec, path="record"):
    """The record, if its fields have the types and ranges the readers rely on; else RecordError naming the field."""
    def bad(field, why):
        raise RecordError(f"{path}: field {field}: {why}")

    if not isinstance(rec.get("spec_hash"), str):
        bad("spec_hash", f"{rec.get('spec_hash')!r} is not a string")
    if rec.get("outcome") not in OUTCOMES:
        bad("outcome", f"{rec.get('outcome')!r} is not one of {', '.join(OUTCOMES)}")
    if not isinstance(rec.get("spec"), dict):
        bad("spec", f"{rec.get('spec')!r} is not a mapping of the experiment's fields")
    for part in _PARTS:  # mappings or null (`engine` is a run field's text, or an engine record's figures)
        if rec.get(part) is not None and not isinstance(rec[part], dict):
            bad(part, f"{rec[part]!r} is not a mapping (or null)")
    for part in ("gpu", "packages", "vramlab"):  # the environment's parts every table reads
        v = (rec.get("env") or {}).get(part)
        if v is not None and not isinstance(v, dict):
            bad(f"env.{part}", f"{v!r} is not a mapping (or null)")
    _check_numbers(rec, bad)
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
    """Load one record in the current schema; a truncated, foreign, ill-typed, unmigratable or newer-schema file, or
    one that is not a regular file, is a RecordError naming it (and the field)."""
    try:
        rec = load_json(path, MAX_RECORD_BYTES)
    except DocumentError as e:
        why = str(e)[len(f"{path}: "):] if str(e).startswith(f"{path}: ") else str(e)
        raise RecordError(f"{path}: not a readable record ({why})") from None
    if not isinstance(rec, dict) or "spec_hash" not in rec or "outcome" not in rec:
        raise RecordError(f"{path}: not a vramlab record (no spec_hash/outcome)")
    return check_record(migrate(rec, path), path)


def record_files(path, on_skip=None):
    """Record files under a file or folder (recursively, following links), in a stable order; temp files and
    fingerprints left out. Each file and folder is visited once, however many links lead to it (a link back up the
    tree is no loop); what is neither a file nor a folder (a FIFO, a socket, a device) is left out and passed to
    on_skip(path, RecordError)."""
    def skip(p, why):
        if on_skip:
            on_skip(p, RecordError(f"{p}: {why}; skipped"))

    try:
        st = os.stat(path)
    except OSError as e:
        skip(path, f"cannot read it ({e.strerror or e})")
        return []
    if not stat.S_ISDIR(st.st_mode):
        return [path]
    seen_dirs, seen_files, out = set(), set(), []
    for root, dirs, files in os.walk(path, followlinks=True, onerror=lambda e: skip(e.filename, e.strerror or e)):
        st = os.stat(root)
        if (st.st_dev, st.st_ino) in seen_dirs:  # reached again through a link: its files are counted already
            dirs[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirs.sort()
        for name in files:
            if not name.endswith(".json") or name.startswith((".tmp-", ".corrupt-")) or name in _NOT_RECORDS:
                continue
            f = os.path.join(root, name)
            try:
                fst = os.stat(f)
            except OSError as e:  # a dangling link, a link loop
                skip(f, f"cannot read it ({e.strerror or e})")
                continue
            if not stat.S_ISREG(fst.st_mode):
                skip(f, "not a regular file (a FIFO, a socket or a device)")
                continue
            if (fst.st_dev, fst.st_ino) not in seen_files:
                seen_files.add((fst.st_dev, fst.st_ino))
                out.append(f)
    return sorted(out)


def iter_records(path, on_error=None):
    """Records under a file or folder; unreadable ones and what is not a file go to on_error(path, exc)."""
    for f in record_files(path, on_skip=on_error):
        try:
            yield read_record(f)
        except RecordError as e:
            if on_error:
                on_error(f, e)


# ------------------------------------------------------------------ the lock

def lock_folder(folder, command="run"):
    """Hold `<folder>/.lock` for this process (released when it exits, however it exits); RecordsLocked if another
    vramlab command holds it. Every command that writes records or tables takes it on the folder it writes."""
    path = os.path.join(folder, ".lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as e:
        raise RecordsLocked(f"{folder}: cannot take its lock ({e.strerror or e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        _refuse(folder, fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {command}\n".encode(), 0)
    return fd


def _refuse(folder, fd):
    holder = os.pread(fd, 64, 0).decode(errors="replace").split() or ["?"]
    os.close(fd)
    what = f"vramlab {holder[1]}" if len(holder) > 1 else "vramlab command"
    raise RecordsLocked(f"{folder}: another {what} (pid {holder[0]}) is writing here; wait for it or stop it")


def check_unlocked(folder):
    """RecordsLocked (the same line lock_folder would give) if another command holds the folder's lock now; a check
    before a command prints anything, the lock itself is taken later."""
    try:
        fd = os.open(os.path.join(folder, ".lock"), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        _refuse(folder, fd)
    os.close(fd)
