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

# How the device categories are headed in the table, and what each means.
DEVICE_ROWS = ((C.CUDA_CONTEXT, "cuda context"), (C.WORKSPACES, "workspaces"), (C.ALLOCATOR_SLACK, "allocator slack"))


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
        head += f" · batch {s.batch} × seq {s.seq}" + (f" × accum {s.grad_accum}" if s.grad_accum > 1 else "")
    else:
        head += f" · batch {s.batch} · prompt {s.seq}" + (f" + gen {s.gen}" if s.gen else "")
    lines = [head, f"{pred.n_params:,} parameters · attention {s.attn}" + (f" · per GPU of {s.gpus}" if s.gpus > 1 else ""), ""]
    lines.append(f"{'category':<22}{'GiB':>10}")
    for c in C.TENSOR_CATEGORIES:
        v = pred.breakdown.get(c, 0)
        if v:
            lines.append(f"{c:<22}{gib_cell(v)}")
    lines.append(f"{'peak allocated':<22}{gib_cell(pred.peak_allocated_bytes)}   at {pred.peak_phase}   (torch max_memory_allocated)")
    for c, label in DEVICE_ROWS:
        lines.append(f"{label:<22}{gib_cell(pred.breakdown[c])}")
    lines.append(f"{'peak device':<22}{gib_cell(pred.peak_device_bytes)}   (what nvidia-smi shows)")
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
    from formulas.catalog import CONFIG_DIR, get_shape, load_config, resolve_config_path
    from formulas.checkpoint import stored_weights

    from ..hub import checkpoint_tensors

    path = resolve_config_path(spec.model)
    # a shipped config stands for its Hub repo (the file is named org--name.json)
    source = os.path.basename(path)[:-len(".json")].replace("--", "/", 1) if path.startswith(CONFIG_DIR) else path
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
    spec = spec_from_args(a)
    stack = stack_from_args(a)
    stored = where = None
    if a.weights_from_checkpoint:
        stored, where = checkpoint_of(a.model, spec)
    pred = predict(spec, overheads_for(a.gpu, a.calibration), checkpoint=stored)
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
    add_engine_arguments(p)
    p.set_defaults(func=cmd_predict)
    m = sub.add_parser("models", help="list the shipped model configs")
    m.add_argument("--params", action="store_true", help="with model type and parameter count")
    m.set_defaults(func=cmd_models)
