"""`vramlab` command line: argument parsing and dispatch only.

argparse (not a third-party CLI library) keeps `vramlab predict` free of heavy imports:
it must answer in well under half a second and never imports torch.
"""

import argparse
import json
import os
import sys

from formulas import categories as C
from formulas.units import GiB


def _targets(text):
    return tuple(t.strip() for t in text.split(",") if t.strip())


def add_spec_arguments(p):
    """Flags shared by predict (and, later, trace/run/plan). Names are kept stable for scripts."""
    p.add_argument("--model", required=True, help="catalog name (e.g. Llama-3.1-8B), HF id, config.json path or model dir")
    p.add_argument("--mode", default="inference", help="inference | train")
    p.add_argument("--dtype", default="bf16",
                   help="fp32 | bf16 | fp16 | fp8 | int8 | nf4 | fp4 | gptq-int4 | awq-int4 | q8_0 | q6_k | q5_k_m | "
                        "q4_k_m | q4_0 | q3_k_m | q2_k (with --method qlora: the compute dtype)")
    p.add_argument("--compute-dtype", default="bf16", help="compute dtype of quantized models (bf16 | fp16 | fp32)")
    p.add_argument("--batch", type=int, default=1, help="concurrent sequences (inference) or micro-batch (training)")
    p.add_argument("--users", type=int, default=None, help="alias of --batch for inference: concurrent users")
    p.add_argument("--seq", type=int, default=2048, help="prompt / sequence length in tokens")
    p.add_argument("--gen", type=int, default=0, help="tokens generated after the prompt (decode steps)")
    p.add_argument("--method", default="full", help="full | freeze | lora | qlora")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-targets", type=_targets, default=(),
                   help="comma list of module names, or all-linear (default: peft's choice for the model type)")
    p.add_argument("--lora-dtype", default="fp32", help="adapter dtype (peft default fp32)")
    p.add_argument("--trainable-layers", type=int, default=2, help="--method freeze: last N layers train")
    p.add_argument("--optimizer", default="adamw",
                   help="adamw | adamw8bit | paged_adamw8bit | sgd | sgd_momentum | lion | adafactor")
    p.add_argument("--optimizer-impl", default="auto", help="auto | foreach | fused | forloop (AdamW)")
    p.add_argument("--precision", default="auto", help="auto | pure | amp | master (training)")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--attn", default="sdpa", help="sdpa | eager")
    p.add_argument("--kv-dtype", default="", help="KV cache dtype (default: compute dtype)")
    p.add_argument("--mla-cache", default="compressed",
                   help="MLA models: compressed latent (transformers 5, vLLM, SGLang) | expanded per-head K/V")
    p.add_argument("--logits", default="last", help="inference: last (generate) | all positions")
    p.add_argument("--no-double-quant", action="store_true", help="bitsandbytes 4-bit without double quantization")
    p.add_argument("--group-size", type=int, default=128, help="GPTQ/AWQ group size")
    p.add_argument("--no-dropout", action="store_true", help="train without dropout masks")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--zero", type=int, default=0, help="ZeRO stage 0-3 (3 = FSDP full shard)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree")
    p.add_argument("--layer-split", action="store_true", help='split layers over --gpus like device_map="auto"')
    p.add_argument("--offload", default="none", help="none | optimizer | params")


def spec_from_args(a):
    """Build a Spec from parsed flags."""
    from formulas.spec import Spec

    batch = a.users if a.users is not None else a.batch
    return Spec(
        model=a.model, mode=a.mode, dtype=a.dtype.lower(), batch=batch, seq=a.seq, gen=a.gen, method=a.method,
        compute_dtype=a.compute_dtype, lora_rank=a.lora_rank, lora_targets=a.lora_targets, lora_dtype=a.lora_dtype,
        trainable_layers=a.trainable_layers, optimizer=a.optimizer, optimizer_impl=a.optimizer_impl,
        precision=a.precision, grad_ckpt=a.grad_ckpt, attn=a.attn, grad_accum=a.grad_accum, kv_dtype=a.kv_dtype,
        mla_cache=a.mla_cache, logits=a.logits, double_quant=not a.no_double_quant, group_size=a.group_size,
        dropout=not a.no_dropout, gpus=a.gpus, zero=a.zero, tp=a.tp, pp=a.pp, layer_split=a.layer_split,
        offload=a.offload,
    )


def _g(n):
    if 0 < n < GiB / 200:
        return f"{'<0.01':>10}"
    return f"{n / GiB:10.2f}"


def render_prediction(pred, gpu=None):
    """The readable table `vramlab predict` prints (GiB, binary)."""
    s = pred.spec
    head = f"{pred.model} · {s.mode} · {s.dtype}"
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
            lines.append(f"{c:<22}{_g(v)}")
    lines.append(f"{'peak allocated':<22}{_g(pred.peak_allocated_bytes)}   at {pred.peak_phase}   (torch max_memory_allocated)")
    lines.append(f"{'cuda context + ws':<22}{_g(pred.breakdown[C.CUDA_CONTEXT])}")
    lines.append(f"{'allocator slack':<22}{_g(pred.breakdown[C.ALLOCATOR_SLACK])}")
    lines.append(f"{'peak device':<22}{_g(pred.peak_device_bytes)}   (what nvidia-smi shows)")
    phases = " · ".join(f"{ph} {sum(bd.values()) / GiB:.2f}" for ph, bd in pred.phases.items())
    lines.append("")
    lines.append(f"phases (GiB allocated): {phases}")
    for n in pred.notes:
        lines.append(f"note: {n}")
    lines.append(f"uncalibrated: device overheads are {pred.overheads_source}" if not pred.calibrated
                 else f"calibrated: {pred.overheads_source}")
    if gpu:
        name, cap = gpu
        margin = cap - pred.peak_device_bytes
        verdict = "fits" if margin >= 0 else "does not fit"
        lines.append(f"{name} ({cap / GiB:.2f} GiB nominal): {verdict}, margin {margin / GiB:+.2f} GiB")
    return "\n".join(lines)


def _overheads_for(a):
    """(Overheads, calibrated): --calibration FILE, else the newest table in results/calibration/ for --gpu, else defaults."""
    from formulas.hardware import device_overheads

    from .calibrate import find_calibration, load_calibration

    cal = load_calibration(a.calibration) if a.calibration else (find_calibration(a.gpu) if a.gpu else None)
    return device_overheads(a.gpu, cal)


def cmd_predict(a):
    from formulas.catalog import UnknownModelError
    from formulas.gpus import gpu_memory_bytes
    from formulas.predict import predict
    from formulas.shapes import UnsupportedModelError
    from formulas.spec import SpecError

    try:
        gpu = gpu_memory_bytes(a.gpu) if a.gpu else None
        overheads, calibrated = _overheads_for(a)
        pred = predict(spec_from_args(a), overheads)
    except (SpecError, UnknownModelError, UnsupportedModelError, ValueError) as e:  # CalibrationError is a ValueError
        print(f"vramlab predict: {e}", file=sys.stderr)
        return 2
    pred.calibrated = calibrated  # predict() cannot know; the source string names the table and its held-out error
    if a.json:
        d = pred.to_dict()
        if gpu:
            d["gpu"] = {"name": gpu[0], "memory_bytes": gpu[1], "fits": pred.peak_device_bytes <= gpu[1],
                        "margin_bytes": gpu[1] - pred.peak_device_bytes}
        print(json.dumps(d, indent=2))
    else:
        print(render_prediction(pred, gpu))
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


def _shard(text):
    try:
        k, n = (int(x) for x in text.split("/"))
        if not 1 <= k <= n:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text}: expected K/N with 1 ≤ K ≤ N, e.g. 2/3") from None
    return k, n


def cmd_run(a):
    from . import nvml
    from .launcher import default_out_dir, run_sweep
    from .spec import SweepError, load_sweep

    try:
        name, exps = load_sweep(a.sweep)
    except SweepError as e:
        print(f"vramlab run: {e}", file=sys.stderr)
        return 2
    if a.shard:
        k, n = a.shard
        exps = exps[k - 1::n]
    mode = a.mode
    if mode == "auto":
        mode = "measure" if nvml.device_count() > 0 else "trace"
        if mode == "trace" and not a.dry_run:
            print("vramlab run: no NVIDIA GPU found — tracing the experiments on fake tensors instead of measuring",
                  file=sys.stderr)
    if a.dry_run:
        from formulas.predict import predict

        print(f"{name}: {len(exps)} experiments ({mode})")
        for e in exps:
            p = predict(e.spec)
            print(f"{e.spec_hash}  {e.label():70s} {p.peak_allocated_bytes / GiB:8.2f} GiB alloc "
                  f"{p.peak_device_bytes / GiB:8.2f} GiB device  {p.peak_phase}")
        return 0
    if mode == "measure" and not nvml.available():
        print("vramlab run: --mode measure needs an NVIDIA GPU and driver (NVML not available)", file=sys.stderr)
        return 2
    gpus = [int(x) for x in a.gpus.split(",")] if a.gpus else None
    out = a.out or default_out_dir(name, mode)
    print(f"{name}: {len(exps)} experiments → {out}", file=sys.stderr)
    s = run_sweep(exps, out, gpus=gpus, mode=mode, retry=a.retry, progress=not a.no_progress)
    parts = ", ".join(f"{k} {v}" for k, v in sorted(s.outcomes.items()))
    print(f"{name}: ran {s.ran}, skipped {s.skipped} already recorded" + (f" ({parts})" if parts else "")
          + (f"; moved {len(s.corrupt_moved)} unreadable record(s) aside" if s.corrupt_moved else ""))
    if s.interrupted:
        print("vramlab run: interrupted — records written so far are kept; run the same command to resume", file=sys.stderr)
        return 130
    return 0


def cmd_results(a):
    from .records import load_records_for, records_frame

    recs = load_records_for("results", a.path)
    if recs is None:
        return 2
    df = records_frame(recs)
    if a.csv:
        df.to_csv(a.csv if a.csv != "-" else sys.stdout, index=False)
        if a.csv != "-":
            print(f"{len(df)} records → {a.csv}", file=sys.stderr)
    else:
        cols = ["spec_hash", "model", "mode", "method", "dtype", "batch", "seq", "outcome",
                "predicted_peak_allocated_bytes", "measured_peak_allocated_bytes"]
        view = df[cols].copy()
        for c in cols[-2:]:
            view[c] = (view[c] / GiB).round(2)
        view.columns = [c.replace("_bytes", "_GiB") for c in cols]
        print(view.to_string(index=False))
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog="vramlab", description="How much GPU memory an LLM needs — predicted, traced, measured.")
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("predict", help="analytic memory prediction (no GPU, no torch)")
    add_spec_arguments(pp)
    pp.add_argument("--gpu", default=None, help="GPU name: say whether the workload fits its memory")
    pp.add_argument("--json", action="store_true", help="print the prediction as JSON (bytes)")
    pp.add_argument("--calibration", default=None,
                    help="calibration table from `vramlab fit` (default: the newest in results/calibration/ for --gpu)")
    pp.set_defaults(func=cmd_predict)
    pr = sub.add_parser("run", help="run a sweep: measure on GPUs, or trace without one")
    pr.add_argument("sweep", help="experiments/NAME.yaml")
    pr.add_argument("--gpus", default=None, help="comma list of GPU indices to run on in parallel (default: GPU 0)")
    pr.add_argument("--out", default=None, help="record folder (default results/runs/<sweep>/<gpu-driver>)")
    pr.add_argument("--mode", default="auto", choices=("auto", "measure", "trace"))
    pr.add_argument("--dry-run", action="store_true", help="list the experiments and their predictions; run nothing")
    pr.add_argument("--shard", type=_shard, default=None, help="run every N-th experiment starting at K (K/N)")
    pr.add_argument("--retry", action="store_true", help="rerun experiments whose record is an error/timeout/crash")
    pr.add_argument("--no-progress", action="store_true")
    pr.set_defaults(func=cmd_run)
    prs = sub.add_parser("results", help="records as a table or CSV")
    prs.add_argument("path", help="a record file or a folder of records")
    prs.add_argument("--csv", default=None, help="write CSV to this file (- for stdout)")
    prs.set_defaults(func=cmd_results)
    pm = sub.add_parser("models", help="list the shipped model configs")
    pm.add_argument("--params", action="store_true", help="with model type and parameter count")
    pm.set_defaults(func=cmd_models)
    from .plan_cli import add_plan_parser  # here, not at the top: plan_cli imports this module
    from .trace_cli import add_trace_parser  # likewise

    from .calib_cli import add_calibration_parsers  # likewise

    add_plan_parser(sub)
    add_trace_parser(sub)
    add_calibration_parsers(sub)
    return p


def main(argv=None):
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        return a.func(a)
    except BrokenPipeError:  # `vramlab … | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
