"""GPU measurement of one experiment: build the model on the GPU, run the workload, measure around it.

Measurement wraps the workload (harness.workload knows nothing of it): the workload calls
`mark(phase)`; at each phase boundary this module synchronises, records the caching
allocator's peak allocated and reserved bytes of the phase that ends and resets them, and
the NVML sampler attributes its samples to the new phase.

What is recorded:
- `cuda_context_bytes`: NVML device-used after CUDA initialisation minus before it (minus
  the one small allocator segment the probe tensor takes);
- per phase: max allocated / reserved (torch), peak device-used and process-used (NVML);
- `peak_device_bytes`: the NVML peak minus what the device used before this process
  started CUDA, i.e. this process's footprint as nvidia-smi would show it; flagged when
  other processes used the GPU during the run;
- `device_breakdown`: the device categories of formulas/categories.py — the context, the
  workspaces (device peak − peak reserved − context) and the allocator slack (peak reserved −
  peak allocated), as harness.records.measured_device_breakdown derives them;
- timings: process start → CUDA ready → model built → workload done, and the sampler's own
  busy time as a fraction of the workload time (its overhead).

Models are shape-matched and built on the GPU at the target dtype, never materialised on the
CPU: float models directly under `torch.device("cuda")`; bitsandbytes int8/nf4/fp4 models on
the meta device first, then each nn.Linear replaced by a bitsandbytes layer quantized from
random weights generated on the GPU one layer at a time, so the float model never exists in
full. Real weights load from a local directory (`real_model_dir`, local_files_only).
"""

import os
import time

from formulas.catalog import get_shape
from formulas.spec import validate

from ..records import measured_device_breakdown
from . import nvml
from .sampler import NvmlSampler

SMALL_SEGMENT = 2 * 2**20  # kSmallBuffer in c10/cuda/CUDACachingAllocator.cpp: the probe tensor's segment


def _materialize_meta(model, device):
    """Give every parameter and buffer still on the meta device real storage on `device`."""
    import torch

    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                # p.dtype is what the model chose on meta: the compute dtype, or fp32 where it pins it (routers).
                data = torch.empty(p.shape, device=device, dtype=p.dtype)
                torch.nn.init.normal_(data, std=0.02) if data.dim() > 1 else data.fill_(1.0)
                setattr(module, name, torch.nn.Parameter(data, requires_grad=p.requires_grad))
        fresh = None
        if type(module).__name__.endswith("RotaryEmbedding") and any(b.is_meta for b in module.buffers(recurse=False)):
            fresh = type(module)(module.config)  # tiny: inv_freq is computed from the config in __init__
        for name, b in list(module.named_buffers(recurse=False)):
            if not b.is_meta:
                continue
            if fresh is not None and hasattr(fresh, name):
                value = getattr(fresh, name).to(device)
            elif b.dtype == torch.bool and b.dim() == 2:  # causal-mask buffers
                value = torch.tril(torch.ones(b.shape, dtype=torch.bool, device=device))
            else:
                value = torch.zeros(b.shape, dtype=b.dtype, device=device)
            module.register_buffer(name, value, persistent=name not in module._non_persistent_buffers_set)
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def _bnb_linear(lin, spec, compute_dtype, device):
    """A bitsandbytes layer with the shape of `lin`, quantized from random weights made on `device`."""
    import bitsandbytes as bnb
    import torch

    w = torch.randn(lin.out_features, lin.in_features, device=device, dtype=compute_dtype) * 0.02
    has_bias = lin.bias is not None
    if spec.dtype == "int8":
        new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=has_bias, has_fp16_weights=False,
                                  threshold=6.0, device="meta")
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(w.to(torch.float16))
        new.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    else:
        new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=has_bias, compute_dtype=compute_dtype,
                                compress_statistics=spec.double_quant, quant_type=spec.dtype, device="meta")
        w4, qs = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=spec.double_quant,
                                              quant_type=spec.dtype, quant_storage=torch.uint8)
        new.weight = bnb.nn.Params4bit(w4, requires_grad=False, quant_state=qs, blocksize=64,
                                       compress_statistics=spec.double_quant, quant_type=spec.dtype,
                                       bnb_quantized=True, module=new)
        new.quant_state = qs
    del w
    if has_bias:
        new.bias = torch.nn.Parameter(torch.zeros(lin.out_features, device=device, dtype=compute_dtype),
                                      requires_grad=False)
    return new


def build_on_gpu(spec, real_model_dir="", device="cuda"):
    """The model for a validated spec, on the GPU, with the spec's training setup applied."""
    import torch
    import transformers

    from ..workload.models import hf_config, param_dtype, prepare_for_training, torch_dtype

    if spec.dtype in ("gptq-int4", "awq-int4", "fp8") or spec.dtype.startswith("q"):
        raise NotImplementedError(f"--dtype {spec.dtype}: GPU measurement covers float and bitsandbytes dtypes")
    compute = torch_dtype(spec.compute_dtype)
    if real_model_dir:
        kw = dict(local_files_only=True, attn_implementation=spec.attn, device_map={"": device})
        if spec.dtype in ("int8", "nf4", "fp4"):
            kw["quantization_config"] = transformers.BitsAndBytesConfig(
                load_in_8bit=spec.dtype == "int8", load_in_4bit=spec.dtype != "int8", bnb_4bit_quant_type=spec.dtype,
                bnb_4bit_use_double_quant=spec.double_quant, bnb_4bit_compute_dtype=compute)
        else:
            kw["dtype"] = torch_dtype(param_dtype(spec))
        model = transformers.AutoModelForCausalLM.from_pretrained(real_model_dir, **kw)
    elif spec.dtype in ("int8", "nf4", "fp4"):
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(hf_config(spec), dtype=compute,
                                                                  attn_implementation=spec.attn)
        out_emb = model.get_output_embeddings()
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear and child is not out_emb:
                    setattr(parent, name, _bnb_linear(child, spec, compute, device))
        _materialize_meta(model, device)
    else:
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(hf_config(spec), dtype=torch_dtype(param_dtype(spec)),
                                                                  attn_implementation=spec.attn)
    return prepare_for_training(model, spec)


def make_gpu_optimizer(model, spec):
    """bitsandbytes optimizers here; the torch/transformers ones from harness.workload.steps."""
    from ..workload.steps import make_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    if spec.optimizer in ("adamw8bit", "paged_adamw8bit", "lion"):
        import bitsandbytes as bnb

        cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit,
               "lion": bnb.optim.Lion}[spec.optimizer]
        return cls(params, lr=1e-4)
    return make_optimizer(params, spec)


class _PhaseStats:
    """Per-phase torch allocator peaks, reset at each boundary (repeated phases accumulate their max)."""

    def __init__(self, torch, sampler):
        self.torch, self.sampler = torch, sampler
        self.current = None
        self.phases = {}
        self.t_marks = []

    def close(self):
        if self.current is None:
            return
        t = self.torch
        t.cuda.synchronize()
        ph = self.phases.setdefault(self.current, {"max_allocated_bytes": 0, "max_reserved_bytes": 0})
        ph["max_allocated_bytes"] = max(ph["max_allocated_bytes"], int(t.cuda.max_memory_allocated()))
        ph["max_reserved_bytes"] = max(ph["max_reserved_bytes"], int(t.cuda.max_memory_reserved()))

    def mark(self, phase):
        if phase == self.current:
            return
        self.close()
        self.torch.cuda.reset_peak_memory_stats()
        self.sampler.mark(phase)
        self.current = phase
        self.t_marks.append((phase, time.perf_counter()))


def measure(exp, device_index=0):
    """Run one experiment on the GPU and return the `measured` part of its record."""
    launched_at = float(os.environ.get("VRAMLAB_LAUNCHED_AT", "0") or 0)
    started_wall = time.time()
    t_start = time.perf_counter()
    before = nvml.used_bytes(device_index)
    others = [p for p, _ in nvml.processes(device_index) if p != os.getpid()]
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available to torch in this process")
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    after = nvml.used_bytes(device_index)
    t_cuda = time.perf_counter()
    context = (after - before - SMALL_SEGMENT) if before is not None and after is not None else None
    spec = validate(exp.spec, get_shape(exp.spec.model))
    from ..workload.steps import run_inference, run_training

    sampler = NvmlSampler(device_index, exp.sample_interval_ms / 1000.0)
    stats = _PhaseStats(torch, sampler)
    with sampler:
        stats.mark("load")
        model = build_on_gpu(spec, exp.real_model_dir)
        torch.cuda.synchronize()
        t_built = time.perf_counter()
        if spec.mode == "inference":
            run_inference(model, spec, mark=stats.mark, device="cuda")
        else:
            opt = make_gpu_optimizer(model, spec)
            run_training(model, spec, mark=stats.mark, device="cuda", steps=exp.steps, optimizer=opt)
        stats.close()
        t_done = time.perf_counter()
    phases = stats.phases
    for ph, pk in sampler.peaks.items():
        phases.setdefault(ph, {}).update({"nvml_device_used_bytes": pk["device_used_bytes"],
                                          "nvml_process_used_bytes": pk["process_used_bytes"]})
    peak_phase = max(phases, key=lambda p: phases[p].get("max_allocated_bytes", 0))
    dev_peak, dev_phase = sampler.peak("device_used_bytes")
    others_during = [p for p, _ in nvml.processes(device_index) if p != os.getpid()]
    workload_s = t_done - t_built
    out = {
        "peak_allocated_bytes": phases[peak_phase]["max_allocated_bytes"],
        "peak_reserved_bytes": max(p.get("max_reserved_bytes", 0) for p in phases.values()),
        "peak_phase": peak_phase,
        "peak_device_bytes": (dev_peak - before) if dev_peak is not None and before is not None else None,
        "peak_device_phase": dev_phase,
        "cuda_context_bytes": context,
        "device_used_before_bytes": before,
        "other_processes": sorted(set(others) | set(others_during)),
        "device_figures_flagged": bool(others or others_during),
        "phases": phases,
        "sampler": {"samples": sampler.samples, "interval_ms": exp.sample_interval_ms, "busy_s": round(sampler.busy_s, 4),
                    "overhead_fraction": round(sampler.busy_s / workload_s, 5) if workload_s > 0 else None,
                    "timeline": sampler.timeline},
        "timings": {
            "launch_to_measure_s": round(started_wall - launched_at, 3) if launched_at else None,  # process start + imports
            "cuda_init_s": round(t_cuda - t_start, 3),
            "build_s": round(t_built - t_cuda, 3),
            "workload_s": round(workload_s, 3),
        },
    }
    out["device_breakdown"] = measured_device_breakdown(out)  # context, workspaces, allocator slack
    return out
