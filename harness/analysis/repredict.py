"""Measured records predicted again with the current formulas, in the record's own environment.

A record stores the prediction made when it ran; the formulas have moved on since. To score the
formulas as they are, each record's spec is predicted again with the stack its environment ran
(env.packages), the architecture of its GPU (env.gpu.name → formulas.device.compute_capability) and
the kernel images its process had already loaded: a warm worker runs experiment after experiment,
and lazy module loading keeps every kernel image an earlier experiment brought in
(`loaded_before`, from the records' own process ids and order).
"""

from formulas.device import kernel_families
from formulas.spec import Spec
from formulas.stack import PACKAGES

_SPEC_FIELDS = None


def spec_of(rec):
    """The record's Spec, with its stack or else the one its environment ran (versions of env.packages)."""
    global _SPEC_FIELDS
    if _SPEC_FIELDS is None:
        _SPEC_FIELDS = set(Spec.__dataclass_fields__)
    d = {k: v for k, v in (rec.get("spec") or {}).items() if k in _SPEC_FIELDS}
    for k, v in list(d.items()):
        if isinstance(v, list):
            d[k] = tuple(tuple(x) if isinstance(x, list) else x for x in v)
    if not d.get("stack"):  # the spec names no stack: the one its environment ran
        pkgs = ((rec.get("env") or {}).get("packages") or {})
        d["stack"] = tuple((p, str(pkgs[p])) for p in PACKAGES if pkgs.get(p))
    return Spec(**d)


def gpu_hardware(rec):
    """The catalog entry of the record's GPU (NVML's 'NVIDIA H200' → 'H200'), or None."""
    from formulas.hardware import UnknownGPUError, get_hardware

    name = str(((rec.get("env") or {}).get("gpu") or {}).get("name") or "")
    for candidate in (name, name.replace("NVIDIA ", "", 1), name.replace("NVIDIA GeForce ", "", 1)):
        try:
            return get_hardware(candidate) if candidate else None
        except UnknownGPUError:
            continue
    return None


def loaded_before(records):
    """{spec_hash: kernel-image families its process had loaded before it ran} (warm workers keep them)."""
    by_proc = {}
    for r in records:
        proc = ((r.get("measured") or {}).get("process") or {})
        pid, k = proc.get("pid"), proc.get("experiment_in_process")
        if pid is None or k is None:
            continue
        host = (r.get("env") or {}).get("hostname")
        by_proc.setdefault((host, pid), []).append((k, r))
    out = {}
    for runs in by_proc.values():
        seen = set()
        for _, r in sorted(runs, key=lambda x: x[0]):
            out[r["spec_hash"]] = tuple(sorted(seen))
            try:
                seen.update(kernel_families(spec_of(r)))
            except Exception:  # a record whose spec no longer validates: its kernels are unknown
                pass
    return out


def overheads_of(rec, overheads_for_cc=None):
    """The uncalibrated Overheads of the record's GPU (or `overheads_for_cc(cc)`'s)."""
    from formulas.device import compute_capability
    from formulas.overhead import default_overheads

    cc = compute_capability(gpu_hardware(rec))
    return overheads_for_cc(cc) if overheads_for_cc else default_overheads(cc)


def repredict(rec, overheads=None, loaded=()):
    """formulas.predict of the record's spec in its environment: (Prediction, device bytes with the process's
    earlier kernel images accounted for)."""
    from formulas.predict import device_totals, predict, workload_static
    from formulas.spec import validate
    from formulas.catalog import get_shape

    spec = spec_of(rec)
    ov = overheads or overheads_of(rec)
    pred = predict(spec, ov)
    if not loaded:
        return pred, pred.peak_device_bytes
    st = workload_static(validate(spec, get_shape(spec.model)))
    _, device = device_totals(st, pred.breakdown, pred.peak_allocated_bytes, pred.peak_reserved_bytes, ov, loaded)
    return pred, device


def with_current_predictions(records):
    """The records, measured ones with `predicted` replaced by the current formulas' prediction in their environment
    (`predicted.as_of` says so); a record the formulas now refuse keeps its stored prediction."""
    from formulas.spec import SpecError

    records = list(records)
    loaded = loaded_before([r for r in records if r.get("source") == "measured"])
    out = []
    for r in records:
        if r.get("source") != "measured" or not isinstance(r.get("spec"), dict):
            out.append(r)
            continue
        try:
            p, dev = repredict(r, None, loaded.get(r["spec_hash"], ()))
        except (SpecError, ValueError, KeyError):
            out.append(r)
            continue
        d = p.to_dict()
        d.pop("spec", None)
        d["peak_device_bytes"] = dev
        d["breakdown"] = {**d["breakdown"], "cuda_context": d["breakdown"]["cuda_context"] + dev - p.peak_device_bytes}
        d["as_of"] = "current formulas, the record's environment"
        out.append({**r, "predicted": d})
    return out
