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
"""

import os
import re

from ..records import SCHEMA_VERSION

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
CASE_KEYS = ("id", "spec", "published", "bytes", "note", "unsupported", "stack", "gpu", "measured", "also")
ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class PublishedError(ValueError):
    """A measurement-set file that cannot be imported; the message names the file and the field."""


def _load_yaml(path):
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except OSError as e:
        raise PublishedError(f"{path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise PublishedError(f"{path}: not YAML ({str(e).splitlines()[0]})") from None


def load_source(path):
    """The measurement set in `path`, checked field by field (PublishedError naming the first bad one)."""
    d = _load_yaml(path)
    if not isinstance(d, dict):
        raise PublishedError(f"{path}: not a measurement set (a mapping with {', '.join(SOURCE_KEYS)})")
    for k in SOURCE_KEYS:
        if k not in d:
            raise PublishedError(f"{path}: no `{k}` (a measurement set needs {', '.join(SOURCE_KEYS)})")
    if not isinstance(d["set"], str) or not ID.match(d["set"]):
        raise PublishedError(f"{path}: set: {d['set']!r} is not a name (letters, digits, . _ -)")
    cit = d["citation"]
    if not isinstance(cit, dict) or not cit.get("url") or not cit.get("title"):
        raise PublishedError(f"{path}: citation: needs at least title and url")
    _check_measured(path, "measured", d["measured"])
    if not isinstance(d.get("stack") or {}, dict):
        raise PublishedError(f"{path}: stack: {d['stack']!r} is not a mapping of package to version")
    if "unsupported" in d and not (isinstance(d["unsupported"], str) and d["unsupported"].strip()):
        raise PublishedError(f"{path}: unsupported: give the reason no case of the set can be predicted, as text")
    if not isinstance(d.get("defaults") or {}, dict):
        raise PublishedError(f"{path}: defaults: {d['defaults']!r} is not a mapping of spec fields")
    if not isinstance(d["cases"], list) or not d["cases"]:
        raise PublishedError(f"{path}: cases: needs a list of cases")
    seen = set()
    for i, c in enumerate(d["cases"]):
        where = f"{path}: cases[{i}]"
        if not isinstance(c, dict):
            raise PublishedError(f"{where}: not a mapping")
        unknown = sorted(set(c) - set(CASE_KEYS))
        if unknown:
            raise PublishedError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(CASE_KEYS)})")
        cid = c.get("id")
        if not isinstance(cid, str) or not ID.match(cid):
            raise PublishedError(f"{where}: id: {cid!r} is not a name (letters, digits, . _ -)")
        if cid in seen:
            raise PublishedError(f"{where}: id {cid!r} appears twice")
        seen.add(cid)
        if not isinstance(c.get("spec"), dict) or not c["spec"].get("model") and not (d.get("defaults") or {}).get("model"):
            raise PublishedError(f"{where} ({cid}): spec: needs a mapping with at least `model`")
        b = c.get("bytes")
        if not isinstance(b, int) or isinstance(b, bool) or b <= 0:
            raise PublishedError(f"{where} ({cid}): bytes: {b!r} is not a positive whole number of bytes")
        if not isinstance(c.get("published"), str):
            raise PublishedError(f"{where} ({cid}): published: give the number as printed, with its unit, as text")
        if "measured" in c:
            _check_measured(path, f"cases[{i}].measured", c["measured"])
        for kind, v in (c.get("also") or {}).items():
            _check_measured(path, f"cases[{i}].also", kind)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise PublishedError(f"{where} ({cid}): also.{kind}: {v!r} is not a positive whole number of bytes")
    return d


def _check_measured(path, field, value):
    if value not in MEASURED:
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
    fields["stack"] = tuple((p, str(stack[p])) for p in PACKAGES if stack.get(p))
    known = set(Spec.__dataclass_fields__)
    bad = sorted(set(fields) - known)
    if bad:
        raise ValueError(f"spec field {bad[0]!r} is not a vramlab spec field")
    return Spec(**fields)


def case_record(source, case):
    """The record of one published case (see the module docstring)."""
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
    reason = case.get("unsupported") or source.get("unsupported")
    try:
        spec = _spec_of(source, case)
    except (TypeError, ValueError) as e:
        spec, reason = None, reason or f"cannot be expressed: {e}"
    if spec is not None:
        rec["spec"] = spec.to_dict()
        rec["spec_hash"] = spec_hash(spec, {})
        rec["env"]["packages"] = dict(spec.stack)
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


def import_source(path, out_root, progress=None):
    """Write one record per case of the measurement set at `path` under out_root/<set>/<case id>.json.

    Returns [(case id, outcome, record path)]. Files of cases no longer in the set are removed, so the
    folder is the set as transcribed."""
    from ..records import write_record_file

    source = load_source(path)
    out_dir = os.path.join(out_root, source["set"])
    os.makedirs(out_dir, exist_ok=True)
    done = []
    for i, case in enumerate(source["cases"]):
        rec = case_record(source, case)
        target = os.path.join(out_dir, f"{case['id']}.json")
        write_record_file(target, rec)
        done.append((case["id"], rec["outcome"], target))
        if progress:
            progress(i + 1, len(source["cases"]), case["id"], rec)
    keep = {f"{c['id']}.json" for c in source["cases"]}
    for f in os.listdir(out_dir):
        if f.endswith(".json") and f not in keep:
            os.remove(os.path.join(out_dir, f))
    return done


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
