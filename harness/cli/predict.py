"""`vramlab predict` and `vramlab models`: the analytic prediction, in well under half a second, without torch."""

import json
import os

from formulas import categories as C
from formulas.units import GiB

from .common import (
    add_spec_arguments,
    calibration_line,
    check_version_flags,
    gib_cell,
    spec_from_args,
    stack_from_args,
    warn_beyond_positions,
)
from .engines import add_engine_arguments
from .trace import add_device_arguments

# How the device categories are headed in the table, in the order they add up to the device peak.
DEVICE_ROWS = ((C.ALLOCATOR_SLACK, "allocator slack"), (C.CUDA_CONTEXT, "cuda context"))


def stack_lines(spec, stack=None):
    """'stack: transformers 4.40.2 (asked) · …' (the notes say which behaviours differ from the newest)."""
    from formulas.stack import stack_of

    stack = stack or stack_of(spec.stack)
    return [f"stack: {stack.label()}"]


def render_prediction(pred, gpu=None, stack=None):
    """The readable table `vramlab predict` prints (GiB, binary). `gpu`: a formulas.hardware.Hardware;
    `stack`: the formulas.stack.Stack with where each version came from (default: the spec's)."""
    s = pred.spec
    from formulas.catalog import model_label

    head = f"{model_label(pred.model)} · {s.mode} · {s.dtype}"
    if s.mode == "train":
        head += f" · {s.method} · {s.optimizer}" + (" · grad-ckpt" if s.grad_ckpt else "")
        head += f" · recipe {s.recipe}" if s.recipe != "hf" else ""
        head += f" · batch {s.batch} × seq {s.seq}" + (f" × accum {s.grad_accum}" if s.grad_accum > 1 else "")
    else:
        head += f" · batch {s.batch} · prompt {s.seq}" + (f" + gen {s.gen}" if s.gen else "")
    lines = [head, f"{pred.n_params:,} parameters · attention {s.attn}" + (f" · per GPU of {s.gpus}" if s.gpus > 1 else ""), ""]
    lines.append(f"{'category':<22}{'GiB':>10}")
    for c in C.ALLOCATED_CATEGORIES:
        v = pred.breakdown.get(c, 0)
        if v:
            lines.append(f"{c:<22}{gib_cell(v)}" + ("   (cuBLAS, inside the allocator)" if c == C.WORKSPACES else ""))
    lines.append(f"{'peak allocated':<22}{gib_cell(pred.peak_allocated_bytes)}   at {pred.peak_phase}   (torch max_memory_allocated)")
    for c, label in DEVICE_ROWS:
        lines.append(f"{label:<22}{gib_cell(pred.breakdown[c])}" + ("   (outside the allocator: init + kernel images)"
                                                                    if c == C.CUDA_CONTEXT else ""))
    lines.append(f"{'peak device':<22}{gib_cell(pred.peak_device_bytes)}   (what nvidia-smi shows)")
    if pred.host_ram_bytes:
        lines.append(f"{'host RAM':<22}{gib_cell(pred.host_ram_bytes)}   (pinned, activations offloaded; not on the GPU)")
    phases = " · ".join(f"{ph} {sum(bd.values()) / GiB:.2f}" for ph, bd in pred.phases.items())
    lines.append("")
    lines.append(f"phases (GiB allocated): {phases}")
    lines.extend(stack_lines(pred.spec, stack))
    for n in pred.notes:
        lines.append(f"note: {n}")
    lines.append(calibration_line(pred.calibrated, pred.overheads_source))
    if gpu:
        margin = gpu.memory_bytes - pred.peak_device_bytes
        verdict = "fits" if margin >= 0 else "does not fit"
        lines.append(f"{gpu.name} ({gpu.memory_bytes / GiB:.2f} GiB nominal): {verdict}, margin {margin / GiB:+.2f} GiB")
    return "\n".join(lines)


def checkpoint_of(model_arg, spec):
    """(StoredWeights, where read) of the model's checkpoint, from its safetensors headers."""
    from formulas.catalog import get_shape, load_config, resolve_config_path, shipped_repo
    from formulas.checkpoint import stored_weights

    from ..hub import checkpoint_tensors

    path = resolve_config_path(spec.model)
    # a shipped config stands for its Hub repo (the file is named org--name.json)
    source = shipped_repo(path) or path
    tensors, where = checkpoint_tensors(source)
    return stored_weights(tensors, get_shape(spec.model), load_config(spec.model)), where


def render_checkpoint(stored, where, applied):
    """Lines on what the checkpoint stores and whether the prediction used it."""
    dtypes = ", ".join(f"{d} {n / GiB:.2f}" for d, n in stored.by_dtype)
    lines = [f"checkpoint: {stored.n_tensors:,} tensors, {stored.stored_bytes / GiB:.2f} GiB stored ({dtypes}) "
             f"· read from {where}",
             f"  as weights {stored.total_bytes / GiB:.2f} GiB: layers {stored.layer_bytes / GiB:.2f}, embeddings "
             f"{stored.embed_bytes / GiB:.2f}, lm_head {stored.head_bytes / GiB:.2f}, other {stored.other_bytes / GiB:.2f}"
             f"; quantization state {stored.quant_bytes / GiB:.2f} · stored as {stored.dtype or 'an unknown format'}"]
    for why, n, k in stored.unused:
        lines.append(f"  not counted: {why}: {k:,} tensors, {n / GiB:.2f} GiB")
    lines.append("weights source: " + ("the checkpoint's safetensors headers" if applied else
                                        "the formula (see the note on weights)"))
    return lines


def checkpoint_dict(stored, where, applied):
    return {"read_from": where, "dtype": stored.dtype, "n_tensors": stored.n_tensors, "stored_bytes": stored.stored_bytes,
            "by_dtype": dict(stored.by_dtype), "weights_bytes": stored.total_bytes, "layer_bytes": stored.layer_bytes,
            "embed_bytes": stored.embed_bytes, "head_bytes": stored.head_bytes, "other_bytes": stored.other_bytes,
            "quant_state_bytes": stored.quant_bytes, "used": applied,
            "not_counted": [{"why": w, "bytes": n, "tensors": k} for w, n, k in stored.unused]}


def cmd_predict(a):
    from formulas.catalog import model_label
    from formulas.hardware import get_hardware
    from formulas.predict import predict

    from ..analysis.calibrate import overheads_for

    from .engines import engine_answer, engine_flags, engine_json, render_engine

    check_version_flags(a)
    gpu = get_hardware(a.gpu) if a.gpu else None
    taken = engine_flags(a)
    if a.engine in ("llama.cpp", "ollama"):  # the engine's own model (a GGUF), placement and defaults
        from .llamacpp import cmd_predict_llamacpp

        return cmd_predict_llamacpp(a, taken)
    spec = spec_from_args(a)
    stack = stack_from_args(a)
    stored = where = None
    if a.weights_from_checkpoint:
        stored, where = checkpoint_of(a.model, spec)
    if a.alloc_conf is not None or a.exact or any(v in os.environ for v in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")):
        from .trace import device_of

        overheads, alloc_cfg, alloc_text = device_of(a)
        overheads = overheads.with_alloc_conf(alloc_cfg)
    else:  # the common case reads no allocator module
        overheads, alloc_cfg, alloc_text = overheads_for(a.gpu, a.calibration), None, ""
    pred = predict(spec, overheads, checkpoint=stored)
    if a.exact:
        if a.engine != "transformers":
            raise ValueError(f"--exact: traces transformers' workload; --engine {a.engine} has its own rules")
        pred = exact_prediction(pred, overheads, alloc_cfg, alloc_text)
    warn_beyond_positions("predict", pred.spec)
    if a.engine != "transformers":
        from formulas.catalog import get_shape

        obj, peak_device, lines = engine_answer(a, pred.spec, get_shape(pred.spec.model), gpu, taken,
                                                overheads_for(a.gpu, a.calibration))
        if a.json:
            print(json.dumps(engine_json(pred.to_dict(), obj, peak_device), indent=2))
        else:
            print(render_engine(a, pred, obj, peak_device, lines, gpu))
        return 0
    applied = pred.weights_source == "checkpoint"
    if a.json:
        d = pred.to_dict()
        d["model_label"] = model_label(pred.model)  # 'org/name@commit' for a Hugging Face cache snapshot
        d["stack"] = stack.to_dict()
        if stored is not None:
            d["checkpoint"] = checkpoint_dict(stored, where, applied)
        if gpu:
            d["gpu"] = {"name": gpu.name, "memory_bytes": gpu.memory_bytes, "fits": pred.peak_device_bytes <= gpu.memory_bytes,
                        "margin_bytes": gpu.memory_bytes - pred.peak_device_bytes}
        print(json.dumps(d, indent=2))
    else:
        print(render_prediction(pred, gpu, stack))
        if stored is not None:
            print("\n".join(render_checkpoint(stored, where, applied)))
    return 0


def exact_prediction(pred, overheads, alloc_cfg, alloc_text):
    """The prediction with its allocated and reserved peaks from the workload traced on fake tensors and its allocation
    stream replayed through the caching-allocator simulation (needs torch; quantized dtypes are refused in one line)."""
    from dataclasses import replace

    from formulas.spec import SpecError

    from ..tracing.tracer import trace

    try:
        t = trace(pred.spec, overheads=overheads, allocator_config=alloc_cfg)
    except SpecError as e:
        raise ValueError(f"--exact: {e}") from None
    ctx = pred.breakdown[C.CUDA_CONTEXT]
    alloc, reserved = t.estimated_max_allocated_bytes, t.estimated_reserved_bytes
    breakdown = {**{c: t.breakdown.get(c, 0) for c in C.ALLOCATED_CATEGORIES}, C.CUDA_CONTEXT: ctx,
                 C.ALLOCATOR_SLACK: reserved - alloc}
    note = (f"exact: allocated and reserved from the workload traced on fake tensors in {t.seconds:.1f} s, its "
            "allocation stream replayed through the caching allocator (formulas/allocator.py)"
            + (f" under {alloc_text}" if alloc_text else "") + "; the CUDA context is the formula's")
    return replace(pred, breakdown=breakdown, peak_allocated_bytes=alloc, peak_reserved_bytes=reserved,
                   peak_device_bytes=reserved + ctx, peak_phase=t.peak_phase, phases=t.phases,
                   notes=[note] + list(pred.notes))


def cmd_models(a):
    from formulas.catalog import catalog_names, get_shape

    for name in catalog_names():
        if a.params:
            s = get_shape(name)
            print(f"{name:<48} {s.model_type:<12} {s.n_params:>18,}")
        else:
            print(name)
    return 0


def add_parsers(sub):
    """Register `predict` and `models`."""
    p = sub.add_parser("predict", help="analytic memory prediction (no GPU, no torch)",
                       description="Predict the GPU memory of one workload from the model's config.json, by category "
                                   "and phase. Needs only the Python standard library.")
    add_spec_arguments(p)
    p.add_argument("--gpu", default=None, help="GPU name: say whether the workload fits its memory")
    p.add_argument("--json", action="store_true", help="print the prediction as JSON (bytes)")
    p.add_argument("--weights-from-checkpoint", action="store_true",
                   help="weights as the checkpoint stores them, from its safetensors headers (local files, the "
                        "Hugging Face cache, or range requests of the first bytes of each file on the Hub), in place "
                        "of the formula where the checkpoint is loaded as stored")
    p.add_argument("--calibration", default=None,
                   help="calibration table from `vramlab fit` (default: the newest in results/calibration/ for --gpu)")
    p.add_argument("--exact", action="store_true",
                   help="trace the workload on fake tensors and replay its allocation stream through the caching-"
                        "allocator simulation for the allocated and reserved peaks (needs torch; seconds to minutes)")
    add_device_arguments(p, gpu=False)
    add_engine_arguments(p)
    p.set_defaults(func=cmd_predict)
    m = sub.add_parser("models", help="list the shipped model configs")
    m.add_argument("--params", action="store_true", help="with model type and parameter count")
    m.set_defaults(func=cmd_models)
