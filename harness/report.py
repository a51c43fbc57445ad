"""`vramlab report`: how good are the predictions? A self-contained HTML page and a Markdown twin.

Beside vramlab's prediction the report scores the usual rules of thumb on the same experiments,
so the comparison is like for like:

    weights × 1.2              inference: "add 20% to the weights"
    weights + 20%              training, the same rule applied to fine-tuning
    16 bytes per parameter     full training with Adam in mixed precision (2 + 2 + 4 + 4 + 4)

Every rule is scored against the measured device peak (what nvidia-smi shows; the peak allocated
where a record has no device figure, e.g. traced records). Relative error = (predicted − measured)
/ measured. Outputs: report.html (PNGs embedded as base64, no other files needed), report.md and
the PNGs beside it. Plots use matplotlib's Agg backend: no display needed.
"""

import base64
import html
import os

import numpy as np

from formulas import categories as C
from formulas.units import GiB

from .env import environment_key

RULES = (
    ("weights × 1.2 (inference)", "inference", lambda w, n: 1.2 * w),
    ("weights + 20% (training)", "train", lambda w, n: 1.2 * w),
    ("16 bytes per parameter (training)", "train", lambda w, n: 16 * n),
)


def _rows(records):
    """One dict per ok record with a prediction: predicted/measured totals, target, weights, environment."""
    rows = []
    for r in records:
        p, m = r.get("prediction") or {}, r.get("measured") or {}
        if r.get("outcome") != "ok" or "peak_allocated_bytes" not in p or m.get("peak_allocated_bytes") is None:
            continue
        bd = p.get("breakdown") or {}
        has_dev = m.get("peak_device_bytes") is not None
        rows.append({
            "spec_hash": r["spec_hash"], "mode": (r.get("spec") or {}).get("mode"), "source": r.get("source"),
            "env": environment_key(r.get("env") or {}),
            "predicted_allocated": p["peak_allocated_bytes"], "measured_allocated": m["peak_allocated_bytes"],
            "predicted_target": p["peak_device_bytes"] if has_dev else p["peak_allocated_bytes"],
            "measured_target": m["peak_device_bytes"] if has_dev else m["peak_allocated_bytes"],
            "target": "device" if has_dev else "allocated",
            "weights": bd.get(C.WEIGHTS, 0) + bd.get(C.QUANT_STATE, 0), "n_params": p.get("n_params") or 0,
            "predicted_breakdown": bd, "measured": m,
        })
    return rows


def _rel(pred, meas):
    pred, meas = np.asarray(pred, float), np.asarray(meas, float)
    return (pred - meas) / meas


def _stats(err):
    err = np.asarray(err, float)
    if len(err) == 0:
        return {"n": 0, "median": None, "p95": None, "worst": None}
    a = np.abs(err)
    return {"n": len(err), "median": float(np.median(a)), "p95": float(np.percentile(a, 95)), "worst": float(err[np.argmax(a)])}


def category_ratios(rows):
    """{category: [measured/predicted]} from measured breakdowns, context and reserved-minus-allocated slack."""
    out = {}
    for r in rows:
        m, bd = r["measured"], r["predicted_breakdown"]
        for c, v in (m.get("breakdown") or {}).items():
            if bd.get(c):
                out.setdefault(c, []).append(v / bd[c])
        if m.get("cuda_context_bytes") is not None and bd.get(C.CUDA_CONTEXT):
            out.setdefault(C.CUDA_CONTEXT, []).append(m["cuda_context_bytes"] / bd[C.CUDA_CONTEXT])
        if m.get("peak_reserved_bytes") is not None and bd.get(C.ALLOCATOR_SLACK):
            out.setdefault(C.ALLOCATOR_SLACK, []).append((m["peak_reserved_bytes"] - m["peak_allocated_bytes"])
                                                         / bd[C.ALLOCATOR_SLACK])
    return out


def summary(records):
    """Tables as lists of dicts: vramlab vs rules, per category, per environment."""
    rows = _rows(records)
    scores = []
    err_alloc = _rel([r["predicted_allocated"] for r in rows], [r["measured_allocated"] for r in rows])
    err_target = _rel([r["predicted_target"] for r in rows], [r["measured_target"] for r in rows])
    scores.append({"predictor": "vramlab, peak allocated", **_stats(err_alloc)})
    scores.append({"predictor": "vramlab, peak device", **_stats(err_target)})
    rule_errors, same = {}, set()
    for name, mode, rule in RULES:
        sel = [r for r in rows if r["mode"] == mode and r["weights"]]
        e = _rel([rule(r["weights"], r["n_params"]) for r in sel], [r["measured_target"] for r in sel])
        rule_errors[name] = e
        scores.append({"predictor": f"rule: {name}", **_stats(e)})
        if mode in same:
            continue
        same.add(mode)
        # vramlab on the same subset, so the comparison is like for like
        e2 = _rel([r["predicted_target"] for r in sel], [r["measured_target"] for r in sel])
        scores.append({"predictor": f"vramlab on the same {mode} experiments", **_stats(e2)})
    cats = [{"category": c, "n": len(v), "median_ratio": float(np.median(v)),
             "p95_abs_error": float(np.percentile(np.abs(np.asarray(v) - 1), 95))}
            for c, v in sorted(category_ratios(rows).items())]
    envs = {}
    for r, e in zip(rows, err_target):
        envs.setdefault(r["env"], []).append(e)
    env_tab = [{"environment": k.replace("|", " · "), **_stats(v)} for k, v in sorted(envs.items())]
    return rows, err_alloc, err_target, rule_errors, scores, cats, env_tab, envs


def _save(fig, out_dir, name):
    """Lay out, write <out_dir>/<name>.png and close the figure; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = os.path.join(out_dir, f"{name}.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _plots(rows, err_alloc, err_target, rule_errors, cats, envs, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.5))
    if rows:
        pa = np.array([r["predicted_allocated"] for r in rows]) / GiB
        ma = np.array([r["measured_allocated"] for r in rows]) / GiB
        pt = np.array([r["predicted_target"] for r in rows]) / GiB
        mt = np.array([r["measured_target"] for r in rows]) / GiB
        for a, (p, m, t) in zip(ax, ((pa, ma, "peak allocated"), (pt, mt, "peak device"))):
            a.scatter(m, p, s=14)
            hi = max(p.max(), m.max()) * 1.05
            a.plot([0, hi], [0, hi], "k--", lw=0.8)
            a.set_xlabel(f"measured {t} (GiB)")
            a.set_ylabel(f"predicted {t} (GiB)")
            a.set_title(f"{t}: predicted vs measured")
    paths["predicted_vs_measured"] = _save(fig, out_dir, "predicted_vs_measured")

    fig, ax = plt.subplots(figsize=(7, 4))
    if cats:
        ax.bar([c["category"] for c in cats], [c["median_ratio"] for c in cats])
        ax.axhline(1, color="k", lw=0.8)
        ax.tick_params(axis="x", rotation=30)
    ax.set_ylabel("measured / predicted (median)")
    ax.set_title("per category")
    paths["categories"] = _save(fig, out_dir, "categories")

    fig, ax = plt.subplots(figsize=(8, 4.5))
    series = [("vramlab allocated", err_alloc), ("vramlab device", err_target)] + list(rule_errors.items())
    series = [(n, np.asarray(e) * 100) for n, e in series if len(e)]
    if series:
        ax.hist([e for _, e in series], bins=30, label=[n for n, _ in series])
        ax.legend(fontsize=8)
    ax.set_xlabel("relative error (%), predicted − measured")
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
        ax.set_yticks(range(1, len(names) + 1), [k.replace("|", " · ") for k in names], fontsize=7)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("device relative error (%)")
    ax.set_title("across environments")
    paths["environments"] = _save(fig, out_dir, "environments")
    return paths


def _fmt(v):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.1%}" if abs(v) < 100 else f"{v:.3g}"
    return str(v)


def _table_md(rows, pct_cols):
    if not rows:
        return "(none)\n"
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r[c]) if c in pct_cols else str(r[c]) if not isinstance(r[c], float)
                                     else f"{r[c]:.3f}" for c in cols) + " |")
    return "\n".join(out) + "\n"


def _table_html(rows, pct_cols):
    if not rows:
        return "<p>(none)</p>"
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = ""
    for r in rows:
        cells = (_fmt(r[c]) if c in pct_cols else (f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c])) for c in cols)
        body += "<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in cells) + "</tr>"
    return f"<table><tr>{head}</tr>{body}</table>"


PCT = {"median", "p95", "worst"}
NOTE = ("Relative error = (predicted − measured) / measured; median and p95 of its absolute value, worst signed. "
        "Rules are scored against the measured device peak (peak allocated for records without one). "
        "Per category: measured / predicted; cuda_context compares the context measured right after CUDA init "
        "with the predicted context + workspaces, allocator_slack reserved − allocated with the predicted slack.")


def write_report(records, out_dir):
    """Write report.html (self-contained), report.md and PNGs to out_dir; return (html path, md path)."""
    os.makedirs(out_dir, exist_ok=True)
    rows, err_alloc, err_target, rule_errors, scores, cats, env_tab, envs = summary(records)
    paths = _plots(rows, err_alloc, err_target, rule_errors, cats, envs, out_dir)
    sources = sorted({r["source"] for r in rows})
    title = f"vramlab report: {len(rows)} experiments ({', '.join(sources) or 'none'}), {len(envs)} environment(s)"
    sections = [("Prediction vs rules of thumb", scores, PCT), ("Per category", cats, set()),
                ("Across environments", env_tab, PCT)]
    md = [f"# {title}\n", NOTE + "\n"]
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
