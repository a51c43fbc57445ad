"""`vramlab report`: how good are the predictions? A self-contained HTML page and a Markdown twin.

Every comparison names its source and quantity: the prediction against the *measured* peak
allocated and peak device (GPU records), and against the *traced* peak allocated (fake-tensor
records, which have no device figure — a traced allocated peak is never scored or plotted as a
device peak). Beside vramlab's prediction the report scores the usual rules of thumb on the same
experiments, so the comparison is like for like:

    weights × 1.2              inference: "add 20% to the weights"
    weights + 20%              training, the same rule applied to fine-tuning
    16 bytes per parameter     full training with Adam in mixed precision (2 + 2 + 4 + 4 + 4)

The rules estimate what a GPU must hold, so they are scored against the measured device peak;
where only traced records exist, against the traced peak allocated, and labelled so. Relative
error = (predicted − observed) / observed. Outputs: report.html (PNGs embedded as base64, no
other files needed), report.md and the PNGs beside it. Plots use matplotlib's Agg backend.
"""

import base64
import html
import os

import numpy as np

from formulas import categories as C
from formulas.units import GiB, MiB

from ..env import environment_label
from ..records import measured_device_breakdown, observed
from .stats import error_stats, relative_errors

RULES = (
    ("weights × 1.2 (inference)", "inference", lambda w, n: 1.2 * w),
    ("weights + 20% (training)", "train", lambda w, n: 1.2 * w),
    ("16 bytes per parameter (training)", "train", lambda w, n: 16 * n),
)
# (observed source, quantity): what a prediction is compared with, in the order the report shows them.
TARGETS = (("measured", "device"), ("measured", "allocated"), ("traced", "allocated"), ("rehearsed", "allocated"),
           ("published", "device"), ("published", "reserved"), ("published", "allocated"),
           ("published", "allocated+context"))


def _target_label(source, quantity):
    return f"{source} peak {quantity}"


def _rows(records):
    """One dict per ok record with a prediction and an observation, values keyed by source."""
    from .published import observed_for_prediction

    rows = []
    for r in records:
        p, o, source = r.get("predicted") or {}, observed(r), r.get("source")
        if source == "published" and r.get("outcome") == "ok":
            scored = observed_for_prediction(r)  # one figure, of the kind the source measured
            if scored:
                quantity, value, predicted = scored
                bd = p.get("breakdown") or {}
                rows.append({
                    "spec_hash": r["spec_hash"], "mode": (r.get("spec") or {}).get("mode"), "source": source,
                    "env": f"{(r.get('citation') or {}).get('set', '?')} · {(r.get('published') or {}).get('gpu') or '?'} (published)",
                    "predicted": {"allocated": p["peak_allocated_bytes"], "device": p.get("peak_device_bytes"),
                                  quantity: predicted},
                    "observed": {(source, quantity): value},
                    "weights": bd.get(C.WEIGHTS, 0) + bd.get(C.QUANT_STATE, 0), "n_params": p.get("n_params") or 0,
                    "predicted_breakdown": bd, "observed_breakdown": {}, "device_breakdown": {},
                })
            continue
        if r.get("outcome") != "ok" or "peak_allocated_bytes" not in p or o.get("peak_allocated_bytes") is None:
            continue
        bd = p.get("breakdown") or {}
        device_bd = o.get("device_breakdown") or (measured_device_breakdown(o) if source == "measured" else {})
        rows.append({
            "spec_hash": r["spec_hash"], "mode": (r.get("spec") or {}).get("mode"), "source": source,
            "env": f"{environment_label(r.get('env') or {})} ({source})",
            "predicted": {"allocated": p["peak_allocated_bytes"], "device": p.get("peak_device_bytes")},
            "observed": {(source, "allocated"): o["peak_allocated_bytes"],
                         (source, "device"): o.get("peak_device_bytes") if source == "measured" else None},
            "weights": bd.get(C.WEIGHTS, 0) + bd.get(C.QUANT_STATE, 0), "n_params": p.get("n_params") or 0,
            "predicted_breakdown": bd, "observed_breakdown": o.get("breakdown") or {}, "device_breakdown": device_bd,
        })
    return rows


def _with(rows, target):
    return [r for r in rows if r["observed"].get(target) is not None]


def category_ratios(rows):
    """{(category, source): [observed/predicted]} over tensor categories and device categories."""
    out = {}
    for r in rows:
        bd = r["predicted_breakdown"]
        for c, v in list(r["observed_breakdown"].items()) + list(r["device_breakdown"].items()):
            if v is not None and bd.get(c):
                out.setdefault((c, r["source"]), []).append(v / bd[c])
    return out


def summary(records):
    """The report's tables (lists of dicts) and the error series behind its plots."""
    rows = _rows(records)
    scores, errors = [], {}
    for target in TARGETS:
        sel = _with(rows, target)
        if not sel:
            continue
        label = _target_label(*target)
        quantity = target[1]
        e = relative_errors([r["predicted"][quantity] for r in sel], [r["observed"][target] for r in sel])
        errors[f"vramlab vs {label}"] = e
        scores.append({"predictor": "vramlab", "against": label, **error_stats(e)})
    # Rules of thumb: against what the GPU held, else (traced only) against the traced allocated peak.
    rule_target = next((t for t in (("measured", "device"), ("traced", "allocated")) if _with(rows, t)), None)
    if rule_target:
        label, same = _target_label(*rule_target), set()
        for name, mode, rule in RULES:
            sel = [r for r in _with(rows, rule_target) if r["mode"] == mode and r["weights"]]
            e = relative_errors([rule(r["weights"], r["n_params"]) for r in sel], [r["observed"][rule_target] for r in sel])
            errors[f"rule: {name}"] = e
            scores.append({"predictor": f"rule: {name}", "against": label, **error_stats(e)})
            if mode in same:
                continue
            same.add(mode)
            # vramlab on the same subset, so the comparison is like for like
            e2 = relative_errors([r["predicted"][rule_target[1]] for r in sel], [r["observed"][rule_target] for r in sel])
            scores.append({"predictor": f"vramlab on the same {mode} experiments", "against": label, **error_stats(e2)})
    cats = [{"category": c, "source": src, "n": len(v), "median_ratio": float(np.median(v)),
             "p95_abs_error": float(np.percentile(np.abs(np.asarray(v) - 1), 95))}
            for (c, src), v in sorted(category_ratios(rows).items())]
    envs = {}
    for r in rows:  # per environment: the device peak where measured, else the allocated peak
        target = (r["source"], "device") if r["observed"].get((r["source"], "device")) is not None \
            else (r["source"], "allocated")
        if r["observed"].get(target) is None:  # a published figure of another kind (reserved, allocated+context)
            target = next(k for k, v in r["observed"].items() if v is not None)
        err = relative_errors([r["predicted"][target[1]]], [r["observed"][target]])[0]
        envs.setdefault((r["env"], _target_label(*target)), []).append(err)
    env_tab = [{"environment": k, "against": t, **error_stats(v)} for (k, t), v in sorted(envs.items())]
    return rows, scores, errors, cats, env_tab, envs


TOTALS = (("peak allocated", "peak_allocated_bytes"), ("peak device", "peak_device_bytes"))


def category_table(records):
    """Measured (or traced) against predicted, per environment, mode and memory category: one row each.

    For every ok record with an observed breakdown: the tensor categories at the peak (the category tracker's),
    the device categories (measured: context, workspaces, allocator slack) and the two peaks. Per row: how many
    records, the sums observed and predicted (GiB), the error of the sums, and the median |error| per record
    (records where the category was observed above zero). Rows in the vocabulary's order."""
    groups = {}
    for r in records:
        o, p, source = observed(r), r.get("predicted") or {}, r.get("source")
        if r.get("outcome") != "ok" or source == "published" or not isinstance(p.get("breakdown"), dict):
            continue
        bd = o.get("breakdown") or {}
        dev = o.get("device_breakdown") or (measured_device_breakdown(o) if source == "measured" else {})
        if not bd:
            continue
        key = (f"{_short_environment(r.get('env') or {})} ({source})", (r.get("spec") or {}).get("mode", "?"))
        rows = groups.setdefault(key, {})
        pbd = p["breakdown"]
        pairs = [(c, bd.get(c), pbd.get(c, 0)) for c in C.TENSOR_CATEGORIES]
        pairs += [(c, dev.get(c), pbd.get(c, 0)) for c in C.DEVICE_CATEGORIES if source == "measured"]
        pairs += [(name, o.get(k), p.get(k)) for name, k in TOTALS if source == "measured" or k == TOTALS[0][1]]
        for cat, obs, pred in pairs:
            if obs is None or pred is None or (not obs and not pred):
                continue
            rows.setdefault(cat, []).append((obs, pred))
    order = list(C.TENSOR_CATEGORIES) + list(C.DEVICE_CATEGORIES) + [name for name, _ in TOTALS]
    out = []
    for (env, mode), rows in sorted(groups.items()):
        for cat in sorted(rows, key=order.index):
            pairs = rows[cat]
            obs, pred = sum(o for o, _ in pairs), sum(q for _, q in pairs)
            per = [abs(q - o) / o for o, q in pairs if o >= MiB]  # a relative error of a few bytes says nothing
            out.append({"environment": env, "mode": mode, "category": cat, "n": len(pairs),
                        "observed GiB": f"{obs / GiB:,.2f}", "predicted GiB": f"{pred / GiB:,.2f}",
                        "error of sums": (pred - obs) / obs if obs >= MiB else None,
                        "median": float(np.median(per)) if per else None})
    return out


def _short_environment(env):
    """'NVIDIA H200 · driver 580.159.04' (and the allocator's settings where not the default): a table column."""
    gpu = env.get("gpu") or {}
    parts = [gpu.get("name") or "no GPU (CPU)"] + ([f"driver {gpu['driver']}"] if gpu.get("driver") else [])
    if env.get("alloc_conf"):
        parts.append(env["alloc_conf"])
    return " · ".join(parts)


def boundary_table(records):
    """The fit boundary searches (records of `search:` groups): what the card ran beside `vramlab plan`'s answer.

    One row per search (its group, the experiment without the searched axis, the environment): the largest value
    that ran and the smallest that ran out of memory, the probes, vramlab plan's largest batch / longest sequence
    on the card the run was capped to (harness.sweep.search.planned_boundary, with today's formulas), and whether
    that answer is within one grid step of the measured boundary."""
    from ..env import environment_key
    from ..sweep.schema import Experiment
    from ..sweep.search import BoundarySearch
    from .calibrate import overheads_for

    searches = {}
    for r in records:
        if not r.get("search") or r.get("source") not in ("measured", "traced", "rehearsed"):
            continue
        try:
            exp = Experiment.from_dict(r)
        except (TypeError, KeyError, ValueError):
            continue
        axis, lo, hi, step = exp.search
        rest = {k: v for k, v in exp.spec.to_dict().items() if k != axis}
        key = (exp.group, axis, repr(sorted(rest.items())), exp.cap_gpu, exp.alloc_conf,
               environment_key(r.get("env") or {}), r.get("source"))
        if key not in searches:
            base = Experiment.from_dict({**r, "spec": {**r["spec"], axis: lo}})
            search = BoundarySearch(base=base, axis=axis, lo=lo, hi=hi, step=step, group=exp.group,
                                    overheads=overheads_for(exp.cap_gpu) if exp.cap_gpu else None)
            searches[key] = (search, environment_label(r.get("env") or {}))
        searches[key][0].feed(getattr(exp.spec, axis), r.get("outcome"))
    out = []
    for key, (search, env) in sorted(searches.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        res = search.result()
        plan = search.predicted()
        measured = res["largest_ok"]
        if res["done"] and plan is not None:
            found = measured if measured is not None else search.lo - search.step  # nothing ran: below the grid
            planned = min(max(plan, search.lo - search.step), search.hi)  # beyond the grid reads as its end
            within = "yes" if abs(planned - found) <= search.step else "no"
        else:
            within = "n/a"
        out.append({"search": search.label(), "environment": f"{env} ({key[-1]})",
                    "largest that ran": "—" if measured is None else f"{measured:,}",
                    "smallest OOM": "—" if res["smallest_oom"] is None else f"{res['smallest_oom']:,}",
                    "probes": res["probes"], "vramlab plan": "—" if plan is None else f"{plan:,}",
                    "within one step": within,
                    "state": "settled" if res["done"] else (res["stopped"] or "not finished")})
    return out


def _save(fig, out_dir, name):
    """Lay out, write <out_dir>/<name>.png and close the figure; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = os.path.join(out_dir, f"{name}.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _plots(rows, errors, cats, envs, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    panels = [t for t in TARGETS if _with(rows, t)]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5.5 * max(len(panels), 1), 4.5), squeeze=False)
    for a, target in zip(axes[0], panels):
        sel = _with(rows, target)
        m = np.array([r["observed"][target] for r in sel]) / GiB
        p = np.array([r["predicted"][target[1]] for r in sel]) / GiB
        a.scatter(m, p, s=14)
        hi = max(p.max(), m.max()) * 1.05
        a.plot([0, hi], [0, hi], "k--", lw=0.8)
        a.set_xlabel(f"{_target_label(*target)} (GiB)")
        a.set_ylabel(f"predicted peak {target[1]} (GiB)")
        a.set_title(f"predicted vs {_target_label(*target)}")
    paths["predicted_vs_observed"] = _save(fig, out_dir, "predicted_vs_observed")

    fig, ax = plt.subplots(figsize=(8, 4))
    if cats:
        ax.bar([f"{c['category']} ({c['source']})" for c in cats], [c["median_ratio"] for c in cats])
        ax.axhline(1, color="k", lw=0.8)
        ax.tick_params(axis="x", rotation=35, labelsize=7)
    ax.set_ylabel("observed / predicted (median)")
    ax.set_title("per category")
    paths["categories"] = _save(fig, out_dir, "categories")

    fig, ax = plt.subplots(figsize=(8, 4.5))
    series = [(n, np.asarray(e) * 100) for n, e in errors.items() if len(e)]
    if series:
        ax.hist([e for _, e in series], bins=30, label=[n for n, _ in series])
        ax.legend(fontsize=7)
    ax.set_xlabel("relative error (%), predicted − observed")
    ax.set_ylabel("experiments")
    ax.set_title("error distribution")
    paths["errors"] = _save(fig, out_dir, "errors")

    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.5 * max(len(envs), 1)))
    if envs:
        names = list(envs)
        data = [np.asarray(envs[k]) * 100 for k in names]
        try:
            ax.boxplot(data, orientation="horizontal")  # matplotlib ≥ 3.10
        except TypeError:
            ax.boxplot(data, vert=False)
        ax.set_yticks(range(1, len(names) + 1), [f"{e} vs {t}" for e, t in names], fontsize=7)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("relative error (%)")
    ax.set_title("across environments")
    paths["environments"] = _save(fig, out_dir, "environments")
    return paths


def _fmt(v):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.1%}" if abs(v) < 100 else f"{v:.3g}"
    return str(v)


def _cells(row, pct_cols):
    return [_fmt(row[c]) if c in pct_cols else (f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]))
            for c in row]


def _md_escape(text):
    """A table cell that cannot break the Markdown table or inject markup."""
    return html.escape(text.replace("\n", " ")).replace("|", "\\|")


def _table_md(rows, pct_cols):
    if not rows:
        return "(none)\n"
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(_md_escape(x) for x in _cells(r, pct_cols)) + " |" for r in rows]
    return "\n".join(out) + "\n"


def _table_html(rows, pct_cols):
    if not rows:
        return "<p>(none)</p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in _cells(r, pct_cols)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


PCT = {"median", "p95", "worst", "error of sums"}
NOTE = ("Relative error = (predicted − observed) / observed; median and p95 of its absolute value, worst signed. "
        "By category: sums over the records of each environment and mode, the error of the sums, and the median "
        "|error| per record. Fit boundary: the largest batch or sequence that ran under the cap next to the smallest "
        "that ran out of memory, beside `vramlab plan --gpu` on the capped card with today's formulas. "
        "Each row says what it is compared against: measured (a GPU) or traced (fake tensors, no device figure). "
        "Rules of thumb are scored against the measured device peak, or the traced allocated peak where nothing "
        "was measured. Per category: observed / predicted, in the predictor's vocabulary — cuda_context the context "
        "measured right after CUDA init, workspaces the device peak beyond the context and reserved bytes, "
        "allocator_slack reserved − allocated (estimated by the allocator model for traced records).")


def write_report(records, out_dir):
    """Write report.html (self-contained), report.md and PNGs to out_dir; return (html path, md path)."""
    os.makedirs(out_dir, exist_ok=True)
    rows, scores, errors, cats, env_tab, envs = summary(records)
    paths = _plots(rows, errors, cats, envs, out_dir)
    sources = sorted({r["source"] for r in rows})
    n_env = len({e for e, _ in envs})
    title = f"vramlab report: {len(rows)} experiments ({', '.join(sources) or 'none'}), {n_env} environment(s)"
    sections = [("Prediction vs rules of thumb", scores, PCT), ("Per category", cats, set()),
                ("Across environments", env_tab, PCT),
                ("Measured vs predicted by category, mode and environment", category_table(records), PCT)]
    boundaries = boundary_table(records)
    if boundaries:
        sections.append(("Fit boundary: measured on the capped card vs vramlab plan", boundaries, set()))
    # published cases the predictor cannot express, each with its reason (harness/analysis/published.py)
    not_expressed = [{"set": (r.get("citation") or {}).get("set", ""), "case": (r.get("published") or {}).get("case", ""),
                      "why": (r.get("error") or {}).get("message", "")}
                     for r in records if r.get("source") == "published" and r.get("outcome") == "unsupported"]
    if not_expressed:
        sections.append(("Published cases not expressible", not_expressed, set()))
    md = [f"# {_md_escape(title)}\n", NOTE + "\n"]
    for name, tab, pct in sections:
        md += [f"## {name}\n", _table_md(tab, pct)]
    md += [f"![{k}]({os.path.basename(p)})\n" for k, p in paths.items()]
    md_path = os.path.join(out_dir, "report.md")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write("\n".join(md))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}</style></head><body>",
             f"<h1>{html.escape(title)}</h1><p>{html.escape(NOTE)}</p>"]
    for name, tab, pct in sections:
        parts.append(f"<h2>{html.escape(name)}</h2>" + _table_html(tab, pct))
    for k, p in paths.items():
        with open(p, "rb") as f:
            b64 = base64.b64encode(f.read()).decode()
        parts.append(f"<h3>{html.escape(k.replace('_', ' '))}</h3><img alt='{k}' src='data:image/png;base64,{b64}'>")
    parts.append("</body></html>")
    html_path = os.path.join(out_dir, "report.html")
    with open(html_path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    return html_path, md_path
