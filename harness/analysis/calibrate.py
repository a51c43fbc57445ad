"""Calibration: fit what the predictor cannot know about one environment, from that environment's records.

Why: the tensors, the cuBLAS workspaces and the allocator's behaviour are computed (formulas/,
formulas/device.py, the slack rules derived from the allocator simulation). What is left depends
on the driver, CUDA and the library builds of one machine: how much CUDA initialisation takes, how
much the lazily loaded kernel images take, and how far the allocator's slack in these workloads
departs from the rules. Those are fitted per environment (`harness.env.environment_key`) from
measured records, never mixed across environments:

- `cuda_context_bytes`: the median of the records' own `cuda_context_bytes` (measured right after
  CUDA init, before any workload);
- `kernel_images.<family>` (formulas.device.KERNEL_IMAGES): least squares of what the device peak
  holds outside the allocator (peak device − peak reserved − the context) on which kernel families
  the record's process had loaded by then (a warm worker keeps earlier experiments' images);
- `slack_share.<mode>`: the median of (measured reserved − measured allocated − what loading the
  weights leaves, formulas.predict.load_slack) / the peak phase's predicted transient bytes, per mode
  (inference, train).

Accuracy is reported held out by model: for each model, the table is fitted on the records of every
other model and scores that model's records (`heldout_by_model`); random splits of one model's
records would not count. The table written is fitted on all records.

Output contract: `results/calibration/<env-slug>.csv`, columns `parameter,value,note`; rows are the
parameters (bytes as integers), `heldout.<metric>.<stat>_<before|after>` (relative errors, fractions)
and `provenance.*` (environment, architecture, time, records, the models held out).

Lookup: `overheads_for(gpu, path)` is the one way `vramlab predict` and `vramlab plan` find a
table — the file given, else the newest table fitted on that GPU, else the uncalibrated defaults
for that GPU's architecture.
"""

import csv
import datetime
import hashlib
import io
import os
import re

from formulas.device import KERNEL_IMAGES
from formulas.overhead import SLACK_RULES, Overheads, default_overheads

from ..paths import CALIBRATION_DIR

# numpy and harness.env are imported inside the fitting functions: `vramlab predict` imports this
# module only to load a table and must stay light.

FAMILIES = tuple(KERNEL_IMAGES)
MODES = ("inference", "train")
PARAMETERS = ("cuda_context_bytes",) + tuple(f"kernel_images.{f}" for f in FAMILIES) + \
    tuple(f"slack_share.{m}" for m in MODES)


class CalibrationError(ValueError):
    """Records that cannot be calibrated, or a calibration file that cannot be read."""


def env_slug(key):
    """A file-name-safe slug of an environment key, e.g. 'nvidia-h100-80gb-hbm3_550.54.15_12.4_2.5.1_…'."""
    parts = [re.sub(r"[^a-z0-9.]+", "-", p.lower()).strip("-") or "none" for p in key.split("|")]
    return "_".join(parts)


def usable(rec):
    """A measured, successful record with allocated, reserved and device peaks and no other process on the GPU (a
    published record that states both is read as one: harness.analysis.published.measured_view)."""
    m = rec.get("measured") or {}
    return (rec.get("outcome") == "ok" and rec.get("source") in ("measured", "published")
            and m.get("peak_allocated_bytes") is not None and m.get("peak_device_bytes") is not None
            and not m.get("device_figures_flagged") and isinstance(rec.get("spec"), dict))


def model_of(rec):
    return (rec.get("spec") or {}).get("model", "")


def _predictions(recs, overheads, loaded):
    """[(record, Prediction, predicted device bytes)] with `overheads`; records the formulas refuse are left out."""
    from formulas.spec import SpecError

    from .repredict import repredict

    out = []
    for r in recs:
        try:
            p, dev = repredict(r, overheads, loaded.get(r["spec_hash"], ()))
        except (SpecError, ValueError, KeyError):
            continue
        out.append((r, p, dev))
    return out


def _transient(p, overheads):
    """The predicted transient bytes of the peak phase (what the slack rule scales)."""
    return overheads.transient(p.phases.get(p.peak_phase, p.breakdown))


def fit_overheads(recs, base, loaded):
    """Overheads fitted on `recs` (one environment), starting from `base` (the architecture's defaults)."""
    import numpy as np

    m = [r["measured"] for r in recs]
    ctx_meas = [x["cuda_context_bytes"] for x in m if x.get("cuda_context_bytes") is not None]
    context = int(np.median(ctx_meas)) if ctx_meas else base.cuda_context_bytes
    if not ctx_meas and not any(x.get("peak_reserved_bytes") for x in m):
        # a published set that states the allocated and the device figure only: slack and context cannot be told
        # apart, so the rules' slack stands and the context takes the rest
        rest = [r["measured"]["peak_device_bytes"] - r["measured"]["peak_allocated_bytes"]
                - (p.peak_reserved_bytes - p.peak_allocated_bytes) - (base.context(p.spec) - base.cuda_context_bytes)
                for r, p, _ in _predictions(recs, base, loaded)]
        if rest:
            context = max(int(np.median(rest)), 0)
    # kernel images: outside the allocator less the context, on the families loaded by then — the median of each
    # set of families (robust to a record disturbed by another process), then least squares over the sets
    groups = {}
    preds = _predictions(recs, base, loaded)
    for r, p, _ in preds:
        x = r["measured"]
        if x.get("peak_reserved_bytes") is None:
            continue
        fams = frozenset(set(loaded.get(r["spec_hash"], ())) | set(_families(p.spec)))
        groups.setdefault(fams, []).append(x["peak_device_bytes"] - x["peak_reserved_bytes"] - context)
    images = dict(base.kernel_images)
    if groups:
        A = np.asarray([[1.0 if f in fams else 0.0 for f in FAMILIES] for fams in groups])
        y = np.asarray([np.median(v) for v in groups.values()])
        w = np.sqrt(np.asarray([len(v) for v in groups.values()], float))
        seen = A.any(axis=0)
        sol, *_ = np.linalg.lstsq(A[:, seen] * w[:, None], y * w, rcond=None)
        for f, v in zip([f for f, s in zip(FAMILIES, seen) if s], sol):
            images[f] = max(int(round(v)), 0)
    # slack: per mode, the median share of the transient bytes beyond what loading the weights left
    from formulas.catalog import get_shape
    from formulas.predict import load_slack, workload_static
    from formulas.spec import validate

    share = dict(base.slack_share)
    for mode in MODES:
        ratios = []
        for r, p, _ in preds:
            x = r["measured"]
            tr = _transient(p, base)
            if p.spec.mode != mode or tr <= 0 or x.get("peak_reserved_bytes") is None:
                continue
            loaded = load_slack(workload_static(validate(p.spec, get_shape(p.spec.model))), base)
            ratios.append((x["peak_reserved_bytes"] - x["peak_allocated_bytes"] - loaded) / tr)
        if ratios:
            share[mode] = max(float(np.median(ratios)), 0.0)
    return Overheads(cc=base.cc, cuda_context_bytes=context, kernel_images=tuple(images.items()),
                     cublas_workspace=base.cublas_workspace, environ=base.environ,
                     slack_fixed_bytes=base.slack_fixed_bytes, slack_share=tuple(share.items()),
                     source="fit", calibrated=True)


def _families(spec):
    from formulas.device import kernel_families

    return kernel_families(spec)


def _errors(preds):
    """{metric: [relative errors]} of (record, prediction, device) triples."""
    out = {"allocated": [], "reserved": [], "device": []}
    for r, p, dev in preds:
        x = r["measured"]
        out["allocated"].append(p.peak_allocated_bytes / x["peak_allocated_bytes"] - 1)
        if x.get("peak_reserved_bytes"):
            out["reserved"].append(p.peak_reserved_bytes / x["peak_reserved_bytes"] - 1)
        out["device"].append(dev / x["peak_device_bytes"] - 1)
    return out


def heldout_by_model(recs, base, loaded):
    """Leave-one-model-out: each model's records scored by a table fitted on every other model's.

    Returns ({metric: {stat_before|stat_after: value}}, [per-record rows]) — before: `base` (the uncalibrated
    defaults), after: the table that never saw the model."""
    from .stats import error_stats

    models = sorted({model_of(r) for r in recs})
    before_preds, after_preds, rows = [], [], []
    for model in models:
        mine = [r for r in recs if model_of(r) == model]
        others = [r for r in recs if model_of(r) != model]
        if not others:
            continue
        ov = fit_overheads(others, base, loaded)
        b = _predictions(mine, base, loaded)
        a = _predictions(mine, ov, loaded)
        before_preds += b
        after_preds += a
        for (r, p0, d0), (_, p1, d1) in zip(b, a):
            x = r["measured"]
            rows.append({"spec_hash": r["spec_hash"], "model": model, "mode": p0.spec.mode,
                         "measured_device_bytes": x["peak_device_bytes"], "predicted_device_bytes": d0,
                         "calibrated_device_bytes": d1})
    out = {}
    eb, ea = _errors(before_preds), _errors(after_preds)
    for metric in eb:
        stats = {}
        for tag, errs in (("before", eb[metric]), ("after", ea[metric])):
            for k, v in error_stats(errs).items():
                if k != "n":
                    stats[f"{k}_{tag}"] = v
            stats["n"] = len(errs)
        out[metric] = stats
    return out, rows


def fit(records, now=None):
    """Fit one environment's records → a result dict (the Overheads, held-out-by-model errors, provenance)."""
    from ..env import environment_key
    from .repredict import gpu_hardware, loaded_before

    from formulas.device import compute_capability

    recs = [r for r in records if usable(r)]
    if not recs:
        raise CalibrationError("no usable records: need outcome ok, source measured, allocated and device peaks")
    keys = sorted({environment_key(r.get("env") or {}) for r in recs})
    if len(keys) > 1:
        raise CalibrationError(f"records from {len(keys)} environments ({'; '.join(keys)}); fit one at a time with --env")
    cc = compute_capability(gpu_hardware(recs[0]))
    base = default_overheads(cc)
    loaded = loaded_before(recs)
    overheads = fit_overheads(recs, base, loaded)
    models = sorted({model_of(r) for r in recs})
    heldout, rows = heldout_by_model(recs, base, loaded) if len(models) > 1 else ({}, [])
    now = now or datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()
    return {
        "environment_key": keys[0],
        "cc": base.cc,
        "overheads": overheads,
        "heldout": heldout,
        "heldout_rows": rows,
        "fit_quality": {"n_fit": len(recs), "n_models": len(models)},
        "fitted_at": now,
        "models": models,
        "fit_spec_hashes": sorted(r["spec_hash"] for r in recs),
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
    images, share = dict(ov.kernel_images), dict(ov.slack_share)
    rows = [("cuda_context_bytes", ov.cuda_context_bytes, "median measured context right after CUDA init")]
    for f in FAMILIES:
        rows.append((f"kernel_images.{f}", images.get(f, 0),
                     "least squares: device − reserved − context on the kernel families loaded by then"))
    for m in MODES:
        rows.append((f"slack_share.{m}", f"{share.get(m, SLACK_RULES[m][1]):.6f}",
                     "median (reserved − allocated − the weights' load slack) / predicted transient bytes"))
    for metric, stats in sorted(result["heldout"].items()):
        for k, v in stats.items():
            rows.append((f"heldout.{metric}.{k}", "" if v is None else (v if k == "n" else f"{v:.6f}"),
                         "relative error, each model scored by a table fitted on the other models"))
    q = result["fit_quality"]
    rows += [
        ("provenance.environment_key", result["environment_key"], "gpu|driver|cuda|torch|transformers|bitsandbytes"),
        ("provenance.compute_capability", f"{result['cc'][0]}.{result['cc'][1]}", "of the records' GPU"),
        ("provenance.fitted_at", result["fitted_at"], "UTC"),
        ("provenance.records_path", records_path, ""),
        ("provenance.n_fit", q["n_fit"], "every usable record"),
        ("provenance.models", " ".join(result["models"]), "held out one at a time for the heldout.* rows"),
        ("provenance.formula_hashes", " ".join(result["formula_hashes"]), ""),
        ("provenance.fit_spec_hashes", " ".join(result["fit_spec_hashes"]), ""),
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
    """A loaded table: `overheads` (an Overheads naming the file), `heldout`, `provenance`."""

    def __init__(self, path, values):
        self.path = path
        self.values = values
        if "workspaces_bytes" in values or "allocator_slack_fraction" in values:
            raise CalibrationError(f"{path}: a table of the older format (context + workspaces + a slack fraction); "
                                   "fit it again with `vramlab fit` from its records")
        try:
            cc = tuple(int(x) for x in values.get("provenance.compute_capability", "9.0").split("."))
            self.params = dict(
                cc=cc, cuda_context_bytes=int(values["cuda_context_bytes"]),
                kernel_images=tuple((f, int(values[f"kernel_images.{f}"])) for f in FAMILIES),
                slack_share=tuple((m, float(values[f"slack_share.{m}"])) for m in MODES) + (("load", 0.0),))
        except KeyError as e:
            raise CalibrationError(f"{path}: missing parameter {e.args[0]}") from None
        except ValueError as e:
            raise CalibrationError(f"{path}: bad parameter value ({e})") from None
        if self.params["cuda_context_bytes"] < 0 or any(v < 0 for _, v in self.params["kernel_images"]):
            raise CalibrationError(f"{path}: the context and kernel images must be ≥ 0 bytes")
        if not all(0 <= v < 10 for _, v in self.params["slack_share"]):  # NaN fails too
            raise CalibrationError(f"{path}: slack shares must be in [0, 10)")
        try:
            self.heldout = {k.split(".", 1)[1]: float(v) for k, v in values.items() if k.startswith("heldout.") and v}
        except ValueError as e:
            raise CalibrationError(f"{path}: bad held-out value ({e})") from None
        self.provenance = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("provenance.")}

    def error_summary(self):
        """'device error held out by model: median 1.2%, p95 3.4% (n=62)' or a note that none was measured."""
        h = self.heldout
        if "device.median_after" not in h:
            return "no held-out error measured"
        return (f"device error held out by model: median {h['device.median_after']:.1%}, p95 "
                f"{h['device.p95_after']:.1%} (n={int(h.get('device.n', 0))})")

    @property
    def overheads(self):
        return Overheads(**self.params, calibrated=True,
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

    found = [c for c in _tables(directory) if matches(c)]
    # a table fitted under non-default allocator settings (`alloc=` in its key) answers only when there is no other
    default = [c for c in found if "|alloc=" not in c.provenance.get("environment_key", "")]
    return _newest(default or found)


def calibration_for_environment(key, directory=CALIBRATION_DIR):
    """The newest table fitted in exactly this environment (harness.env.environment_key), or None."""
    return _newest(c for c in _tables(directory) if c.provenance.get("environment_key") == key)


def overheads_for(gpu=None, path=None, directory=CALIBRATION_DIR):
    """Device overheads for a prediction: the table at `path`, else the newest fitted on `gpu`, else the
    uncalibrated defaults for `gpu`'s architecture."""
    cal = load_calibration(path) if path else (find_calibration(gpu, directory) if gpu else None)
    if cal is not None:
        return cal.overheads
    from formulas.device import compute_capability
    from formulas.hardware import UnknownGPUError, get_hardware

    try:
        hw = get_hardware(gpu) if gpu else None
    except UnknownGPUError:
        hw = None
    return default_overheads(compute_capability(hw))
