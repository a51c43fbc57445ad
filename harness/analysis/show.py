"""One experiment, explained: what was measured beside what the current formulas predict, per category and
phase, and the memory timeline the record's sampler holds (`vramlab show RECORD`).

The table compares, at the peak, each allocated category (the tracker's measured breakdown against the
prediction), then the device levels: peak allocated (torch), the slack the caching allocator reserved
beyond it, what the device held outside the allocator (the CUDA context and kernel images) and the
device peak (NVML). Per phase: measured max allocated / reserved / device against the prediction.

The plot draws NVML's device-used samples over time (less what the device held before the process),
the phases as bands, the measured per-phase maxima of allocated and reserved as steps, and the
predicted allocated, reserved and device levels of each phase as dashed lines. PNG and a
self-contained HTML page (the PNG embedded).
"""

import base64
import html
import os

from formulas import categories as C
from formulas.units import MiB


def _mib(v):
    return "—" if v is None else f"{v / MiB:,.0f}"


def _pct(p, m):
    if p is None or not m:
        return ""
    return f"{p / m - 1:+.1%}"


def explain(rec, records=()):
    """{"lines": [text lines], "prediction": Prediction, "device": predicted device bytes, "phases": rows}.

    `records`: the other records of the same run, to know which kernel images the process had loaded."""
    from .repredict import loaded_before, repredict

    s, m = rec.get("spec") or {}, rec.get("measured") or {}
    if rec.get("source") != "measured" or not m:
        raise ValueError(f"record {rec.get('spec_hash')}: source {rec.get('source')!r} — `vramlab show` explains "
                         "measured records (a traced record's figures: `vramlab results`)")
    loaded = loaded_before(list(records) + [rec]).get(rec["spec_hash"], ())
    pred, device = repredict(rec, None, loaded)
    env = rec.get("env") or {}
    gpu = (env.get("gpu") or {})
    pkgs = env.get("packages") or {}
    proc = m.get("process") or {}
    lines = [f"{rec['spec_hash']}  {s.get('model')} · {s.get('mode')} · {s.get('method')} · {s.get('dtype')} · "
             f"batch {s.get('batch')} × seq {s.get('seq')}" + (f" + gen {s.get('gen')}" if s.get("gen") else ""),
             f"{gpu.get('name')} · driver {gpu.get('driver')} · torch {pkgs.get('torch')} · transformers "
             f"{pkgs.get('transformers')} · outcome {rec.get('outcome')} · {proc.get('mode', 'cold')} process, "
             f"experiment {proc.get('experiment_in_process', 1)} in it"
             + (f" (kernel images already loaded: {', '.join(loaded)})" if loaded else ""),
             "", f"{'at the peak (MiB)':<26}{'measured':>10}{'predicted':>11}{'error':>9}"]
    mbd = m.get("breakdown") or {}
    for c in C.TENSOR_CATEGORIES:
        mv, pv = mbd.get(c), pred.breakdown.get(c, 0)
        if mv or pv:
            lines.append(f"{c:<26}{_mib(mv):>10}{_mib(pv):>11}{_pct(pv, mv):>9}")
    tracked = (m.get("tracked") or {}).get("peak_allocated_bytes")
    untracked = m["peak_allocated_bytes"] - tracked if tracked is not None else None
    lines.append(f"{'workspaces':<26}{_mib(m.get('workspaces_bytes')):>10}{_mib(pred.breakdown.get(C.WORKSPACES)):>11}"
                 + ("" if m.get("workspaces_bytes") is not None else
                    f"   (allocated beyond the tracked tensors: {_mib(untracked)} MiB)"))
    res, dev, alloc = m.get("peak_reserved_bytes"), m.get("peak_device_bytes"), m.get("peak_allocated_bytes")
    rows = (("peak allocated (torch)", alloc, pred.peak_allocated_bytes),
            ("allocator slack", None if res is None else res - alloc, pred.peak_reserved_bytes - pred.peak_allocated_bytes),
            ("peak reserved (torch)", res, pred.peak_reserved_bytes),
            ("outside the allocator", None if None in (dev, res) else dev - res, device - pred.peak_reserved_bytes),
            ("peak device (NVML)", dev, device))
    for label, mv, pv in rows:
        lines.append(f"{label:<26}{_mib(mv):>10}{_mib(pv):>11}{_pct(pv, mv):>9}")
    lines += ["", f"{'per phase (MiB)':<16}{'allocated':>11}{'predicted':>11}{'reserved':>11}{'device':>11}"]
    phase_rows = []
    before = m.get("device_used_before_bytes") or 0
    for ph, v in (m.get("phases") or {}).items():
        pa = sum((pred.phases.get(ph) or {}).values()) if ph in pred.phases else None
        nv = v.get("nvml_device_used_bytes")
        row = {"phase": ph, "measured_allocated": v.get("max_allocated_bytes"), "predicted_allocated": pa,
               "measured_reserved": v.get("max_reserved_bytes"), "measured_device": nv - before if nv else None}
        phase_rows.append(row)
        lines.append(f"{ph:<16}{_mib(row['measured_allocated']):>11}{_mib(pa):>11}{_mib(row['measured_reserved']):>11}"
                     f"{_mib(row['measured_device']):>11}")
    lines += ["", f"predicted with the current formulas in the record's environment; {pred.overheads_source}"]
    return {"lines": lines, "prediction": pred, "device": device, "phases": phase_rows}


def plot_timeline(rec, explained, path):
    """The memory timeline PNG (see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = rec["measured"]
    samples = (m.get("sampler") or {}).get("timeline") or []
    before = m.get("device_used_before_bytes") or 0
    fig, ax = plt.subplots(figsize=(11, 5))
    order = []
    if samples:
        t0 = samples[0][0]
        ts = [x[0] - t0 for x in samples]
        ax.plot(ts, [(x[2] - before) / MiB for x in samples], lw=1.0, color="0.2", label="NVML device used (measured)")
        spans = {}
        for t, ph, _ in zip(ts, (x[1] for x in samples), samples):
            a, b = spans.get(ph, (t, t))
            spans[ph] = (min(a, t), max(b, t))
            if ph not in order:
                order.append(ph)
        colors = ("#e8f0fb", "#fbf0e8", "#eef8ea", "#f6e9f6")
        pred = explained["prediction"]
        for i, ph in enumerate(order):
            a, b = spans[ph]
            ax.axvspan(a, b, color=colors[i % len(colors)], zorder=0)
            ax.text(a, 0.99, f" {ph}", va="top", fontsize=8, color="0.3", transform=ax.get_xaxis_transform())
            pm = (m.get("phases") or {}).get(ph) or {}
            if pm.get("max_allocated_bytes"):
                ax.hlines(pm["max_allocated_bytes"] / MiB, a, b, colors="tab:blue", lw=2,
                          label="allocated, measured max" if i == 0 else None)
            if pm.get("max_reserved_bytes"):
                ax.hlines(pm["max_reserved_bytes"] / MiB, a, b, colors="tab:orange", lw=2,
                          label="reserved, measured max" if i == 0 else None)
            if ph in pred.phases:
                pa = sum(pred.phases[ph].values())
                ax.hlines(pa / MiB, a, b, colors="tab:cyan", linestyles="dashed", lw=1.4,
                          label="allocated, predicted" if i == 0 else None)
        ax.axhline(pred.peak_reserved_bytes / MiB, color="tab:orange", ls="--", lw=1.0, label="reserved peak, predicted")
        ax.axhline(explained["device"] / MiB, color="k", ls="--", lw=1.0, label="device peak, predicted")
    ax.set_xlabel("seconds since the first sample")
    ax.set_ylabel("MiB")
    s = rec.get("spec") or {}
    ax.set_title(f"{rec['spec_hash']} · {s.get('model')} · {s.get('mode')} · {s.get('dtype')} · "
                 f"batch {s.get('batch')} × seq {s.get('seq')}", fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_show(rec, explained, out_dir):
    """<out_dir>/<spec_hash>.png and .html (the PNG embedded); returns both paths."""
    os.makedirs(out_dir, exist_ok=True)
    png = plot_timeline(rec, explained, os.path.join(out_dir, f"{rec['spec_hash']}.png"))
    with open(png, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    page = ("<!doctype html><meta charset='utf-8'><title>vramlab show " + html.escape(rec["spec_hash"]) + "</title>"
            "<pre>" + html.escape("\n".join(explained["lines"])) + "</pre>"
            f"<img alt='memory timeline' src='data:image/png;base64,{data}'>")
    out = os.path.join(out_dir, f"{rec['spec_hash']}.html")
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, out)
    return png, out
