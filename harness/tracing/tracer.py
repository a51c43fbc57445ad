"""Trace a workload on fake tensors and count every tensor's bytes per memory category.

The real transformers model code runs — built and executed inside
`torch._subclasses.fake_tensor.FakeTensorMode`, so tensors carry shapes, dtypes and strides
but no data, and a 70B model "fits" in a laptop. The counting is `tracker.CategoryTracker`'s,
the same that GPU measurement runs on real tensors; the categories and how a storage gets one
are described there.

Where the CPU run differs from CUDA, and what is done about it (autograd on fake CUDA tensors
fails without a GPU, "hasPrimaryContext expects a valid device index", so the device is CPU):
- dropout: `F.dropout` on CPU is a composite (`bernoulli_` noise in the input dtype, saved by
  `mul`); CUDA runs the fused `native_dropout`, saving a bool mask. The tracer routes
  `F.dropout` to `aten.native_dropout` so the CUDA mask is what gets counted.
- SDPA: the CPU picks its own kernels (`_scaled_dot_product_flash_attention_for_cpu`, or the
  math kernel — the whole score matrix — with dropout, a mask, or unequal q/v head dims as in
  MLA). The tracer calls the kernel CUDA would pick (`cuda_sdpa_backend`: flash, or
  memory-efficient for fp32, masks and MLA's narrower values, or the composite math kernel —
  fp32 with grouped K/V heads before torch 2.13); their fake kernels run on any device and
  allocate what the CUDA kernels allocate (the output's memory layout included, which decides
  whether `transpose(1, 2).contiguous()` copies).
- autocast runs as CPU autocast, whose op lists (`autocast_mode.cpp`) differ from CUDA's in
  a few fp32-promoted ops; the models here upcast explicitly where it matters (norms, loss).
- transformers treats fake tensors as graph tracing (`is_tracing`) and would then materialize
  causal masks that a real run skips; the tracker lets it ask only about compilers, and answers
  `.item()` on a fake value with 1 / True ("no padding", "not packed").
- kernel workspaces (cuBLAS, flash split-KV), CUDA context and allocator slack are invisible
  here; `estimated_reserved_bytes` covers the slack from block rounding and caching only.
- the caching allocator rounds every block to 512 bytes; `peak_allocated_bytes` and the
  breakdown are exact tensor bytes (what the formulas predict), `estimated_max_allocated_bytes`
  the rounded figure `torch.cuda.max_memory_allocated` would show.
"""

import contextlib
import time
from dataclasses import dataclass, field, fields

from formulas import categories as C
from formulas.catalog import get_shape
from formulas.spec import Spec, SpecError, validate

from ..workload.models import build_model, check_traceable
from .tracker import DDP_BUCKETS, CategoryTracker, TrackedMemory

_UNTRACEABLE_OPTIMIZERS = ("adamw8bit", "paged_adamw8bit", "lion")


@dataclass(kw_only=True)
class TraceResult(TrackedMemory):
    """Traced memory of one workload: what the category tracker counted on fake tensors, and the run."""

    spec: Spec  # the validated spec
    seconds: float  # wall time of the trace (build + workload)
    notes: list = field(default_factory=list)  # what the trace assumed or could not do
    n_params: int = 0  # parameters of the built model
    rank: int = None  # the fake rank these figures are of (multi-GPU specs), else None
    ranks: list = field(default_factory=list)  # every traced rank: {rank, peak_allocated_bytes, peak_phase, breakdown, phases}

    @property
    def device_breakdown(self):
        """Device categories as far as fake tensors tell: allocator slack from the allocator simulation; no context."""
        return {C.CUDA_CONTEXT: None, C.ALLOCATOR_SLACK: self.estimated_reserved_bytes - self.estimated_max_allocated_bytes}

    def to_dict(self):
        """JSON-ready dict; bytes stay integers."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "stream"}
        d["spec"] = self.spec.to_dict()
        d["timeline"] = [[i, ph, total, dict(cats)] for i, ph, total, cats in self.timeline]
        d["device_breakdown"] = self.device_breakdown
        return d


# ------------------------------------------------------------------ CUDA-like kernels on the CPU

def cuda_sdpa_backend(query, key, value, attn_mask=None, enable_gqa=False, spec=None, cc=None):
    """The SDPA kernel CUDA picks on sm80+ (flash, efficient or math), after `sdp_utils.cpp` select_sdp_backend —
    the rules of formulas.device.sdpa_backend, read off the tensors.

    Flash: fp16/bf16, no mask, q/k/v head dims equal and ≤ 256, grouped K/V heads allowed.
    Memory-efficient: any float dtype, masks, v head dim may differ (MLA), head dims aligned to
    16 bytes; grouped K/V heads only from torch 2.13 (`spec`'s stack; None: the newest). Otherwise math.
    (cuDNN attention, which recent torch prefers on sm90/sm100, holds what flash holds.)"""
    import torch

    from formulas.device import sdpa_backend
    from formulas.stack import behaviour

    if query.dim() != 4:
        return "math"
    hq, hk, hv = query.shape[-1], key.shape[-1], value.shape[-1]
    grouped = not (query.shape[1] == key.shape[1] == value.shape[1])
    if grouped and not enable_gqa:
        return "math"
    if spec is not None:  # the formulas' rule on dtype, head dims, mask, grouped heads, architecture and torch version
        backend = sdpa_backend(spec, head_dim_qk=hq, head_dim_v=hv, grouped=grouped, masked=attn_mask is not None,
                               cc=cc)
        if backend == "flash" and query.dtype not in (torch.float16, torch.bfloat16):
            backend = "efficient"  # the spec's compute dtype says half; these tensors are not (an fp32 upcast)
    else:
        half = query.dtype in (torch.float16, torch.bfloat16)
        backend = "flash" if attn_mask is None and half and hq == hk == hv <= 256 else \
            "math" if grouped and not behaviour((), "sdpa_efficient_gqa") else "efficient"
    align = 16 // query.element_size()
    if backend == "efficient" and not (hq == hk and hq % align == 0 and hv % align == 0):
        return "math"
    return backend


def installed_torch(spec):
    """`spec` with the installed torch in its stack: the kernels the tracer runs are the installed torch's (its meta
    functions, e.g. whether the memory-efficient kernel takes grouped K/V heads), whatever torch the spec asks for —
    `vramlab trace` runs the installed libraries, and names the behaviours that differ from the asked stack."""
    from ..env import installed_versions

    version = installed_versions().get("torch")
    if spec is None or not version:
        return spec
    return spec.replace(stack=tuple((p, v) for p, v in spec.stack if p != "torch") + (("torch", version),))


@contextlib.contextmanager
def _cuda_like_kernels(notes, spec=None, cc=None):
    """Route dropout and SDPA to the kernels CUDA would run (see the module docstring); `spec`: whose stack decides
    (torch's version picks the SDPA kernels)."""
    import torch
    import torch.nn.functional as F

    orig_dropout, orig_sdpa = F.dropout, F.scaled_dot_product_attention
    used = set()

    def dropout(input, p=0.5, training=True, inplace=False):
        if training and 0.0 < p < 1.0 and not inplace and input.is_floating_point():
            used.add("dropout")
            return torch.ops.aten.native_dropout(input, p, True)[0]
        return orig_dropout(input, p, training, inplace)

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if torch.is_autocast_enabled(query.device.type):
            # CUDA autocast runs SDPA in the lower precision (`autocast_mode.cpp`, lower_precision_fp list):
            # fp32 inputs (q and k after RoPE with fp32 cos/sin) are cast, and the casts are what it saves.
            low = torch.get_autocast_dtype(query.device.type)
            query, key, value = (t.to(low) if t.is_floating_point() else t for t in (query, key, value))
            if attn_mask is not None and attn_mask.is_floating_point():
                attn_mask = attn_mask.to(low)
        backend = cuda_sdpa_backend(query, key, value, attn_mask, enable_gqa, spec, cc)
        if backend == "flash":
            used.add("flash")
            return torch.ops.aten._scaled_dot_product_flash_attention(
                query, key, value, dropout_p, is_causal, False, scale=scale)[0]
        if backend == "efficient":
            used.add("efficient")
            lse = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
            return torch.ops.aten._scaled_dot_product_efficient_attention(
                query, key, value, attn_mask, lse, dropout_p, is_causal, scale=scale)[0]
        used.add("math")
        # the composite math kernel itself (the CPU would pick its own fused kernel): its score matrix and softmax
        return torch.ops.aten._scaled_dot_product_attention_math(
            query, key, value, attn_mask, dropout_p, is_causal, None, scale=scale, enable_gqa=enable_gqa)[0]

    F.dropout, F.scaled_dot_product_attention = dropout, sdpa
    try:
        yield
    finally:
        F.dropout, F.scaled_dot_product_attention = orig_dropout, orig_sdpa
        if "dropout" in used:
            notes.append("dropout traced as CUDA's fused native_dropout (bool mask), not the CPU composite")
        if used - {"dropout"}:
            notes.append("SDPA traced with the kernel CUDA would pick (not the CPU's): " + ", ".join(sorted(used - {"dropout"})))


@contextlib.contextmanager
def _fake_module_conversions(fake_mode):
    """Let `Module.to()` convert fake parameters (peft casts its adapters, freeze casts layers).

    `Module._apply` swaps fake parameters in place with `torch.utils.swap_tensors`, which refuses
    tensors that have weak references — and the fake mode's MetaConverter memo keeps one to every
    fake tensor it made. Dropping that memo (a cache of real → fake conversions) right before each
    swap is harmless here: nothing converts the same real tensor twice."""
    import torch

    orig = torch.utils.swap_tensors
    memo = fake_mode.fake_tensor_converter.meta_converter.tensor_memo

    def swap_tensors(t1, t2):
        memo.clear()
        return orig(t1, t2)

    torch.utils.swap_tensors = swap_tensors
    try:
        yield
    finally:
        torch.utils.swap_tensors = orig


@contextlib.contextmanager
def fake_ranks(world, rank=0):
    """This process plays `rank` of `world` in PyTorch's fake process group (every collective returns at
    once, moving nothing). DDP's construction-time checks and its bucket rebuild read parameter data,
    which fake tensors have none of, so they are skipped; its all-reduce is replaced by a hook that returns the bucket as is —
    what NCCL's in-place all-reduce leaves — since the fake group's future carries no tensor."""
    import torch
    import torch.distributed as dist
    import torch.nn.parallel.distributed as ddp
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialized in this process; trace multi-rank specs in a fresh one")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)

    def bucket_as_is(state, bucket):
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    orig = ddp._verify_param_shape_across_processes, ddp._sync_module_states, ddp.DistributedDataParallel.__init__

    def ddp_init(self, *args, **kwargs):
        # Rebuilding the buckets after the first step (in the order gradients arrived) copies parameter
        # data; the reducer skips it when it looks for unused parameters. Same buckets, same bytes.
        kwargs["find_unused_parameters"] = True
        orig[2](self, *args, **kwargs)
        self.register_comm_hook(None, bucket_as_is)

    # A DeviceMesh computes its rank tensor (and its coordinates) from real index tensors when it is built
    # and each time it is read; FSDP2 over a TP-sharded model builds one, concatenating the dp and tp
    # meshes, inside the fake mode. That arithmetic runs on real tensors.
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed.device_mesh import DeviceMesh

    mesh_prop, mesh_init = DeviceMesh.mesh, DeviceMesh.__init__

    def real_mesh(self):
        with unset_fake_temporarily():
            return mesh_prop.fget(self)

    def real_init(self, *args, **kwargs):
        with unset_fake_temporarily():
            mesh_init(self, *args, **kwargs)

    ddp._verify_param_shape_across_processes = ddp._sync_module_states = lambda *a, **k: None
    ddp.DistributedDataParallel.__init__ = ddp_init
    DeviceMesh.mesh, DeviceMesh.__init__ = property(real_mesh), real_init
    try:
        yield
    finally:
        ddp._verify_param_shape_across_processes, ddp._sync_module_states, ddp.DistributedDataParallel.__init__ = orig
        DeviceMesh.mesh, DeviceMesh.__init__ = mesh_prop, mesh_init
        dist.destroy_process_group()
        _clear_dtensor_caches()


def _clear_dtensor_caches():
    """DTensor caches redistribution plans and sharding rules by mesh shape, and they name the process
    groups they were made with; the next rank's fake group has new ones. Each cache is cleared where
    this torch has it."""
    from torch.distributed.tensor import DTensor, _collective_utils, _redistribute

    prop = DTensor._op_dispatcher.sharding_propagator
    for fn in (getattr(_redistribute, "_gen_transform_infos", None),
               getattr(prop, "propagate_op_sharding", None),
               getattr(type(prop), "_propagate_tensor_meta_cached", None),
               getattr(getattr(_collective_utils, "MeshTopoInfo", None), "build_from_mesh", None)):
        if hasattr(fn, "cache_clear"):
            fn.cache_clear()
    if hasattr(_redistribute, "clear_redistribute_planner_cache"):
        _redistribute.clear_redistribute_planner_cache()


# ------------------------------------------------------------------ entry point

MAX_TRACED_RANKS = 8  # beyond this many ranks, the first and the last are traced (FSDP/DDP/TP ranks differ only
# by padding; ZeRO-1's greedy split does not follow rank order, so beyond 8 the heaviest rank may go untraced)


class RankTraceError(ValueError):
    """A rank's tracing process died: one line, not a hang."""


def trace(spec, rank=None, overheads=None, allocator_config=None, keep_stream=False):
    """Run `spec`'s workload on fake tensors and return its per-category memory (TraceResult).

    `overheads` (formulas.overhead.Overheads: the GPU's architecture and environment) sizes the cuBLAS workspaces
    the run allocates; `allocator_config` (harness.tracing.allocator.AllocatorConfig) is the caching allocator's
    settings the allocation stream is replayed under; `keep_stream` keeps that stream in the result.

    A multi-GPU spec is traced rank by rank in a fake process group of `spec.gpus` ranks (every rank up
    to MAX_TRACED_RANKS, else the first and the last, or only `rank`); the result is the rank with the
    highest peak — the GPU that needs the most, as `predict` answers — with every traced rank's
    figures in `ranks`."""
    shape = get_shape(spec.model)  # a general-inventory model: harness.inventory.ensure_for_model first
    spec = validate(spec, shape)
    check_traceable(spec)
    if spec.mode == "train" and spec.optimizer in _UNTRACEABLE_OPTIMIZERS:
        raise SpecError(f"--optimizer {spec.optimizer}: bitsandbytes optimizers need their CUDA kernels; "
                        "trace adamw, sgd, sgd_momentum or adafactor")
    opts = dict(overheads=overheads, allocator_config=allocator_config, keep_stream=keep_stream)
    if spec.gpus == 1:
        return _trace_rank(spec, shape, None, **opts)
    if rank is not None and not 0 <= rank < spec.gpus:
        raise SpecError(f"--rank {rank}: the ranks are 0 to {spec.gpus - 1}")
    ranks = [rank] if rank is not None else (
        range(spec.gpus) if spec.gpus <= MAX_TRACED_RANKS else [0, spec.gpus - 1])
    # Each rank in a forked child: torch.distributed and DTensor keep process-global state (group names,
    # meshes, cached redistribution plans) that a second fake world in the same process would trip over.
    t0 = time.perf_counter()
    by_rank = _trace_ranks_forked(spec, shape, ranks, opts)
    results = [by_rank[r] for r in ranks]
    worst = max(results, key=lambda r: r.peak_allocated_bytes)
    worst.ranks = [{"rank": r, "peak_allocated_bytes": res.peak_allocated_bytes, "peak_phase": res.peak_phase,
                    "breakdown": res.breakdown, "phases": res.phases} for r, res in zip(ranks, results)]
    worst.seconds = time.perf_counter() - t0  # wall time: ranks trace side by side
    worst.notes.append(f"{len(results)} of {spec.gpus} fake ranks traced; the figures are rank {worst.rank}'s, "
                       "the highest peak")
    return worst


def _rank_child(conn, spec, shape, rank, opts):
    """A forked child: trace one rank, send (True, TraceResult) or (False, (error type, message))."""
    try:
        conn.send((True, _trace_rank(spec, shape, rank, **opts)))
    except BaseException as e:  # the parent turns it into its own error
        conn.send((False, (isinstance(e, ValueError), f"{type(e).__name__}: {e}" if not isinstance(e, ValueError)
                           else str(e))))
    finally:
        conn.close()


def _trace_ranks_forked(spec, shape, ranks, opts):
    """{rank: TraceResult}, each rank in a fresh forked child, as many at once as there are CPUs. A child
    that dies without an answer (killed, out of memory) is one RankTraceError naming its rank; every
    child is stopped when the parent stops (an error, Ctrl-C)."""
    import multiprocessing
    import os

    ctx = multiprocessing.get_context("fork")
    workers = min(len(ranks), os.cpu_count() or 1)
    pending, running, done = list(ranks), {}, {}
    try:
        while pending or running:
            while pending and len(running) < workers:
                r = pending.pop(0)
                recv, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_rank_child, args=(send, spec, shape, r, opts), daemon=True)
                proc.start()
                send.close()
                running[r] = (proc, recv)
            for r, (proc, recv) in list(running.items()):
                if recv.poll(0.05):
                    try:
                        ok, payload = recv.recv()
                    except EOFError:
                        ok, payload = None, None
                    if ok is None:
                        raise RankTraceError(f"--gpus {spec.gpus}: the process tracing rank {r} died (killed, or "
                                             "out of memory); nothing was traced")
                    proc.join()
                    del running[r]
                    if not ok:
                        is_value, message = payload
                        raise (ValueError if is_value else RuntimeError)(message)
                    done[r] = payload
                elif not proc.is_alive() and not recv.poll(0):
                    raise RankTraceError(f"--gpus {spec.gpus}: the process tracing rank {r} died (exit status "
                                         f"{proc.exitcode}: killed, or out of memory); nothing was traced")
    finally:
        for proc, _ in running.values():
            if proc.is_alive():
                proc.kill()
            proc.join()
    return done


def _trace_rank(spec, shape, rank, overheads=None, allocator_config=None, keep_stream=False):
    """Trace one rank (`rank` None: a single-GPU spec)."""
    from formulas.overhead import DEFAULT_OVERHEADS

    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..workload.parallel import make_parallel_optimizer, replicate, shard
    from ..workload.steps import TRAIN_STEPS, run_inference, run_training

    t0 = time.perf_counter()
    notes = []
    fake_mode = FakeTensorMode()
    ranks = fake_ranks(spec.gpus, rank) if rank is not None else contextlib.nullcontext()
    with ranks, fake_mode, _cuda_like_kernels(notes, installed_torch(spec), (overheads or DEFAULT_OVERHEADS).cc):
        with _fake_module_conversions(fake_mode):
            model = build_model(spec)
        n_params = sum(p.numel() for p in model.parameters())
        model = shard(model, spec)  # FSDP2 / TP replace the parameters by this rank's shards
        ws = (overheads or DEFAULT_OVERHEADS).workspace_bytes(spec, biased=any(t.kind == "bias" for t in shape.tensors))
        with CategoryTracker(model, spec, shape.vocab, device_type="cpu", workspace_bytes=ws) as tracker:
            with tracker.labelled(DDP_BUCKETS):  # DDP allocates its gradient buckets when it wraps the model
                run = replicate(model, spec)
            if spec.mode == "inference":
                kept = run_inference(run, spec, tracker.mark)
            else:
                kept = run_training(run, spec, tracker.mark, optimizer=make_parallel_optimizer(run, spec))
        del model, run, kept
    memory = tracker.result(allocator_config, keep_stream)
    seconds = time.perf_counter() - t0
    if shape.is_mla and spec.mode == "inference" and spec.mla_cache == "expanded":
        notes.append("MLA: transformers caches the compressed latent (kv_lora_rank + qk_rope_head_dim per layer), "
                     "whatever --mla-cache says; compare with --mla-cache compressed")
    if spec.mode == "train":
        notes.append(f"{TRAIN_STEPS} optimizer steps of {spec.grad_accum} micro-batch(es); figures are the max over them")
        if spec.recipe != "hf" or spec.loss != "auto":
            notes.append(f"recipe {spec.recipe}: its kernels and loss run as PyTorch functions that allocate what the "
                         "kernels allocate (outputs, saved tensors); their arithmetic, in registers on a GPU, is not "
                         "counted (harness/workload/recipes.py); host RAM: its pinned offload buffers")
    notes.append(f"fake tensors on the CPU: cuBLAS workspaces as a GPU of sm{(overheads or DEFAULT_OVERHEADS).cc[0]}"
                 f"{(overheads or DEFAULT_OVERHEADS).cc[1]} allocates them ({ws / 2**20:.3g} MiB per GEMM thread); "
                 "reserved memory from the allocator simulation; the CUDA context is not traced")
    return TraceResult(spec=spec, seconds=seconds, notes=notes, n_params=n_params, rank=rank, **vars(memory))


def plot_timeline(result, path):
    """Write a memory-over-time PNG: live bytes stacked by category, phase boundaries marked, y in GiB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from formulas.units import GiB

    rows = result.timeline
    cats = [c for c in C.TENSOR_CATEGORIES if any(cs.get(c) for _, _, _, cs in rows)]
    xs = [i for i, _, _, _ in rows]
    ys = [[cs.get(c, 0) / GiB for _, _, _, cs in rows] for c in cats]
    fig, ax = plt.subplots(figsize=(11, 5))
    ax.stackplot(xs, ys, labels=cats, step="post")
    top = max((t for _, _, t, _ in rows), default=0) / GiB
    prev = None
    for i, ph, _, _ in rows:
        if ph != prev:
            ax.axvline(i, color="0.3", lw=0.6, ls=":")
            ax.text(i, top * 1.12, f" {ph}", rotation=90, va="top", ha="left", fontsize=7, color="0.2")
            prev = ph
    ax.axhline(result.peak_allocated_bytes / GiB, color="k", lw=0.8)
    s = result.spec
    ax.set_title(f"{s.model} · {s.mode} · {s.dtype} · batch {s.batch} × seq {s.seq} — traced peak "
                 f"{result.peak_allocated_bytes / GiB:.2f} GiB at {result.peak_phase}", fontsize=9)
    ax.set_xlabel("allocation event")
    ax.set_ylabel("live tensor memory (GiB)")
    ax.set_ylim(0, top * 1.13 if top else 1)
    ax.legend(loc="lower right", fontsize=7, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
