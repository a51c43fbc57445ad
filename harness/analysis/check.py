"""`vramlab check`: compare new records with a baseline, experiment by experiment (as asv and pytest-benchmark do).

Experiments are matched by spec hash. A metric's change counts only if it exceeds *every*
threshold given for that metric (e.g. `peak_device:3%` and `peak_device:256MiB`) and the
run-to-run spread (max − min over repeated records of the same experiment, where a folder holds
repeats). Statuses:

    better | worse | unchanged        both runs ok, compared metric by metric
    new failure                      baseline ok, now oom/error/timeout/crashed
    fixed                            baseline failed, now ok
    still failing                    both failed
    unsupported                      neither side could run it in its mode (e.g. bitsandbytes when traced)
    not comparable                   the same experiment label with another spec hash
    unstable                         repeats of the experiment on one side disagree by more than the
                                     thresholds: no verdict can be given (and the check fails)
    unreadable                       a record file on either side cannot be read (named with the field: an
                                     older schema that cannot be migrated, "written by a newer vramlab", a
                                     NaN, …): the check fails, never skips it
    new | missing                    only in the new records / only in the baseline

Repeats live in subfolders (run1/, run2/, …): two records of one experiment in the same folder are
refused (CheckError naming both files), never one of them picked silently.

Each record is compared on its own observation (harness.records.observed): measured records on
their GPU figures, traced ones on theirs. For a changed experiment the components that moved are
named in the category vocabulary (CUDA context, workspaces, allocator slack, tensor categories)
or as allocated per phase. A regression is `worse` or `new failure`.

Across two environments (the records' `harness.env.environment_key` differ: another GPU, driver, CUDA,
library or allocator setting) the device-level figures are expected to differ — the context and the
workspaces belong to the driver and the card, the reserved bytes to the allocator — while the tensors a
workload holds should not. So there the device level (peak device, peak reserved, CUDA context, and the
device categories) is compared as an *environment effect*: named, never a regression (status
`environment` where nothing else moved), flagged once it exceeds the spread and either threshold of its
metric. The tensor level (peak allocated, and each tensor category at the peak, held to peak allocated's
thresholds) stays a regression as within one environment.
"""

import os
import re
from dataclasses import dataclass, field

from formulas import categories as C
from formulas.documents import DocumentError, load_json
from formulas.units import MiB, parse_size

from ..records import (
    RecordError,
    measured_device_breakdown,
    observed,
    read_record,
    record_files,
)

METRICS = ("peak_device", "peak_allocated", "peak_reserved", "cuda_context")
DEVICE_METRICS = ("peak_device", "peak_reserved", "cuda_context")  # across environments: environment effects
DEFAULT_THRESHOLDS = ("peak_device:3%", "peak_device:256MiB", "peak_allocated:3%", "peak_allocated:256MiB",
                      "peak_reserved:3%", "peak_reserved:256MiB", "cuda_context:3%", "cuda_context:256MiB")
COMPONENT_NAMES = {C.CUDA_CONTEXT: "CUDA context", C.WORKSPACES: "workspaces", C.ALLOCATOR_SLACK: "allocator slack"}
REGRESSIONS = ("worse", "new failure")
ENVIRONMENT = "environment"  # the status of an experiment whose device level alone moved between two environments


class CheckError(ValueError):
    """Bad thresholds or unreadable record folders."""


def parse_thresholds(items):
    """['peak_device:3%', 'peak_device:256MiB'] → {metric: [(kind, value)]}, kind 'rel' (fraction) or 'abs' (bytes)."""
    out = {}
    for item in items:
        metric, sep, val = item.partition(":")
        if not sep or metric not in METRICS:
            raise CheckError(f"--threshold {item}: expected METRIC:VALUE with METRIC one of {', '.join(METRICS)}")
        v = val.strip()
        if not (v.endswith("%") or v[-1:].isalpha()):
            raise CheckError(f"--threshold {item}: {v!r} has no unit; give a percentage (3%) or a size (256MiB)")
        try:
            if v.endswith("%"):
                entry = ("rel", float(v[:-1]) / 100)
                if not 0 < entry[1] <= 10:  # NaN fails too
                    raise ValueError
            else:
                entry = ("abs", parse_size(v, minimum=1))
        except ValueError:
            raise CheckError(f"--threshold {item}: {v!r} is neither a positive percentage (3%) nor a size "
                             "(256MiB)") from None
        out.setdefault(metric, []).append(entry)
    return out


MIN_OVERLAP = 0.5  # a check compares at least this share of the baseline's experiments, or fails


def coverage_problem(comparisons):
    """Why the two sets do not overlap enough to compare, or None: the new records must hold at least
    MIN_OVERLAP of the baseline's experiments."""
    base = [c for c in comparisons if c.status != "new" and not c.file]
    missing = sum(c.status in ("missing", "not comparable", "unreadable") for c in base)
    if not base:
        return "the baseline holds no experiment"
    if len(base) - missing < MIN_OVERLAP * len(base):
        return (f"only {len(base) - missing} of the baseline's {len(base)} experiments can be compared in the new "
                f"records ({missing} missing or not comparable)")
    return None


def load_runs(path, unreadable=None):
    """{spec_hash: [records]} under a file or folder. A record that cannot be read in the current schema
    stays as a stand-in {spec_hash, outcome, unreadable: why}, so its experiment is named unreadable; a file
    that is no record at all (not JSON, no spec_hash) goes to `unreadable` as (path, why).
    Two records of one experiment in the same folder are a CheckError: repeats go in subfolders."""
    skipped = unreadable if unreadable is not None else []
    files = record_files(path, on_skip=lambda p, e: skipped.append((p, str(e))))
    if not files:
        raise CheckError(f"{path}: no record files")
    out, where = {}, {}
    for f in files:
        try:
            rec = read_record(f)
        except RecordError as e:
            try:
                raw = load_json(f)
            except DocumentError:
                raw = None
            if not (isinstance(raw, dict) and isinstance(raw.get("spec_hash"), str) and "outcome" in raw):
                skipped.append((f, str(e)))
                continue
            rec = {"spec_hash": raw["spec_hash"], "spec": raw.get("spec") if isinstance(raw.get("spec"), dict) else {},
                   "outcome": raw["outcome"], "group": raw.get("group", ""), "unreadable": str(e)}
        h = rec["spec_hash"]
        folder = os.path.dirname(f)
        twin = next((g for g in where.get(h, ()) if os.path.dirname(g) == folder), None)
        if twin is not None:
            raise CheckError(f"{twin} and {f} are both records of experiment {h} in one folder; one folder holds one "
                             "record per experiment (repeats go in subfolders): remove one")
        where.setdefault(h, []).append(f)
        out.setdefault(h, []).append(rec)
    if not out:
        raise CheckError(f"{path}: no vramlab records")
    return out


def _label(rec):
    s = rec.get("spec") or {}
    # the run fields that make another experiment of the same spec: a cap, the allocator's settings (the twins)
    run = "|".join(str(rec.get(k) or "") for k in ("cap_gpu", "alloc_conf"))
    return "|".join(str(s.get(k)) for k in ("model", "mode", "method", "dtype", "batch", "seq", "gen", "optimizer",
                                            "grad_ckpt", "attn")) + f"|{rec.get('group', '')}|{run}"


def metric_value(rec, metric):
    """Bytes of one metric in a record's own observation, or None."""
    return observed(rec).get(f"{metric}_bytes")


def components(rec):
    """{component: bytes}: the device categories, allocated per phase and the tensor categories at the peak."""
    m = observed(rec)
    dev = m.get("device_breakdown") or (measured_device_breakdown(m) if rec.get("source") == "measured" else {})
    out = {c: v for c, v in dev.items() if v is not None}
    for ph, d in (m.get("phases") or {}).items():
        if not isinstance(d, dict):
            continue
        if rec.get("source") in ("traced", "rehearsed"):  # a tracker's phase is its breakdown at the phase's peak
            out[f"allocated at {ph}"] = sum(d.values())
        elif d.get("max_allocated_bytes") is not None:
            out[f"allocated at {ph}"] = d["max_allocated_bytes"]
    for c, v in (m.get("breakdown") or {}).items():
        out[c] = v
    return out


def _mib(n):
    return f"{n / MiB:+,.0f} MiB"


@dataclass
class Comparison:
    """One experiment's verdict."""

    spec_hash: str
    label: str
    status: str
    metrics: dict = field(default_factory=dict)  # metric → (baseline, new, delta, counted)
    moved: list = field(default_factory=list)  # "CUDA context +300 MiB", largest first
    detail: str = ""
    environment: list = field(default_factory=list)  # across environments: device-level moves, "CUDA context -89 MiB"
    file: str = ""  # a file that is no readable record at all (its experiment unknown)

    def line(self):
        parts = [f"{self.status:<15} {self.spec_hash}  {self.label}"]
        for metric, (b, n, d, counted) in self.metrics.items():
            if counted:
                parts.append(f"{metric} {_mib(d)} ({d / b:+.1%})" if b else f"{metric} {_mib(d)}")
        if self.moved:
            parts.append("moved: " + ", ".join(self.moved))
        if self.environment:
            parts.append("environment: " + ", ".join(self.environment))
        if self.detail:
            parts.append(self.detail)
        return "  ".join(parts)


def _exceeds(delta, base, spread, rules):
    if abs(delta) <= spread:
        return False
    for kind, val in rules:
        if kind == "rel" and (not base or abs(delta) / base <= val):
            return False
        if kind == "abs" and abs(delta) <= val:
            return False
    return True


def _exceeds_any(delta, base, spread, rules):
    """An environment effect is named once it exceeds the spread and any one threshold (it is never a failure)."""
    if abs(delta) <= spread:
        return False
    return any((abs(delta) / base > val if base else True) if kind == "rel" else abs(delta) > val
               for kind, val in rules)


def _environment(recs):
    from ..env import environment_key

    return environment_key(recs[0].get("env") or {})


def _spread(recs, metric):
    vals = [v for r in recs if r.get("outcome") == "ok" and (v := metric_value(r, metric)) is not None]
    return max(vals) - min(vals) if len(vals) > 1 else 0


def _median(vals):
    vals = sorted(vals)
    return vals[len(vals) // 2] if len(vals) % 2 else (vals[len(vals) // 2 - 1] + vals[len(vals) // 2]) / 2


def compare_experiment(h, base_recs, new_recs, thresholds):
    """Verdict for one spec hash present on both sides."""
    b0, n0 = base_recs[0], new_recs[0]
    s = n0.get("spec") or {}
    label = f"{s.get('model')} {s.get('mode')} {s.get('dtype')} b{s.get('batch')} s{s.get('seq')}"
    unreadable = [r["unreadable"] for r in base_recs + new_recs if "unreadable" in r]
    if unreadable:
        return Comparison(h, label, "unreadable", detail=unreadable[0])
    b_ok = any(r.get("outcome") == "ok" for r in base_recs)
    n_ok = any(r.get("outcome") == "ok" for r in new_recs)
    if b_ok and not n_ok:
        return Comparison(h, label, "new failure", detail=f"now {n0.get('outcome')}: {(n0.get('error') or {}).get('message', '')[:120]}")
    if not b_ok and n_ok:
        return Comparison(h, label, "fixed", detail=f"was {b0.get('outcome')}")
    if not b_ok and not n_ok:
        if b0.get("outcome") == n0.get("outcome") == "unsupported":
            return Comparison(h, label, "unsupported", detail=(n0.get("error") or {}).get("message", "")[:120])
        return Comparison(h, label, "still failing", detail=f"{b0.get('outcome')} → {n0.get('outcome')}")
    base_ok = [r for r in base_recs if r.get("outcome") == "ok"]
    new_ok = [r for r in new_recs if r.get("outcome") == "ok"]
    across = _environment(base_ok) != _environment(new_ok)
    cmp = Comparison(h, label, "unchanged")
    worse = better = False
    env_moved = []
    for metric, rules in thresholds.items():
        bv = [v for r in base_ok if (v := metric_value(r, metric)) is not None]
        nv = [v for r in new_ok if (v := metric_value(r, metric)) is not None]
        if not bv or not nv:
            continue
        b, n = _median(bv), _median(nv)
        for side, vals, mid in (("baseline", bv, b), ("new", nv, n)):
            if len(vals) > 1 and _exceeds(max(vals) - min(vals), mid, 0, rules):  # repeats that disagree: no verdict
                return Comparison(h, label, "unstable", detail=f"{len(vals)} {side} records disagree on {metric}: "
                                                               f"{min(vals) / MiB:,.0f} to {max(vals) / MiB:,.0f} MiB")
        spread = max(_spread(base_ok, metric), _spread(new_ok, metric))
        if across and metric in DEVICE_METRICS:
            cmp.metrics[metric] = (b, n, n - b, False)  # an environment effect, never a regression
            if _exceeds_any(n - b, b, spread, rules):
                env_moved.append(metric)
            continue
        counted = _exceeds(n - b, b, spread, rules)
        cmp.metrics[metric] = (b, n, n - b, counted)
        worse |= counted and n > b
        better |= counted and n < b
    cb, cn = components(base_ok[0]), components(new_ok[0])
    abs_floor = min([v for rules in thresholds.values() for k, v in rules if k == "abs"] or [256 * MiB]) / 4
    if across:
        # the tensor categories at the peak, each held to peak allocated's thresholds (of peak allocated)
        rules = thresholds.get("peak_allocated") or parse_thresholds(DEFAULT_THRESHOLDS)["peak_allocated"]
        base_alloc = metric_value(base_ok[0], "peak_allocated") or 0
        for c in C.TENSOR_CATEGORIES:
            if c in cb and c in cn and _exceeds(cn[c] - cb[c], base_alloc, 0, rules):
                worse |= cn[c] > cb[c]
                better |= cn[c] < cb[c]
        # the device level and the cuBLAS workspaces (inside the allocated peak, sized by architecture)
        device = [(cn[k] - cb[k], k) for k in C.DEVICE_CATEGORIES + (C.WORKSPACES,)
                  if cb.get(k) is not None and cn.get(k) is not None and abs(cn[k] - cb[k]) >= abs_floor / 4]
        if env_moved or any(abs(d) >= abs_floor for d, _ in device):
            device.sort(key=lambda t: -abs(t[0]))
            cmp.environment = [f"{COMPONENT_NAMES.get(k, k)} {_mib(d)}" for d, k in device] or env_moved
    cmp.status = "worse" if worse else "better" if better else ENVIRONMENT if cmp.environment else "unchanged"
    if cmp.status in ("worse", "better"):
        skip = set(C.DEVICE_CATEGORIES + (C.WORKSPACES,)) if across else set()  # across environments: named apart
        moved = [(cn[k] - cb[k], k) for k in cb if k in cn and k not in skip and abs(cn[k] - cb[k]) >= abs_floor]
        moved.sort(key=lambda t: -abs(t[0]))
        cmp.moved = [f"{COMPONENT_NAMES.get(k, k)} {_mib(d)}" for d, k in moved]
    return cmp


def check(baseline_path, new_path, thresholds=None):
    """[Comparison] for every experiment in either set, baseline order first."""
    thresholds = parse_thresholds(thresholds or DEFAULT_THRESHOLDS)
    skipped = []
    base, new = load_runs(baseline_path, skipped), load_runs(new_path, skipped)
    out = [Comparison(os.path.splitext(os.path.basename(p))[0], p, "unreadable", detail=why, file=p)
           for p, why in skipped]
    base_labels = {_label(v[0]): h for h, v in base.items()}
    new_labels = {_label(v[0]): h for h, v in new.items()}
    for h in sorted(base):
        if h in new:
            out.append(compare_experiment(h, base[h], new[h], thresholds))
        elif _label(base[h][0]) in new_labels:
            out.append(Comparison(h, _label(base[h][0]).replace("|", " "), "not comparable",
                                  detail=f"spec hash changed to {new_labels[_label(base[h][0])]}"))
        else:
            out.append(Comparison(h, _label(base[h][0]).replace("|", " "), "missing"))
    for h in sorted(new):
        if h not in base and _label(new[h][0]) not in base_labels:
            out.append(Comparison(h, _label(new[h][0]).replace("|", " "), "new"))
    return out


def _mib_of(item):
    """'CUDA context -89 MiB' → ('CUDA context', -89)."""
    m = re.fullmatch(r"(.*) ([+-][\d,]+) MiB", item)
    return (m.group(1), int(m.group(2).replace(",", ""))) if m else (item, 0)


def summarize(comparisons):
    """Headline lines: counts per status, components that moved in several experiments alike, and (across
    environments) the device-level differences the environments account for."""
    counts = {}
    for c in comparisons:
        counts[c.status] = counts.get(c.status, 0) + 1
    lines = [", ".join(f"{k} {v}" for k, v in sorted(counts.items()))]
    moved = {}
    for c in comparisons:
        for m in c.moved:
            name = re.sub(r" [+-][\d,]+ MiB$", "", m)
            moved.setdefault(name, []).append(m)
    for name, ms in sorted(moved.items(), key=lambda t: -len(t[1])):
        if len(ms) > 1:
            lines.append(f"{name} moved in {len(ms)} experiments (e.g. {ms[0]})")
    effects = {}
    for c in comparisons:
        for item in c.environment:
            name, mib = _mib_of(item)
            effects.setdefault(name, []).append(mib)
    for name, ds in sorted(effects.items(), key=lambda t: -len(t[1])):
        lines.append(f"environment effect: {name} differs in {len(ds)} experiments (median {_median(ds):+,.0f} MiB)")
    if effects:
        lines.append("the two sets come from different environments: device-level figures (context, workspaces, "
                     "allocator slack, reserved, device peak) are compared as environment effects, tensor categories "
                     "and peak allocated as regressions")
    return lines


def is_regression(comparisons):
    return any(c.status in REGRESSIONS for c in comparisons)
