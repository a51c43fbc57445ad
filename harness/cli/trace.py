"""`vramlab trace`: run a workload on fake tensors and print its memory beside the prediction.

Takes exactly the flags of `vramlab predict`, plus --json and --plot. torch and transformers
are imported only when the command runs.
"""

import json
import os
import sys

from formulas import categories as C
from formulas.units import GiB

from .common import add_spec_arguments, gib_cell, installed_versions, spec_from_args, warn_beyond_positions


def _ratio(traced, predicted):
    if not predicted:
        return "—" if traced else ""
    return f"{traced / predicted:.3f}"


def render_trace(result, prediction, alloc_conf=""):
    """The readable table `vramlab trace` prints: traced and predicted GiB per category, then totals."""
    s = result.spec
    from formulas.catalog import model_label

    head = f"{model_label(prediction.model)} · {s.mode} · {s.dtype}"
    if s.mode == "train":
        head += f" · {s.method} · {s.optimizer} ({s.optimizer_impl}) · precision {s.precision}"
        head += f" · recipe {s.recipe}" if s.recipe != "hf" else ""
        head += (" · grad-ckpt" if s.grad_ckpt else "") + f" · batch {s.batch} × seq {s.seq}"
        head += f" × accum {s.grad_accum}" if s.grad_accum > 1 else ""
    else:
        head += f" · batch {s.batch} · prompt {s.seq}" + (f" + gen {s.gen}" if s.gen else "")
    lines = [head, f"{result.n_params:,} parameters · attention {s.attn} · traced on fake tensors in {result.seconds:.1f} s", ""]
    lines.append(f"{'category':<22}{'traced GiB':>12}{'predicted GiB':>15}{'ratio':>8}")
    for c in C.ALLOCATED_CATEGORIES:
        t, p = result.breakdown.get(c, 0), prediction.breakdown.get(c, 0)
        if t or p:
            lines.append(f"{c:<22}{gib_cell(t, 12)}{gib_cell(p, 15)}{_ratio(t, p):>8}")
    lines.append(f"{'peak allocated':<22}{gib_cell(result.peak_allocated_bytes, 12)}{gib_cell(prediction.peak_allocated_bytes, 15)}"
                 f"{_ratio(result.peak_allocated_bytes, prediction.peak_allocated_bytes):>8}"
                 f"   at {result.peak_phase} (predicted at {prediction.peak_phase})")
    if result.host_ram_bytes or prediction.host_ram_bytes:
        lines.append(f"{'host RAM':<22}{gib_cell(result.host_ram_bytes, 12)}{gib_cell(prediction.host_ram_bytes, 15)}"
                     f"{_ratio(result.host_ram_bytes, prediction.host_ram_bytes):>8}   offloaded activations, not on the GPU")
    sim_reserved = result.estimated_reserved_bytes
    lines.append(f"{'peak reserved':<22}{gib_cell(sim_reserved, 12)}{gib_cell(prediction.peak_reserved_bytes, 15)}"
                 f"{_ratio(sim_reserved, prediction.peak_reserved_bytes):>8}   simulated: the traced allocation stream "
                 "through the caching allocator (formulas/allocator.py)" + (f", {alloc_conf}" if alloc_conf else ""))
    outside = prediction.breakdown[C.CUDA_CONTEXT]
    lines.append(f"{'cuda context':<22}{'—':>12}{gib_cell(outside, 15)}{'':>8}   outside the allocator: not on fake "
                 "tensors (the prediction's)")
    lines.append(f"{'peak device':<22}{gib_cell(sim_reserved + outside, 12)}{gib_cell(prediction.peak_device_bytes, 15)}"
                 f"{_ratio(sim_reserved + outside, prediction.peak_device_bytes):>8}   simulated reserved + the context")
    if result.ranks:
        lines.append("")
        lines.append(f"fake ranks ({s.gpus} GPUs: tp={s.tp}, zero={s.zero}) — GiB at each rank's peak, traced:")
        for r in result.ranks:
            bd = r["breakdown"]
            parts = "  ".join(f"{c} {bd[c] / GiB:.2f}" for c in (C.WEIGHTS, C.GRADIENTS, C.OPTIMIZER_STATES) if bd.get(c))
            lines.append(f"  rank {r['rank']:<3}{r['peak_allocated_bytes'] / GiB:9.2f} at {r['peak_phase']:<15}{parts}")
    lines.append("")
    lines.append("phases (GiB at each phase's peak: allocated traced / predicted; reserved simulated):")
    for ph, bd in result.phases.items():
        pred = sum(prediction.phases.get(ph, {}).values())
        res = (result.estimated_phases.get(ph) or {}).get("max_reserved_bytes")
        lines.append(f"  {ph:<16}{sum(bd.values()) / GiB:10.2f} /{pred / GiB:8.2f}"
                     + (f"   reserved {res / GiB:.2f}" if res is not None else ""))
    for n in result.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def stack_mismatch(spec):
    """Lines saying where the versions the prediction assumes differ from the installed ones the trace runs on."""
    from formulas.stack import BEHAVIOURS, PACKAGES, behaviour, parse_version

    installed = installed_versions()
    lines = []
    for p, v in spec.stack:
        have = installed.get(p)
        if p not in PACKAGES or not have or parse_version(have) == parse_version(v):
            continue
        here = tuple((q, have if q == p else w) for q, w in spec.stack)
        differ = [b.key for b in BEHAVIOURS if b.package == p and behaviour(spec, b.key) != behaviour(here, b.key)]
        lines.append(f"traced on the installed {p} {have}; the prediction beside it assumes {p} {v} (--{p})"
                     + (f": they differ in {', '.join(differ)}" if differ else ": no modelled behaviour differs")
                     + f"; to trace {v}, run vramlab in an environment that has it (scripts/stack_venvs.sh)")
    return lines


def device_of(a):
    """(Overheads of --gpu's architecture or a calibration table, AllocatorConfig, its text) for trace and predict:
    --alloc-conf, else PYTORCH_ALLOC_CONF / PYTORCH_CUDA_ALLOC_CONF as torch reads them."""
    from formulas.allocator import AllocConfError, config_from_env, parse_alloc_conf

    from ..analysis.calibrate import overheads_for

    try:
        if a.alloc_conf is not None:
            cfg, text = parse_alloc_conf(a.alloc_conf), a.alloc_conf
        else:
            cfg, var = config_from_env(os.environ)
            text = f"{var}={cfg.text}" if var else ""
    except AllocConfError as e:
        raise ValueError(f"--alloc-conf: {e}" if a.alloc_conf is not None else str(e)) from None
    return overheads_for(a.gpu, getattr(a, "calibration", None)), cfg, text


def cmd_trace(a):
    from formulas.predict import predict

    if a.plot and not a.plot.lower().endswith(".png"):
        raise ValueError(f"--plot {a.plot}: give a .png file name")
    spec = spec_from_args(a)
    overheads, alloc_cfg, alloc_text = device_of(a)
    prediction = predict(spec, overheads.with_alloc_conf(alloc_cfg))
    from ..tracing.tracer import plot_timeline, trace

    if a.rank is not None and spec.gpus == 1:
        raise ValueError(f"--rank {a.rank}: only with --gpus N (a multi-GPU spec)")
    mismatch = stack_mismatch(prediction.spec)
    for line in mismatch:  # said before the (long) trace starts, and again with its result
        print(f"vramlab trace: {line}", file=sys.stderr)
    result = trace(spec, rank=a.rank, overheads=overheads, allocator_config=alloc_cfg)
    warn_beyond_positions("trace", prediction.spec)  # only once the answer stands: bad input is one line
    if a.plot:
        try:
            plot_timeline(result, a.plot)
        except OSError as e:
            raise ValueError(f"--plot {a.plot}: {e.strerror or e}") from None
    if a.json:
        d = result.to_dict()
        d["stack_mismatch"] = mismatch
        d["predicted"] = {"breakdown": prediction.breakdown, "peak_allocated_bytes": prediction.peak_allocated_bytes,
                          "peak_reserved_bytes": prediction.peak_reserved_bytes,
                          "peak_device_bytes": prediction.peak_device_bytes,
                          "peak_phase": prediction.peak_phase, "phases": prediction.phases,
                          "host_ram_bytes": prediction.host_ram_bytes}
        d["simulated_device_bytes"] = result.estimated_reserved_bytes + prediction.breakdown[C.CUDA_CONTEXT]
        d["allocator_settings"] = alloc_text
        print(json.dumps(d, indent=2))
    else:
        print(render_trace(result, prediction, alloc_text))
        for line in mismatch:
            print(f"note: {line}")
        if a.plot:
            print(f"memory over time → {os.path.abspath(a.plot)}")
    return 0


def add_parsers(sub):
    """Register `trace` (the flags of predict, plus --json and --plot)."""
    p = sub.add_parser("trace", help="run the workload on fake tensors and count bytes per category (CPU, no GPU)",
                       description="Build the model on fake tensors, run the workload the GPU harness runs, and count "
                                   "every tensor's bytes per category beside the prediction. Needs torch and "
                                   "transformers (the harness extra).")
    add_spec_arguments(p)
    p.add_argument("--json", action="store_true", help="print the trace (and the prediction) as JSON (bytes)")
    p.add_argument("--plot", default=None, metavar="PATH", help="write a memory-over-time PNG to PATH")
    p.add_argument("--rank", type=int, default=None, metavar="R",
                   help="multi-GPU specs: trace only fake rank R (default: every rank up to 8, the highest peak shown)")
    add_device_arguments(p)
    p.set_defaults(func=cmd_trace)


def add_device_arguments(p, gpu=True):
    """--gpu (its architecture sizes the cuBLAS workspaces and the context) and --alloc-conf, for trace and predict."""
    if gpu:
        p.add_argument("--gpu", default=None, help="GPU name: its architecture sizes the cuBLAS workspaces and the CUDA "
                                                   "context (default: Hopper, sm90)")
    p.add_argument("--alloc-conf", default=None, metavar="SETTINGS",
                   help="the caching allocator's settings as PYTORCH_CUDA_ALLOC_CONF gives them, e.g. "
                        "'expandable_segments:True' (default: PYTORCH_ALLOC_CONF / PYTORCH_CUDA_ALLOC_CONF of this "
                        "shell, as torch would read them)")
