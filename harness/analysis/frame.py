"""Records → one row per experiment (a pandas DataFrame), every figure's column named by its source.

    predicted_*    formulas.predict of the record's spec in its environment (stack, GPU architecture, the kernel
                   images its process had loaded) with the current formulas and uncalibrated defaults
                   (harness.analysis.repredict); `as_recorded=True`: the prediction stored at run time
    calibrated_*   the same prediction with the calibration table fitted in the record's environment
    traced_*       fake-tensor figures (harness.tracing)
    measured_*     GPU figures (harness.gpu.measure)
    rehearsed_*    real tensors on the CPU (`vramlab run --mode rehearse`, harness.sweep.ranks)
    published_*    a published measurement (`vramlab import`): the figure under what the source measured
                   (peak allocated, reserved, device, or allocated plus the memory outside PyTorch), its set

A cell is empty where that source has no value: a traced record has no measured_* figures and no
device peak, a record without a matching calibration table no calibrated_* figures.
"""

from formulas import categories as C

from ..env import environment_key
from ..records import measured_device_breakdown
from .calibrate import calibration_for_environment

SPEC_COLUMNS = ("model", "mode", "method", "dtype", "batch", "seq", "gen", "optimizer", "grad_ckpt", "attn", "gpus", "zero",
                "tp", "layer_split")
TRACED_COLUMNS = ("peak_allocated_bytes", "estimated_reserved_bytes", "peak_phase")
REHEARSED_COLUMNS = ("peak_allocated_bytes", "estimated_reserved_bytes", "peak_phase", "world_size", "peak_rank")
PUBLISHED_COLUMNS = ("peak_allocated_bytes", "peak_reserved_bytes", "peak_device_bytes", "peak_allocated_context_bytes",
                     "what", "case")
MEASURED_COLUMNS = ("peak_allocated_bytes", "peak_reserved_bytes", "peak_device_bytes", "peak_phase",
                    "cuda_context_bytes", "outside_allocator_bytes", "world_size", "peak_rank")


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _current(r, overheads, loaded):
    """(Prediction, device bytes) of a measured record with the current formulas, or None where they refuse it."""
    from formulas.spec import SpecError

    from .repredict import repredict

    try:
        return repredict(r, overheads, loaded.get(r["spec_hash"], ()))
    except (SpecError, ValueError, KeyError):
        return None


def records_frame(records, calibration_lookup=calibration_for_environment, as_recorded=False):
    """One row per record; `calibration_lookup(environment key)` gives the table for calibrated_* (or None).

    Measured records are predicted again with the current formulas in their environment unless `as_recorded`."""
    import pandas as pd

    from .repredict import loaded_before

    records = list(records)
    loaded = loaded_before([r for r in records if r.get("source") == "measured"])
    tables = {}
    rows = []
    for r in records:
        spec, env, pred = r.get("spec") or {}, r.get("env") or {}, r.get("predicted") or {}
        traced, measured, rehearsed = r.get("traced") or {}, r.get("measured") or {}, r.get("rehearsed") or {}
        row = {"spec_hash": r["spec_hash"], "source": r.get("source", ""),
               **{k: spec.get(k) for k in SPEC_COLUMNS},
               "gpu_name": _get(env, "gpu", "name"), "driver": _get(env, "gpu", "driver"), "outcome": r["outcome"],
               "predicted_peak_allocated_bytes": pred.get("peak_allocated_bytes"),
               "predicted_peak_reserved_bytes": pred.get("peak_reserved_bytes"),
               "predicted_peak_device_bytes": pred.get("peak_device_bytes"),
               "predicted_peak_phase": pred.get("peak_phase"),
               "calibrated_peak_allocated_bytes": None, "calibrated_peak_reserved_bytes": None,
               "calibrated_peak_device_bytes": None}
        current = r.get("source") == "measured" and not as_recorded and isinstance(r.get("spec"), dict)
        if current:
            now = _current(r, None, loaded)
            if now is not None:
                p, dev = now
                row.update(predicted_peak_allocated_bytes=p.peak_allocated_bytes,
                           predicted_peak_reserved_bytes=p.peak_reserved_bytes, predicted_peak_device_bytes=dev,
                           predicted_peak_phase=p.peak_phase)
        key = environment_key(env)
        if key not in tables:
            tables[key] = calibration_lookup(key) if calibration_lookup else None
        cal = tables[key]
        if cal is not None and isinstance(r.get("spec"), dict) and r.get("source") in ("measured", "published"):
            now = _current(r, cal.overheads, loaded)
            if now is not None:
                p, dev = now
                row.update(calibrated_peak_allocated_bytes=p.peak_allocated_bytes,
                           calibrated_peak_reserved_bytes=p.peak_reserved_bytes, calibrated_peak_device_bytes=dev)
        for c in TRACED_COLUMNS:
            row[f"traced_{c}"] = traced.get(c)
        published = r.get("published") or {}
        for c in PUBLISHED_COLUMNS:
            row[f"published_{c}"] = published.get(c)
        row["published_set"] = (r.get("citation") or {}).get("set")
        for c in REHEARSED_COLUMNS:
            row[f"rehearsed_{c}"] = rehearsed.get(c)
        device_bd = measured_device_breakdown(measured)
        for c in MEASURED_COLUMNS:
            row[f"measured_{c}"] = device_bd[C.CUDA_CONTEXT] if c == "outside_allocator_bytes" else measured.get(c)
        row.update(seconds=_get(r, "timings", "total_s"), formula_hash=r.get("formula_hash"),
                   vramlab_commit=_get(env, "vramlab", "commit"), error=(r.get("error") or {}).get("message"))
        rows.append(row)
    df = pd.DataFrame(rows)
    for c in df.columns:  # byte counts stay integers where a source has no value (nullable Int64)
        if c.endswith("_bytes"):
            df[c] = df[c].astype("Int64")
    return df
