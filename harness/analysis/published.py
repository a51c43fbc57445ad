"""Published measurements as records: `vramlab import SOURCE`.

A published measurement set is transcribed once, by hand, into a YAML file under
results/published/sources/ — the citation, the stack the authors ran, what their number is
(torch's allocated or reserved peak, NVML / nvidia-smi, the HF Trainer's memory metrics) and, per
case, the settings as vramlab's spec fields and the number exactly as printed:

    set: qlora-paper                      # the file's name without .yaml
    citation: {title: ..., url: ..., who: ..., where: "Table 3"}
    measured: allocated                   # allocated | reserved | nvml | trainer | allocated+context | unknown
    measured_note: "..."                  # how we know
    gpu: "A100 80GB"
    stack: {transformers: "4.40.0", peft: "0.10.0", torch: "2.2.0", bitsandbytes: "0.43.0"}
    stack_note: "stated / inferred from the date ..."
    defaults: {mode: train, ...}          # spec fields shared by the cases
    unsupported: "..."                    # only where no case of the set can be predicted: why
    cases:
      - id: llama2-7b-qlora               # unique in the set
        spec: {model: meta-llama/Llama-2-7b-hf, method: qlora, ...}
        published: "7.8 GB"               # as printed
        bytes: 7800000000
        also: {reserved: 8100000000, nvml: 9500000000}   # other counters the source states for the same run
        note: "assumptions"
        unsupported: "why the predictor cannot express it"   # only for such cases

`import_source` turns each case into a record (schema 2) with `source: "published"`: the spec (its
`stack` the set's, or the case's own), `published` holding the figure under the key of what was
measured (peak_allocated_bytes, peak_reserved_bytes or peak_device_bytes), `citation`, the
prediction at import time, and outcome `ok` — or `unsupported`, with the reason, for a case the
predictor cannot express (the transcriber's reason, or the predictor's own refusal). fit, check,
report and results read these records like any other.

A transcription mistake is refused, never turned into a record: an unknown key, a key given twice,
a misspelt or ill-typed spec field, a version that is not one, a name in `stack:` that looks like a
modelled package but is not, a figure that is not a whole number of bytes up to a PiB.

An import replaces exactly the records of the cases it imports (`ImportPlan`): each record names its
set and its file (`source_file`); records of cases no longer in the file are listed and removed
only when asked (`vramlab import --prune`); anything else in the folder is never touched, and a
case whose file name another source's record holds is refused. The set's folder is locked while
it is written (harness.records.lock_folder), like a sweep's.
"""

import difflib
import os
import re

from ..records import SCHEMA_VERSION, NewerSchemaError, RecordError, read_record

MEASURED = {  # what the published number is → the record key it goes under
    "allocated": "peak_allocated_bytes",  # torch.cuda.max_memory_allocated
    "reserved": "peak_reserved_bytes",  # torch.cuda.max_memory_reserved (Unsloth's, TRL's scripts)
    "nvml": "peak_device_bytes",  # nvidia-smi / NVML used memory
    # HF Trainer's memory metrics (skip_memory_metrics=False) are deltas of torch's allocated memory; the peak is
    # init_mem_gpu_alloc_delta + train_mem_gpu_alloc_delta + train_mem_gpu_peaked_delta (say so in the case note)
    "trainer": "peak_allocated_bytes",
    "unknown": "peak_device_bytes",  # "VRAM" without saying how: read as what nvidia-smi shows
    # peak allocated + the device memory outside PyTorch's allocator (nvidia-smi's peak − torch's peak reserved):
    # the CUDA context and library workspaces, not the allocator's slack (optimum's GPTQ benchmark)
    "allocated+context": "peak_allocated_context_bytes",
}
SOURCE_KEYS = ("set", "citation", "measured", "gpu", "cases")
OPTIONAL_SOURCE_KEYS = ("measured_note", "stack", "stack_note", "defaults", "unsupported")
CASE_KEYS = ("id", "spec", "published", "bytes", "note", "unsupported", "stack", "gpu", "measured", "also")
ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")  # a file name: fullmatch (no trailing newline)
PACKAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
# What people call the modelled packages, and what they are to vramlab: named in `stack:`, they would be ignored.
PACKAGE_ALIASES = {"pytorch": "torch", "bnb": "bitsandbytes", "hf-transformers": "transformers"}
MAX_PUBLISHED_BYTES = 2**50  # a published peak of one run: no device or node comes within a thousandth of a PiB


class PublishedError(ValueError):
    """A measurement-set file that cannot be imported; the message names the file and the field."""


def _load_yaml(path):
    from ..sweep.documents import DocumentError, load_yaml

    try:
        return load_yaml(path)
    except DocumentError as e:
        raise PublishedError(str(e)) from None


def _positive_bytes(v):
    return isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_PUBLISHED_BYTES


def _check_spec_fields(path, where, fields):
    """Each spec field a vramlab Spec field of the right type (harness.sweep.schema's check); PublishedError else."""
    from formulas.spec import Spec

    from ..sweep.schema import RUN_FIELDS, SweepError, _coerce

    known = set(Spec.__dataclass_fields__)
    for k, v in fields.items():
        if k not in known or k in RUN_FIELDS:
            close = difflib.get_close_matches(str(k), sorted(known), n=1, cutoff=0.75)
            raise PublishedError(f"{path}: {where}: {k!r} is not a vramlab spec field"
                                 + (f" (did you mean {close[0]}?)" if close else f" (fields: {', '.join(sorted(known))})"))
        if k == "stack":
            raise PublishedError(f"{path}: {where}: stack: give the versions in the case's or the set's `stack:`, not "
                                 "in spec")
        try:
            _coerce(path, where, k, v)
        except SweepError as e:
            raise PublishedError(str(e)) from None


def _check_stack(where, mapping):
    """A `stack:` mapping: the modelled packages' versions (formulas.stack.stack_pairs) and any other package the authors
    ran, each a name and a version as text; a near-miss of a modelled package's name is refused, not ignored."""
    from formulas.stack import PACKAGES, StackError, stack_pairs
    from formulas.versions import parse_version

    if mapping is None:
        return
    if not isinstance(mapping, dict):
        raise PublishedError(f"{where}: {mapping!r} is not a mapping of package to version, e.g. "
                             "{transformers: '4.40.0', peft: '0.10.0'}")
    for p, v in mapping.items():
        if p in PACKAGES:
            continue
        meant = PACKAGE_ALIASES.get(str(p).lower()) or next(iter(difflib.get_close_matches(str(p), PACKAGES, 1, 0.85)),
                                                              None)
        if meant:
            raise PublishedError(f"{where}: {p!r} is not a package name vramlab reads; did you mean {meant}?")
        if not isinstance(p, str) or not PACKAGE.fullmatch(p):
            raise PublishedError(f"{where}: {p!r} is not a package name")
        try:
            parse_version(v)
        except ValueError:
            raise PublishedError(f"{where}.{p}: {v!r} is not a version (give one like 1.2.3, as text in quotes)") \
                from None
    try:
        stack_pairs({p: v for p, v in mapping.items() if p in PACKAGES}, where)
    except StackError as e:
        raise PublishedError(str(e)) from None


def load_source(path):
    """The measurement set in `path`, checked field by field (PublishedError naming the first bad one)."""
    d = _load_yaml(path)
    if not isinstance(d, dict):
        raise PublishedError(f"{path}: not a measurement set (a mapping with {', '.join(SOURCE_KEYS)})")
    for k in SOURCE_KEYS:
        if k not in d:
            raise PublishedError(f"{path}: no `{k}` (a measurement set needs {', '.join(SOURCE_KEYS)})")
    unknown = sorted(map(str, set(d) - set(SOURCE_KEYS) - set(OPTIONAL_SOURCE_KEYS)))
    if unknown:
        raise PublishedError(f"{path}: unknown key {unknown[0]!r} (keys: {', '.join(SOURCE_KEYS + OPTIONAL_SOURCE_KEYS)})")
    if not isinstance(d["set"], str) or not ID.fullmatch(d["set"]):
        raise PublishedError(f"{path}: set: {d['set']!r} is not a name (letters, digits, . _ -)")
    cit = d["citation"]
    if not isinstance(cit, dict) or not cit.get("url") or not cit.get("title"):
        raise PublishedError(f"{path}: citation: needs at least title and url")
    for k, v in cit.items():
        if not isinstance(v, (str, int)) or isinstance(v, bool):
            raise PublishedError(f"{path}: citation.{k}: {v!r} is not text")
    _check_measured(path, "measured", d["measured"])
    for k in ("gpu", "measured_note", "stack_note"):
        if d.get(k) is not None and not isinstance(d[k], str):
            raise PublishedError(f"{path}: {k}: {d[k]!r} is not text")
    _check_stack(f"{path}: stack", d.get("stack"))
    if "unsupported" in d and not (isinstance(d["unsupported"], str) and d["unsupported"].strip()):
        raise PublishedError(f"{path}: unsupported: give the reason no case of the set can be predicted, as text")
    if not isinstance(d.get("defaults") or {}, dict):
        raise PublishedError(f"{path}: defaults: {d['defaults']!r} is not a mapping of spec fields")
    _check_spec_fields(path, "defaults", d.get("defaults") or {})
    if not isinstance(d["cases"], list) or not d["cases"]:
        raise PublishedError(f"{path}: cases: needs a list of cases")
    seen = set()
    for i, c in enumerate(d["cases"]):
        where = f"{path}: cases[{i}]"
        if not isinstance(c, dict):
            raise PublishedError(f"{where}: not a mapping")
        unknown = sorted(map(str, set(c) - set(CASE_KEYS)))
        if unknown:
            raise PublishedError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(CASE_KEYS)})")
        cid = c.get("id")
        if not isinstance(cid, str) or not ID.fullmatch(cid):
            raise PublishedError(f"{where}: id: {cid!r} is not a name (letters, digits, . _ -)")
        if cid in seen:
            raise PublishedError(f"{where}: id {cid!r} appears twice")
        seen.add(cid)
        where = f"{where} ({cid})"
        if not isinstance(c.get("spec"), dict) or not c["spec"].get("model") and not (d.get("defaults") or {}).get("model"):
            raise PublishedError(f"{where}: spec: needs a mapping with at least `model`")
        _check_spec_fields(path, f"cases[{i}].spec", c["spec"])
        _check_stack(f"{path}: cases[{i}].stack", c.get("stack"))
        b = c.get("bytes")
        if not _positive_bytes(b):
            raise PublishedError(f"{where}: bytes: {b!r} is not a whole number of bytes from 1 to "
                                 f"{MAX_PUBLISHED_BYTES:,}")
        if not isinstance(c.get("published"), str):
            raise PublishedError(f"{where}: published: give the number as printed, with its unit, as text")
        for k in ("note", "gpu", "unsupported"):
            if c.get(k) is not None and not isinstance(c[k], str):
                raise PublishedError(f"{where}: {k}: {c[k]!r} is not text")
        if "measured" in c:
            _check_measured(path, f"cases[{i}].measured", c["measured"])
        also = c.get("also") or {}
        if not isinstance(also, dict):
            raise PublishedError(f"{where}: also: {also!r} is not a mapping of what was measured to bytes")
        for kind, v in also.items():
            _check_measured(path, f"cases[{i}].also", kind)
            if not _positive_bytes(v):
                raise PublishedError(f"{where}: also.{kind}: {v!r} is not a whole number of bytes from 1 to "
                                     f"{MAX_PUBLISHED_BYTES:,}")
    return d


def _check_measured(path, field, value):
    if not isinstance(value, str) or value not in MEASURED:
        raise PublishedError(f"{path}: {field}: {value!r} is not one of {', '.join(MEASURED)}")


def _spec_of(source, case):
    from formulas.spec import Spec
    from formulas.stack import PACKAGES

    from formulas.recipes import flag_defaults

    fields = {**(source.get("defaults") or {}), **case["spec"]}
    try:  # a recipe's defaults for the fields the transcription leaves out (as the CLI and sweeps apply them)
        fields = {**flag_defaults(fields.get("recipe", "hf"), fields.get("recipe_version", "")), **fields}
    except ValueError:
        pass  # a bad version: the predictor names it
    if "lora_targets" in fields:
        t = fields["lora_targets"]
        fields["lora_targets"] = (t,) if isinstance(t, str) else tuple(t)
    stack = {**(source.get("stack") or {}), **(case.get("stack") or {})}
    fields["stack"] = tuple((p, stack[p]) for p in PACKAGES if p in stack)  # as written (checked by load_source)
    return Spec(**fields)


def case_record(source, case, source_file=""):
    """The record of one published case (see the module docstring); `source_file`: the set's file name."""
    from formulas.predict import predict
    from formulas.spec import SpecError

    from ..env import formula_hash
    from ..sweep.schema import spec_hash

    measured = case.get("measured", source["measured"])
    gpu = case.get("gpu", source.get("gpu"))
    published = {MEASURED[kind]: v for kind, v in (case.get("also") or {}).items()}  # other counters the source states
    published.update({MEASURED[measured]: case["bytes"], "what": measured, "as_printed": case["published"],
                      "case": case["id"], "note": case.get("note") or "", "gpu": gpu})
    rec = {"schema_version": SCHEMA_VERSION, "spec_hash": None, "formula_hash": formula_hash(), "spec": None,
           "group": source["set"], "source": "published", "outcome": "ok", "published": published,
           "citation": {**source["citation"], "set": source["set"]}, "measured_note": source.get("measured_note", ""),
           "stack_note": source.get("stack_note", ""), "predicted": None, "traced": None, "measured": None,
           "error": None, "env": {"gpu": {"name": gpu}, "packages": {}}}
    if source_file:
        rec["source_file"] = source_file
    reason = case.get("unsupported") or source.get("unsupported")
    try:
        spec = _spec_of(source, case)
    except (TypeError, ValueError) as e:
        spec, reason = None, reason or f"cannot be expressed: {e}"
    if spec is not None:
        rec["spec"] = spec.to_dict()
        rec["spec_hash"] = spec_hash(spec, {})
        stack = {**(source.get("stack") or {}), **(case.get("stack") or {})}
        rec["env"]["packages"] = {**{p: str(v) for p, v in stack.items()}, **dict(spec.stack)}  # all the authors ran
        try:
            p = predict(spec)
            rec["predicted"] = {k: v for k, v in p.to_dict().items() if k != "spec"}
            rec["spec"] = p.spec.to_dict()
        except (SpecError, ValueError) as e:
            reason = reason or f"the predictor refuses it: {e}"
    else:
        rec["spec"] = {k: v for k, v in {**(source.get("defaults") or {}), **case["spec"]}.items()}
        rec["spec_hash"] = f"published-{source['set']}-{case['id']}"[:64]
    if reason:
        rec["outcome"] = "unsupported"
        rec["error"] = {"type": "unsupported", "message": reason}
    return rec


# ------------------------------------------------------------------ importing: replace exactly this set's records

def _ours(rec, set_name, source_file):
    """Whether a record is one this set's file wrote (records written before `source_file` was kept count as the
    set's)."""
    return (rec.get("source") == "published" and rec.get("group") == set_name
            and (rec.get("citation") or {}).get("set") == set_name
            and rec.get("source_file", source_file) == source_file)


class ImportPlan:
    """What importing one measurement set will write, replace and leave: checked before anything is written."""

    def __init__(self, path, out_root):
        self.path, self.source = path, load_source(path)
        self.source_file = os.path.basename(path)
        self.set = self.source["set"]
        self.out_dir = os.path.join(out_root, self.set)
        self.cases = []  # (case id, record, target path)
        for case in self.source["cases"]:
            target = os.path.join(self.out_dir, f"{case['id']}.json")
            self._check_target(target, case["id"])
            self.cases.append((case["id"], case_record(self.source, case, self.source_file), target))
        keep = {os.path.basename(t) for _, _, t in self.cases}
        self.stale = []  # this set's records of cases no longer in its file
        if os.path.isdir(self.out_dir):
            for f in sorted(os.listdir(self.out_dir)):
                p = os.path.join(self.out_dir, f)
                if f.endswith(".json") and not f.startswith((".tmp-", ".corrupt-")) and f not in keep:
                    try:
                        if _ours(read_record(p), self.set, self.source_file):
                            self.stale.append(p)
                    except RecordError:
                        continue  # not this set's: never touched

    def _check_target(self, target, cid):
        """A file already at `target` must be this set's record of that case (replaced); anything else stays."""
        if not os.path.lexists(target):
            return
        try:
            rec = read_record(target)
        except NewerSchemaError as e:
            raise PublishedError(f"{self.path}: case {cid}: {e}; import with a newer vramlab") from None
        except RecordError as e:
            raise PublishedError(f"{self.path}: case {cid}: {target} is not a record this set wrote ({e}); it is left "
                                 "as it is: import into another --out") from None
        if not _ours(rec, self.set, self.source_file):
            theirs = rec.get("source_file") or (rec.get("citation") or {}).get("set") or rec.get("source", "?")
            raise PublishedError(f"{self.path}: case {cid}: {target} holds a record of {theirs}, not of this file; it "
                                 "is left as it is: give the set another name, or import into another --out")

    def write(self, prune=False, progress=None):
        """Write the cases' records; with `prune`, remove this set's records of cases no longer in its file. The caller
        holds the folder's lock. Returns [(case id, outcome, path)]."""
        from ..records import write_record_file

        done = []
        for i, (cid, rec, target) in enumerate(self.cases):
            write_record_file(target, rec)
            done.append((cid, rec["outcome"], target))
            if progress:
                progress(i + 1, len(self.cases), cid, rec)
        if prune:
            for p in self.stale:
                os.remove(p)
        return done


def import_source(path, out_root, progress=None, prune=False):
    """Write one record per case of the measurement set at `path` under out_root/<set>/<case id>.json, holding that
    folder's lock. Returns [(case id, outcome, record path)].

    Only this set's records of its own cases are replaced. Records of cases no longer in the set are kept unless
    `prune`; the CLI names them. Anything else in the folder — another set's records, a sweep's, files of other
    tools — is never touched, and a case whose file name it would take is refused (PublishedError)."""
    from ..records import lock_folder

    plan = ImportPlan(path, out_root)
    os.makedirs(plan.out_dir, exist_ok=True)
    lock = lock_folder(plan.out_dir, "import")
    try:
        return plan.write(prune, progress)
    finally:
        os.close(lock)


def measured_view(rec):
    """A published record that states both an allocated and a device peak, seen as a measured record (what
    `vramlab fit` reads); any other record as it is."""
    pub = rec.get("published") or {}
    if rec.get("source") != "published" or rec.get("outcome") != "ok" or \
            pub.get("peak_allocated_bytes") is None or pub.get("peak_device_bytes") is None:
        return rec
    return {**rec, "measured": {k: pub.get(k) for k in ("peak_allocated_bytes", "peak_reserved_bytes", "peak_device_bytes")}}


def observed_for_prediction(rec):
    """(quantity, published bytes, predicted bytes) a published record is scored on (its `what`):
    allocated → predicted peak allocated; reserved → allocated + allocator slack; device → peak device."""
    from formulas import categories as C

    pub, pred = rec.get("published") or {}, rec.get("predicted") or {}
    if not pred.get("peak_allocated_bytes"):
        return None
    key = MEASURED.get(pub.get("what"))
    if key and pub.get(key) is not None:  # the figure the source set out to measure first
        pub = {key: pub[key]}
    if pub.get("peak_allocated_bytes") is not None:
        return "allocated", pub["peak_allocated_bytes"], pred["peak_allocated_bytes"]
    if pub.get("peak_reserved_bytes") is not None:
        slack = (pred.get("breakdown") or {}).get(C.ALLOCATOR_SLACK, 0)
        return "reserved", pub["peak_reserved_bytes"], pred["peak_allocated_bytes"] + slack
    if pub.get("peak_device_bytes") is not None:
        return "device", pub["peak_device_bytes"], pred["peak_device_bytes"]
    if pub.get("peak_allocated_context_bytes") is not None:
        bd = pred.get("breakdown") or {}
        return ("allocated+context", pub["peak_allocated_context_bytes"],
                pred["peak_allocated_bytes"] + bd.get(C.CUDA_CONTEXT, 0) + bd.get(C.WORKSPACES, 0))
    return None


ALLOCATED_LEVEL = ("allocated",)  # quantities observed_for_prediction scores at PyTorch's allocated peak


def corpus_summary(records):
    """Error statistics of published records against their predictions: {'allocated' | 'device' | 'all':
    {n, median, p90, mean, worst}, 'not_expressible': count}. 'allocated': figures of torch's allocated peak
    (allocated, trainer); 'device': figures that also hold the CUDA context and the allocator's pool (reserved,
    NVML, allocated + context), which depend on the authors' environment."""
    from .stats import percentile

    errors = {"allocated": [], "device": []}
    missing = 0
    for r in records:
        if r.get("source") != "published":
            continue
        o = observed_for_prediction(r) if r.get("outcome") == "ok" else None
        if o is None:
            missing += 1
            continue
        quantity, observed, predicted = o
        errors["allocated" if quantity in ALLOCATED_LEVEL else "device"].append((predicted - observed) / observed)
    errors["all"] = errors["allocated"] + errors["device"]
    out = {"not_expressible": missing}
    for k, e in errors.items():
        a = [abs(x) for x in e]
        out[k] = {"n": len(e), "median": percentile(a, 50) if e else None, "p90": percentile(a, 90) if e else None,
                  "mean": sum(e) / len(e) if e else None, "worst": max(e, key=abs) if e else None}
    return out
