"""GPU measurement of one experiment: build the model on the GPU, run the workload, measure around it.

Measurement wraps the workload (harness.workload knows nothing of it): the workload calls
`mark(phase)`; at each phase boundary this module synchronises, records the caching
allocator's peak allocated and reserved bytes of the phase that ends and resets them, the
NVML sampler attributes its samples to the new phase, and (unless the experiment turns it off)
the category tracker of harness/tracing/tracker.py counts the real tensors by category.

What is recorded (the record's `measured`):
- `cuda_context_bytes`: NVML device-used after CUDA initialisation minus before it (minus the
  one small allocator segment the probe tensor takes), once per process;
- `workspaces_bytes`: the cuBLAS workspaces the measuring thread holds in the caching allocator at the
  end of the workload (what clearing them frees; autograd's thread keeps its own in training);
- `allocator_settings`: PYTORCH_ALLOC_CONF / PYTORCH_CUDA_ALLOC_CONF as the process ran;
- per phase: max allocated / reserved (torch), peak device-used and process-used (NVML);
- `peak_device_bytes`: the NVML peak minus what the device used before this process started
  CUDA, i.e. this process's footprint as nvidia-smi would show it; flagged when other processes
  used the GPU during the run;
- `breakdown` and `tracked`: the tensor categories at the tracker's peak, per phase, and the
  tracker's own peak (what a traced record has, from real tensors);
- `device_breakdown`: the device categories — what the device held outside the caching allocator
  (device peak − peak reserved: the context and the kernel images loaded) and allocator slack (peak
  reserved − peak allocated) — and the workspaces inside the allocated peak;
- `process`: which process measured it — its pid, the NVML pid the driver reports for it (a
  host pid in a container), `cold` (a fresh process) or `warm` (the k-th experiment of a
  long-lived one, after `reset_between_experiments`), and what a warm reset left behind;
- `capped`: the card this run stood in for, when the sweep caps the process to a smaller GPU;
- timings: process start → CUDA ready → model built → workload done → tracker replayed, and the
  sampler's own CPU time as a fraction of the workload time (its overhead; harness/gpu/sampler.py);
- `tracked.window`: which steps the category tracker counted op by op (harness/tracing/tracker.py).

An out-of-memory error ends the workload but not the measurement: `MeasuredOOM` carries the
phases completed before it, the phase that failed, the requested and free bytes and the peaks
so far, and the worker records them with outcome `oom`.

Which GPU: the launcher runs each worker with CUDA_DEVICE_ORDER=PCI_BUS_ID (CUDA numbers GPUs as
NVML does), CUDA_VISIBLE_DEVICES=<slot> and VRAMLAB_NVML_INDEX=<slot>; the GPU torch sees is then
checked against NVML by UUID, and the NVML index corrected if they disagree. A multi-GPU experiment
gets the lists of its GPUs, and each of its ranks (harness.sweep.ranks) measures its own GPU this way.
"""

import contextlib
import gc
import os
import re
import sys
import time

from formulas.catalog import get_shape
from formulas.hardware import get_hardware
from formulas.spec import validate

from ..records import measured_device_breakdown
from . import nvml
from .build import build_on_device, make_optimizer_on_device
from .sampler import NvmlSampler

SMALL_SEGMENT = 2 * 2**20  # kSmallBuffer in c10/cuda/CUDACachingAllocator.cpp: the probe tensor's segment
_PROCESS = {}  # this process's CUDA state, made by the first measurement (see `_cuda_process`)


class MeasuredOOM(Exception):
    """The workload ran out of memory; `measured` holds what was measured up to that moment."""

    def __init__(self, measured, details):
        super().__init__(details.get("message", "out of memory"))
        self.measured, self.details = measured, details


_OOM_REQ = re.compile(r"Tried to allocate ([\d.]+) (GiB|MiB|KiB|bytes|B)\b")
_UNIT = {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10, "bytes": 1, "B": 1}


def is_oom(e):
    """True for CUDA's out-of-memory error (and the allocator's message in other exception types)."""
    return type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()


def oom_details(e):
    """The error's type and first line, the requested bytes parsed from the allocator's message, and the
    device's free memory now."""
    d = {"type": type(e).__name__, "message": str(e).splitlines()[0][:500] if str(e) else type(e).__name__}
    m = _OOM_REQ.search(str(e))
    if m:
        d["requested_bytes"] = int(float(m.group(1)) * _UNIT[m.group(2)])
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        try:
            free, total = torch.cuda.mem_get_info()
            d["free_bytes"], d["total_bytes"] = int(free), int(total)
        except Exception:
            pass
    return d


# ------------------------------------------------------------------ which GPU, which process

def nvml_index():
    """The NVML index of the GPU this process measures (the launcher's VRAMLAB_NVML_INDEX, else 0); of a
    multi-GPU experiment's list, the first (each rank sets its own: harness.sweep.ranks)."""
    try:
        return int(os.environ.get("VRAMLAB_NVML_INDEX", "0").split(",")[0])
    except ValueError:
        return 0


def _uuid_key(uuid):
    """NVML says 'GPU-8c2b…', torch '8c2b…': compare the hex digits only."""
    return "".join(ch for ch in str(uuid).lower().removeprefix("gpu-") if ch in "0123456789abcdef")


def reconcile_index(index, torch_uuid, nvml_uuid_of):
    """(NVML index to measure, corrected?) for the GPU torch sees: `index` if its UUID matches, else the one that does."""
    want = _uuid_key(torch_uuid)
    if not want or _uuid_key(nvml_uuid_of(index) or "") == want:
        return index, False
    for i in range(nvml.device_count()):
        if _uuid_key(nvml_uuid_of(i) or "") == want:
            return i, True
    return index, False


def own_nvml_pids(before, after, pid):
    """The pids NVML reports for this process: its own pid where the driver sees it, else the pids that
    appeared when this process made its CUDA context (in a container the driver reports host pids)."""
    if pid in after:
        return {pid}
    return set(after) - set(before)


# ------------------------------------------------------------------ per-phase allocator peaks

class _PhaseStats:
    """Per-phase torch allocator peaks, reset at each boundary (repeated phases accumulate their max)."""

    def __init__(self, torch, sampler):
        self.torch, self.sampler = torch, sampler
        self.current = None
        self.phases = {}
        self.completed = []  # phases whose boundary has passed, in order

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
        if self.current is not None and self.current not in self.completed:
            self.completed.append(self.current)
        self.torch.cuda.reset_peak_memory_stats()
        self.sampler.mark(phase)
        self.current = phase


def run_phases(workload, stats):
    """Run `workload(stats.mark)`; an out-of-memory error stops it and becomes data.

    Returns (None, None), or (oom_details, the phase that was running) after an OOM: the allocator
    peaks of the phases so far are closed, the failing phase's included (its max allocated is the
    moment before the failing request). The exception itself is not kept, so nothing it refers to
    stays alive."""
    try:
        workload(stats.mark)
    except Exception as e:
        if not is_oom(e):
            raise
        details = oom_details(e)
    else:
        stats.close()
        return None, None
    with contextlib.suppress(Exception):  # a CUDA error after the OOM must not hide the figures
        stats.close()
    return details, stats.current


# ------------------------------------------------------------------ the process: cold or warm

def _cuda_process(torch, index, device=0):
    """Make (once) this process's CUDA context on its `device` (the visible GPU it measures) and remember what it
    cost; later calls reuse it (warm)."""
    if _PROCESS:
        _PROCESS["experiments"] += 1
        return _PROCESS
    t0 = time.perf_counter()
    before = nvml.used_bytes(index)
    before_pids = [p for p, _ in nvml.processes(index)]
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available to torch in this process")
    torch.cuda.set_device(device)  # between the readings: under CUDA 12 selecting a device may make its context
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    after = nvml.used_bytes(index)
    after_pids = [p for p, _ in nvml.processes(index)]
    index, corrected = reconcile_index(index, torch.cuda.get_device_properties(device).uuid, nvml.device_uuid)
    if corrected:  # the readings above came from another GPU: keep none of them
        before = after = None
        before_pids, after_pids = [], [p for p, _ in nvml.processes(index)]
    own = own_nvml_pids(before_pids, after_pids, os.getpid())
    _PROCESS.update(
        index=index, index_corrected=corrected, used_before_init=before, used_after_init=after,
        context=(after - before - SMALL_SEGMENT) if before is not None and after is not None else None,
        own_pids=own, others_at_start=sorted(set(after_pids) - own), experiments=1,
        cuda_init_s=round(time.perf_counter() - t0, 3))
    return _PROCESS


def reset_between_experiments():
    """Free what the last experiment left and check the GPU is back where the process began.

    Returns {"clean": bool, "allocated_bytes", "reserved_bytes", "nvml_residual_bytes"}: the caching
    allocator must hold nothing (cuBLAS workspaces freed too); NVML's device-used beyond the
    process's first reading is reported (kernel images loaded by earlier experiments stay)."""
    torch = sys.modules.get("torch")
    if torch is None or not _PROCESS:
        return {"clean": True, "allocated_bytes": 0, "reserved_bytes": 0, "nvml_residual_bytes": 0}
    gc.collect()
    torch.cuda.synchronize()
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()
    bnb_functional = sys.modules.get("bitsandbytes.functional")
    if bnb_functional is not None:  # its cached quantization maps live on the device (name2qmap["dynamic"])
        getattr(bnb_functional, "name2qmap", {}).clear()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.set_per_process_memory_fraction(1.0)  # undo a cap
    allocated, reserved = int(torch.cuda.memory_allocated()), int(torch.cuda.memory_reserved())
    used = nvml.used_bytes(_PROCESS["index"])
    base = _PROCESS["used_after_init"]
    residual = (used - base) if used is not None and base is not None else None
    return {"clean": allocated == 0 and reserved == 0, "allocated_bytes": allocated, "reserved_bytes": reserved,
            "nvml_residual_bytes": residual}


def cublas_workspaces_bytes(torch):
    """What this thread's cuBLAS workspaces held in the caching allocator: the drop in allocated memory when they are
    cleared (aten/src/ATen/cuda/CublasHandlePool.cpp clearCublasWorkspaces). A training step's other workspace, on
    autograd's device thread, is not this thread's to clear; None where torch has no such call."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is None:
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    clear()
    return int(before - torch.cuda.memory_allocated())


def cap_for(exp):
    """(card name or '', bytes) the experiment caps this process to, or None."""
    if exp.cap_gpu:
        return exp.cap_gpu, get_hardware(exp.cap_gpu).usable_bytes
    if exp.cap_bytes:
        return "", exp.cap_bytes
    return None


def cap_fraction(cap_bytes, held_bytes, total_bytes):
    """The per-process memory fraction that leaves the caching allocator `cap_bytes` − what the process
    already holds outside it (its context), of a GPU with `total_bytes`."""
    limit = cap_bytes - max(held_bytes or 0, 0)
    if limit <= 0:
        raise ValueError(f"cap {cap_bytes:,} bytes: the CUDA context alone takes {held_bytes:,}")
    return min(limit / total_bytes, 1.0), limit


# ------------------------------------------------------------------ one experiment

def measure(exp, process=None, local_rank=None):
    """Run one experiment on the GPU and return the `measured` part of its record; MeasuredOOM on OOM.

    `process`: what the worker knows of its process (cold or warm, why it is fresh, what a warm
    reset found); the NVML side is added here. `local_rank`: this process is that rank of a multi-GPU
    run on this machine (harness.sweep.ranks), which sees its siblings' GPUs too: it measures the
    `local_rank`-th visible GPU, the model gets the spec's strategy (harness.workload.parallel) in
    the default process group before it is tracked, and the optimizer is the strategy's."""
    launched_at = float(os.environ.get("VRAMLAB_LAUNCHED_AT", "0") or 0)
    started_wall = time.time()
    import torch

    parallel = local_rank is not None
    proc = _cuda_process(torch, nvml_index(), local_rank or 0)
    index = proc["index"]
    spec = validate(exp.spec, get_shape(exp.spec.model))
    from ..workload.steps import run_inference, run_training

    capped = None
    cap = cap_for(exp)
    if cap:
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        fraction, limit = cap_fraction(cap[1], proc["context"], total)
        torch.cuda.set_per_process_memory_fraction(fraction)
        capped = {"gpu": cap[0] or None, "cap_bytes": cap[1], "allocator_limit_bytes": limit, "fraction": fraction,
                  "device_total_bytes": int(total)}
    own = proc["own_pids"]
    sampler = NvmlSampler(index, exp.sample_interval_ms / 1000.0, pid=next(iter(own)) if len(own) == 1 else None,
                          max_interval_s=exp.sample_max_interval_ms / 1000.0)
    stats = _PhaseStats(torch, sampler)
    t_cuda = time.perf_counter()
    built = {}  # the build's time and the tracker, once the model exists

    def workload(mark):
        model = build_on_device(spec, exp.real_model_dir)
        if parallel:
            from ..workload.parallel import shard

            model = shard(model, spec, "cuda")  # FSDP2 / TP: this rank's shards are the parameters
        torch.cuda.synchronize()
        built["t"] = time.perf_counter()
        tracker = None
        if exp.track_categories:
            from ..tracing.tracker import CategoryTracker

            tracker = built["tracker"] = CategoryTracker(model, spec, get_shape(spec.model).vocab, device_type="cuda",
                                                         window=exp.track_window, steps=exp.steps)

        def both(phase):
            mark(phase)
            if tracker is not None:
                tracker.mark(phase)

        with tracker if tracker is not None else contextlib.nullcontext():
            if parallel:  # DDP's gradient buckets, allocated as it wraps the model, are gradients
                from ..tracing.tracker import DDP_BUCKETS
                from ..workload.parallel import replicate

                with tracker.labelled(DDP_BUCKETS) if tracker is not None else contextlib.nullcontext():
                    model = replicate(model, spec)
            if spec.mode == "inference":
                run_inference(model, spec, mark=both, device="cuda")
            else:
                if parallel:
                    from ..workload.parallel import make_parallel_optimizer

                    opt = make_parallel_optimizer(model, spec)
                else:
                    opt = make_optimizer_on_device(model, spec)
                run_training(model, spec, mark=both, device="cuda", steps=exp.steps, optimizer=opt)
        built["workspaces"] = cublas_workspaces_bytes(torch)

    with sampler:
        stats.mark("load")
        oom, failed_phase = run_phases(workload, stats)
        t_done = time.perf_counter()
    phases = stats.phases
    for ph, pk in sampler.peaks.items():
        phases.setdefault(ph, {}).update({"nvml_device_used_bytes": pk["device_used_bytes"],
                                          "nvml_process_used_bytes": pk["process_used_bytes"]})
    with_alloc = [p for p in phases if phases[p].get("max_allocated_bytes") is not None]
    peak_phase = max(with_alloc, key=lambda p: phases[p]["max_allocated_bytes"]) if with_alloc else None
    dev_peak, dev_phase = sampler.peak("device_used_bytes")
    others = sorted((set(proc["others_at_start"]) | {p for p, _ in nvml.processes(index)}) - own)
    before = proc["used_before_init"]
    t_built = built.get("t", t_done)
    workload_s = t_done - t_built
    out = {
        "peak_allocated_bytes": phases[peak_phase]["max_allocated_bytes"] if peak_phase else None,
        "peak_reserved_bytes": max((p.get("max_reserved_bytes", 0) for p in phases.values()), default=None),
        "peak_phase": peak_phase,
        "peak_device_bytes": (dev_peak - before) if dev_peak is not None and before is not None else None,
        "peak_device_phase": dev_phase,
        "cuda_context_bytes": proc["context"],
        "workspaces_bytes": built.get("workspaces"),  # this thread's cuBLAS workspaces, inside peak allocated
        "allocator_settings": {v: os.environ[v] for v in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
                               if os.environ.get(v)},
        "device_used_before_bytes": before,
        "other_processes": others,
        "device_figures_flagged": bool(others),
        "phases": phases,
        "process": {"pid": os.getpid(), "mode": "cold", **(process or {}), "nvml_pids": sorted(own),
                    "experiment_in_process": proc["experiments"], "nvml_index": index,
                    "nvml_index_corrected": proc["index_corrected"]},
        "capped": capped,
        # overhead_fraction: the sampler's CPU time (its thread's, and the marks' samples on this one) over the workload
        "sampler": {"samples": sampler.samples, "process_samples": sampler.process_samples,
                    "interval_ms": exp.sample_interval_ms, "max_interval_ms": sampler.max_interval_s * 1000,
                    "busy_s": round(sampler.busy_s, 4), "thread_cpu_s": round(sampler.thread_cpu_s, 4),
                    "marks_s": round(sampler.marks_s, 4),
                    "overhead_fraction": round(sampler.cpu_s / workload_s, 5) if workload_s > 0 else None,
                    "timeline": sampler.timeline},
        "timings": {
            "launch_to_measure_s": round(started_wall - launched_at, 3) if launched_at and proc["experiments"] == 1
            else None,  # process start + imports
            "cuda_init_s": proc["cuda_init_s"] if proc["experiments"] == 1 else 0.0,
            "build_s": round(t_built - t_cuda, 3),
            "workload_s": round(workload_s, 3),
        },
    }
    tracker = built.get("tracker")
    if tracker is not None:
        t_replay = time.perf_counter()
        mem = tracker.result(timeline=False, reserved=False)  # the GPU measures reserved; nobody reads a timeline
        out["breakdown"] = mem.breakdown
        out["tracked"] = {"peak_allocated_bytes": mem.peak_allocated_bytes, "peak_phase": mem.peak_phase,
                          "phases": mem.phases, "n_ops": mem.n_ops, "peak_tensors": mem.peak_tensors,
                          "window": tracker.window}
        out["timings"]["replay_s"] = round(time.perf_counter() - t_replay, 3)
    out["device_breakdown"] = measured_device_breakdown(out)
    if oom is not None:
        raise MeasuredOOM(out, {**oom, "failed_phase": failed_phase, "completed_phases": list(stats.completed)})
    return out
