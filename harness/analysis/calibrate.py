"""Calibration: fit the device overheads the predictor leaves open, from one environment's records.

Why: `formulas/overhead.py` guesses the CUDA context, workspaces and allocator slack (the device
categories). They depend on GPU, driver, CUDA, torch and bitsandbytes, so they are fitted per
environment (`harness.env.environment_key`) from measured records, never mixed across environments.

Model (the predictor's own, `formulas.predict.device_totals`):

    measured_device - measured_allocated = overhead_intercept + slack_fraction × measured_allocated

fitted with Theil–Sen (median of pairwise slopes, intercept = median residual): robust to a few
records disturbed by other processes or fragmentation. The intercept is split into the CUDA
context (median of the records' own `cuda_context_bytes`, measured right after CUDA init) and
the workspaces (the rest). `allocator_slack_min_bytes` is set to 0: the intercept absorbs it.

Per-category multiplicative corrections (measured/predicted) are kept only where clearly
systematic (see `_systematic`); categories come from measured breakdowns where a record has one,
else the total `peak_allocated`. They are written to the table and used for the held-out error;
`formulas.predict` does not apply them yet.

Records are split deterministically by spec hash: sha256(spec_hash) mod 4 == 0 → held out.

Output contract: `results/calibration/<env-slug>.csv`, columns `parameter,value,note`; rows are
parameters (bytes as integers), `correction.<category>`, `heldout.<metric>.<stat>_<before|after>`
(relative errors, fractions) and `provenance.*` (environment, time, records, fit quality).

Lookup: `overheads_for(gpu, path)` is the one way `vramlab predict` and `vramlab plan` find a
table — the file given, else the newest table fitted on that GPU, else the uncalibrated defaults.
"""

import csv
import datetime
import hashlib
import io
import os
import re

from formulas import categories as C
from formulas.overhead import DEFAULT_OVERHEADS, Overheads

from ..paths import CALIBRATION_DIR

# numpy and harness.env are imported inside the fitting functions: `vramlab predict` imports this
# module only to load a table and must stay light.

HELDOUT_MODULUS = 4  # one record in four is held out
# A category correction is kept only if its median ratio is off by at least this much …
CORRECTION_MIN_DEVIATION = 0.02
# … at least this many records have it, and this share of them are off on the same side.
CORRECTION_MIN_RECORDS = 5
CORRECTION_SAME_SIDE = 0.9
PARAMETERS = ("cuda_context_bytes", "workspaces_bytes", "allocator_slack_fraction", "allocator_slack_min_bytes")


class CalibrationError(ValueError):
    """Records that cannot be calibrated, or a calibration file that cannot be read."""


def env_slug(key):
    """A file-name-safe slug of an environment key, e.g. 'nvidia-h100-80gb-hbm3_550.54.15_12.4_2.5.1_…'."""
    parts = [re.sub(r"[^a-z0-9.]+", "-", p.lower()).strip("-") or "none" for p in key.split("|")]
    return "_".join(parts)


def is_heldout(spec_hash):
    """Deterministic split: the same record is always on the same side."""
    return int(hashlib.sha256(spec_hash.encode()).hexdigest()[:8], 16) % HELDOUT_MODULUS == 0


def usable(rec):
    """A measured, successful record with allocated and device peaks and no other process on the GPU (a published
    record that states both is read as one: harness.analysis.published.measured_view)."""
    m = rec.get("measured") or {}
    return (rec.get("outcome") == "ok" and rec.get("source") in ("measured", "published")
            and m.get("peak_allocated_bytes") is not None and m.get("peak_device_bytes") is not None
            and not m.get("device_figures_flagged") and isinstance((rec.get("predicted") or {}).get("breakdown"), dict))


def theil_sen(x, y):
    """(slope, intercept): median of pairwise slopes, median of residuals. Source: Sen (1968)."""
    import numpy as np

    x, y = np.asarray(x, float), np.asarray(y, float)
    i, j = np.triu_indices(len(x), k=1)
    dx = x[j] - x[i]
    keep = dx != 0
    if not keep.any():
        raise CalibrationError("need records with at least two different allocated sizes to fit the slack fraction")
    slope = float(np.median((y[j] - y[i])[keep] / dx[keep]))
    return slope, float(np.median(y - slope * x))


def _systematic(ratios):
    """Median ratio if clearly systematic (enough records, far enough from 1, mostly on one side), else None."""
    import numpy as np

    r = np.asarray(ratios, float)
    if len(r) < CORRECTION_MIN_RECORDS:
        return None
    med = float(np.median(r))
    if med <= 0:  # the measured breakdowns put nothing there: no factor to apply (load_calibration refuses ≤ 0)
        return None
    same_side = np.mean(r > 1) if med > 1 else np.mean(r < 1)
    if abs(med - 1) >= CORRECTION_MIN_DEVIATION and same_side >= CORRECTION_SAME_SIDE:
        return med
    return None


def fit_corrections(records):
    """{category: factor} where measured/predicted is systematically off; 'peak_allocated' when no breakdowns."""
    per_cat = {}
    for rec in records:
        mbd = (rec["measured"] or {}).get("breakdown")
        pbd = rec["predicted"]["breakdown"]
        if isinstance(mbd, dict):
            for c in C.TENSOR_CATEGORIES:
                if pbd.get(c) and mbd.get(c) is not None:
                    per_cat.setdefault(c, []).append(mbd[c] / pbd[c])
    out = {c: f for c, r in per_cat.items() if (f := _systematic(r)) is not None}
    if not per_cat:
        total = [r["measured"]["peak_allocated_bytes"] / r["predicted"]["peak_allocated_bytes"]
                 for r in records if r["predicted"].get("peak_allocated_bytes")]
        f = _systematic(total)
        if f is not None:
            out["peak_allocated"] = f
    return out


def corrected_allocated(pred, corrections):
    """Predicted peak allocated bytes after the category (or total) corrections."""
    if "peak_allocated" in corrections:
        return int(pred["peak_allocated_bytes"] * corrections["peak_allocated"])
    bd = pred["breakdown"]
    delta = sum(bd.get(c, 0) * (f - 1) for c, f in corrections.items() if c in C.TENSOR_CATEGORIES)
    return int(pred["peak_allocated_bytes"] + delta)


def calibrated_totals(pred, overheads, corrections):
    """(allocated, device) bytes a stored prediction would have had with this calibration."""
    bd = pred["breakdown"]
    # Paged (unified-memory) optimizer state counts on the device but not as allocated; keep it as predicted.
    paged = pred["peak_device_bytes"] - pred["peak_allocated_bytes"] - sum(bd.get(c, 0) for c in C.DEVICE_CATEGORIES)
    alloc = corrected_allocated(pred, corrections)
    device = alloc + max(paged, 0) + sum(overheads.device_breakdown(alloc).values())
    return alloc, device


def heldout_errors(records, overheads, corrections):
    """{metric: {stat_before|stat_after: value}} for allocated and device totals."""
    from .stats import error_stats, relative_errors

    out = {}
    for metric, idx in (("allocated", 0), ("device", 1)):
        meas = [r["measured"][f"peak_{metric}_bytes"] for r in records]
        before = [r["predicted"][f"peak_{metric}_bytes"] for r in records]
        after = [calibrated_totals(r["predicted"], overheads, corrections)[idx] for r in records]
        stats = {}
        for tag, pred in (("before", before), ("after", after)):
            for k, v in error_stats(relative_errors(pred, meas)).items():
                if k != "n":
                    stats[f"{k}_{tag}"] = v
        out[metric] = stats
    return out


def fit(records, now=None):
    """Fit one environment's records → a result dict (parameters, corrections, held-out errors, provenance)."""
    import numpy as np

    from ..env import environment_key

    recs = [r for r in records if usable(r)]
    if not recs:
        raise CalibrationError("no usable records: need outcome ok, source measured, allocated and device peaks")
    keys = sorted({environment_key(r.get("env") or {}) for r in recs})
    if len(keys) > 1:
        raise CalibrationError(f"records from {len(keys)} environments ({'; '.join(keys)}); fit one at a time with --env")
    train = [r for r in recs if not is_heldout(r["spec_hash"])]
    held = [r for r in recs if is_heldout(r["spec_hash"])]
    if len(train) < 2:
        raise CalibrationError(f"only {len(train)} fitting record(s) after the held-out split; need at least 2")
    alloc = np.array([r["measured"]["peak_allocated_bytes"] for r in train], float)
    dev = np.array([r["measured"]["peak_device_bytes"] for r in train], float)
    slope, intercept = theil_sen(alloc, dev - alloc)
    ctx = [r["measured"]["cuda_context_bytes"] for r in train if r["measured"].get("cuda_context_bytes") is not None]
    context = int(np.median(ctx)) if ctx else int(round(intercept))
    context = min(context, int(round(intercept))) if intercept > 0 else context
    workspace = max(int(round(intercept)) - context, 0)
    resid = (dev - alloc) - (intercept + slope * alloc)
    overheads = Overheads(cuda_context_bytes=context, workspaces_bytes=workspace,
                          allocator_slack_fraction=slope, allocator_slack_min_bytes=0, source="fit", calibrated=True)
    corrections = fit_corrections(train)
    now = now or datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    return {
        "environment_key": keys[0],
        "overheads": overheads,
        "corrections": corrections,
        "heldout": heldout_errors(held, overheads, corrections) if held else {},
        "fit_quality": {"n_fit": len(train), "n_heldout": len(held),
                        "residual_mad_bytes": int(np.median(np.abs(resid - np.median(resid))))},
        "fitted_at": now,
        "fit_spec_hashes": sorted(r["spec_hash"] for r in train),
        "heldout_spec_hashes": sorted(r["spec_hash"] for r in held),
        "formula_hashes": sorted({str(r.get("formula_hash")) for r in recs}),
    }


def group_by_environment(records):
    """{environment key: [records]} over usable records."""
    from ..env import environment_key

    from .published import measured_view

    out = {}
    for r in records:
        r = measured_view(r)
        if usable(r):
            out.setdefault(environment_key(r.get("env") or {}), []).append(r)
    return out


def write_calibration(result, out_dir=CALIBRATION_DIR, records_path=""):
    """Write the table as <out_dir>/<env-slug>.csv (atomically) and return its path."""
    ov = result["overheads"]
    rows = [
        ("cuda_context_bytes", ov.cuda_context_bytes, "median measured context after CUDA init"),
        ("workspaces_bytes", ov.workspaces_bytes, "fitted intercept minus context: cuBLAS/cuDNN workspaces, handles"),
        ("allocator_slack_fraction", f"{ov.allocator_slack_fraction:.6f}", "Theil-Sen slope of (device - allocated) on allocated"),
        ("allocator_slack_min_bytes", ov.allocator_slack_min_bytes, "0: the intercept absorbs the floor"),
    ]
    for c, f in sorted(result["corrections"].items()):
        rows.append((f"correction.{c}", f"{f:.6f}", "measured/predicted, median over fitting records"))
    for metric, stats in sorted(result["heldout"].items()):
        for k, v in stats.items():
            rows.append((f"heldout.{metric}.{k}", "" if v is None else f"{v:.6f}", "relative error on held-out records"))
    q = result["fit_quality"]
    rows += [
        ("provenance.environment_key", result["environment_key"], "gpu|driver|cuda|torch|transformers|bitsandbytes"),
        ("provenance.fitted_at", result["fitted_at"], "UTC"),
        ("provenance.records_path", records_path, ""),
        ("provenance.n_fit", q["n_fit"], ""),
        ("provenance.n_heldout", q["n_heldout"], "sha256(spec_hash) mod 4 == 0"),
        ("provenance.residual_mad_bytes", q["residual_mad_bytes"], "fit quality on fitting records"),
        ("provenance.formula_hashes", " ".join(result["formula_hashes"]), ""),
        ("provenance.fit_spec_hashes", " ".join(result["fit_spec_hashes"]), ""),
        ("provenance.heldout_spec_hashes", " ".join(result["heldout_spec_hashes"]), ""),
    ]
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, env_slug(result["environment_key"]) + ".csv")
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(("parameter", "value", "note"))
            w.writerows(rows)
        try:
            load_calibration(tmp)  # a table its own reader would refuse is never written (and `fit` fails)
        except CalibrationError as e:
            why = str(e).split(": ", 1)[-1]
            raise CalibrationError(f"the fitted table would not load ({why}); nothing written to {path}") from None
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    os.replace(tmp, path)
    return path


class Calibration:
    """A loaded table: `overheads` (an Overheads naming the file), `corrections`, `heldout`, `provenance`."""

    def __init__(self, path, values):
        self.path = path
        self.values = values
        try:
            params = {k: values[k] for k in PARAMETERS}
            self.overheads_params = dict(
                cuda_context_bytes=int(params["cuda_context_bytes"]), workspaces_bytes=int(params["workspaces_bytes"]),
                allocator_slack_fraction=float(params["allocator_slack_fraction"]),
                allocator_slack_min_bytes=int(params["allocator_slack_min_bytes"]))
        except KeyError as e:
            raise CalibrationError(f"{path}: missing parameter {e.args[0]}") from None
        except ValueError as e:
            raise CalibrationError(f"{path}: bad parameter value ({e})") from None
        p = self.overheads_params
        for k in ("cuda_context_bytes", "workspaces_bytes", "allocator_slack_min_bytes"):
            if p[k] < 0:
                raise CalibrationError(f"{path}: {k} {p[k]:,} must be ≥ 0")
        if not 0 <= p["allocator_slack_fraction"] < 1:
            raise CalibrationError(f"{path}: allocator_slack_fraction {p['allocator_slack_fraction']} must be in [0, 1)")
        try:
            self.corrections = {k.split(".", 1)[1]: float(v) for k, v in values.items() if k.startswith("correction.")}
            self.heldout = {k.split(".", 1)[1]: float(v) for k, v in values.items() if k.startswith("heldout.") and v}
        except ValueError as e:
            raise CalibrationError(f"{path}: bad correction or held-out value ({e})") from None
        for c, f in self.corrections.items():
            if not 0 < f < 100:  # NaN fails too
                raise CalibrationError(f"{path}: correction.{c} {f} must be a positive factor")
        self.provenance = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("provenance.")}

    def error_summary(self):
        """'held-out device error median 1.2%, p95 3.4%, worst +5.0% (n=12)' or a note that none was measured."""
        h = self.heldout
        if "device.median_after" not in h:
            return "no held-out error measured"
        return (f"held-out device error median {h['device.median_after']:.1%}, p95 {h['device.p95_after']:.1%}, "
                f"worst {h['device.worst_after']:+.1%} (n={self.provenance.get('n_heldout', '?')})")

    @property
    def overheads(self):
        return Overheads(**self.overheads_params, calibrated=True,
                         source=f"calibration {os.path.basename(self.path)}: {self.error_summary()}")


def load_calibration(path):
    """Read a calibration CSV → Calibration; a missing or foreign file is a CalibrationError naming it."""
    from formulas.documents import DocumentError, decode, read_bytes

    try:
        rows = list(csv.reader(io.StringIO(decode(read_bytes(path, 2**20), path), newline="")))
    except DocumentError as e:
        raise CalibrationError(f"cannot read calibration: {e}") from None
    except csv.Error as e:
        raise CalibrationError(f"{path}: not a calibration table ({e})") from None
    if not rows or rows[0][:2] != ["parameter", "value"]:
        raise CalibrationError(f"{path}: not a calibration table (header parameter,value,note expected)")
    return Calibration(path, {r[0]: r[1] for r in rows[1:] if len(r) >= 2})


def gpu_canonical_name(name):
    """The hardware catalog's name for a --gpu or NVML name ('NVIDIA H100 80GB HBM3' → 'H100 SXM'), else None."""
    from formulas.hardware import UnknownGPUError, get_hardware

    for cand in (name, re.sub(r"^(nvidia|amd)\s+(geforce\s+)?", "", name.strip(), flags=re.I)):
        try:
            return get_hardware(cand).name
        except UnknownGPUError:
            continue
    return None


def _tables(directory):
    """Every readable table in `directory` (unreadable ones are skipped)."""
    if not os.path.isdir(directory):
        return
    for fn in sorted(os.listdir(directory)):
        if fn.endswith(".csv"):
            try:
                yield load_calibration(os.path.join(directory, fn))
            except CalibrationError:
                continue


def _newest(tables):
    return max(tables, key=lambda c: c.provenance.get("fitted_at", ""), default=None)


def find_calibration(gpu_name, directory=CALIBRATION_DIR):
    """The newest table whose environment's GPU is `gpu_name` (catalog name or alias), or None.

    Names are matched through the hardware catalog where both resolve, else by alphanumeric substring.
    """
    want = gpu_canonical_name(gpu_name)
    want_key = "".join(ch for ch in gpu_name.lower() if ch.isalnum())

    def matches(cal):
        gpu = cal.provenance.get("environment_key", "").split("|")[0]
        have = gpu_canonical_name(gpu) if gpu else None
        if want and have:
            return want == have
        return bool(want_key) and want_key in "".join(ch for ch in gpu.lower() if ch.isalnum())

    return _newest(c for c in _tables(directory) if matches(c))


def calibration_for_environment(key, directory=CALIBRATION_DIR):
    """The newest table fitted in exactly this environment (harness.env.environment_key), or None."""
    return _newest(c for c in _tables(directory) if c.provenance.get("environment_key") == key)


def overheads_for(gpu=None, path=None, directory=CALIBRATION_DIR):
    """Device overheads for a prediction: the table at `path`, else the newest fitted on `gpu`, else the defaults."""
    cal = load_calibration(path) if path else (find_calibration(gpu, directory) if gpu else None)
    return cal.overheads if cal is not None else DEFAULT_OVERHEADS
