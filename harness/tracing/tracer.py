"""Trace a workload on fake tensors and count every tensor's bytes per memory category.

The real transformers model code runs — built and executed inside
`torch._subclasses.fake_tensor.FakeTensorMode`, so tensors carry shapes, dtypes and strides
but no data, and a 70B model "fits" in a laptop. A small TorchDispatchMode (`_Tracker`) sees
every aten op, registers each new storage once (views share their storage; fake tensors
have no real data_ptr, so the key is the `untyped_storage()` object, whose Python identity
torch preserves for the storage's lifetime) and learns of its death from a
`weakref.finalize` on that storage. Live bytes are kept per category
(`formulas.categories.TENSOR_CATEGORIES`) and checked after every op: the highest total is
the peak that `torch.cuda.max_memory_allocated` would report (before 512-byte rounding), each phase keeps
its own peak breakdown, and a timeline records every allocation and free. The sequence is
replayed through a model of the CUDA caching allocator (`harness/tracing/allocator.py`) for an
estimate of reserved memory.

Why its own tracker and not `torch.distributed._tools.mem_tracker.MemTracker`: MemTracker was
tried first and works on CPU fake tensors (with `reset_mod_stats()` between iterations, it
reports the tiny Llama training step's peak within 36 bytes of this tracer), but its categories
are fixed (`_MemRefType`: whatever is born in backward is "Temp", the rest "Activation"), so the
logits, their fp32 gradients, the KV cache and autocast copies cannot be told apart, a storage
cannot move to another category when the workload hands it to a cache or to `.grad`, and after
every op it walks the statistics of every module (slow on an 80-layer model). The counting idea
— storages keyed by identity, weakref finalizers — is the same.

The tracker only logs events (birth, death, re-label, phase mark); `_replay` turns the log into
live bytes per category after every event, the peaks and the timeline. Replaying after the fact
lets a storage whose role is learnt later (optimizer state created inside step 1) carry its
final category from birth.

How a storage gets its category (first match wins; later re-labels move its bytes):
- parameters → weights (LoRA adapters too), module buffers → buffers (at the start);
- `_to_copy` of a parameter (autocast's cached weight cast) → temporaries;
- during optimizer.step → temporaries; after the step the tensors in `optimizer.state` become
  optimizer_states (`step` counters of foreach/for-loop AdamW and SGD are host tensors on
  CUDA and are not counted);
- float outputs of 2 or 3 dims whose last dim is the vocabulary, and everything after the
  output embedding's forward until the end of the CausalLM's forward (the loss) → logits;
  in backward the same rule catches the loss and log-softmax gradients;
- outputs of `Cache.update` (the `torch.cat` that grows K/V) → temporaries while the old
  tensors are alive, then kv_cache once the cache holds them (inference only: in training
  transformers fills a DynamicCache with the very K/V tensors SDPA saves, so they stay
  activations);
- `.grad` after accumulation → gradients;
- everything else born in forward/backward/prefill/decode → activations.

Where the CPU run differs from CUDA, and what is done about it (autograd on fake CUDA tensors
fails without a GPU, "hasPrimaryContext expects a valid device index", so the device is CPU):
- dropout: `F.dropout` on CPU is a composite (`bernoulli_` noise in the input dtype, saved by
  `mul`); CUDA runs the fused `native_dropout`, saving a bool mask. The tracer routes
  `F.dropout` to `aten.native_dropout` so the CUDA mask is what gets counted.
- SDPA: the CPU picks its own kernels (`_scaled_dot_product_flash_attention_for_cpu`, or the
  math kernel — the whole score matrix — with dropout, a mask, or unequal q/v head dims as in
  MLA). The tracer calls the kernel CUDA would pick (`cuda_sdpa_backend`: flash, or
  memory-efficient for fp32, masks and MLA's narrower values); their fake kernels run on any
  device and allocate what the CUDA kernels allocate (the output's memory layout included,
  which decides whether `transpose(1, 2).contiguous()` copies).
- autocast runs as CPU autocast, whose op lists (`autocast_mode.cpp`) differ from CUDA's in
  a few fp32-promoted ops; the models here upcast explicitly where it matters (norms, loss).
- transformers treats fake tensors as graph tracing (`is_tracing`) and would then materialize
  causal masks that a real run skips; the tracer lets it ask only about compilers, and answers
  `.item()` on a fake value with 1 / True ("no padding", "not packed").
- kernel workspaces (cuBLAS, flash split-KV), CUDA context and allocator slack are invisible
  here; `estimated_reserved_bytes` covers the slack from block rounding and caching only.
- the caching allocator rounds every block to 512 bytes; `peak_allocated_bytes` and the
  breakdown are exact tensor bytes (what the formulas predict), `estimated_max_allocated_bytes`
  the rounded figure `torch.cuda.max_memory_allocated` would show.
"""

import contextlib
import time
import weakref
from dataclasses import dataclass, field, fields

from formulas import categories as C
from formulas.catalog import get_shape
from formulas.spec import Spec, SpecError, validate

from ..workload.models import build_model, check_traceable
from .allocator import CachingAllocatorModel

HOST = "host"  # storages that live on the CPU in a CUDA run: not counted
PEAK_TENSORS = 16  # how many of the largest transient storages at each peak the result lists
_UNTRACEABLE_OPTIMIZERS = ("adamw8bit", "paged_adamw8bit", "lion")


@dataclass
class TraceResult:
    """Traced memory of one workload, as integer bytes by memory category."""

    spec: Spec  # the validated spec
    breakdown: dict  # tensor category → bytes at the overall peak
    peak_allocated_bytes: int  # live tensor bytes at the peak (unrounded max_memory_allocated)
    peak_phase: str  # phase holding the peak
    phases: dict  # phase → {tensor category → bytes} at that phase's own peak
    timeline: list  # (event index, phase, total bytes, {category: bytes}) per allocation / free / phase mark
    estimated_reserved_bytes: int  # peak reserved by a modelled CUDA caching allocator
    seconds: float  # wall time of the trace (build + workload)
    notes: list = field(default_factory=list)  # what the trace assumed or could not do
    estimated_max_allocated_bytes: int = 0  # peak allocated with the allocator's 512-byte rounding
    n_params: int = 0  # parameters of the built model
    n_ops: int = 0  # aten ops dispatched
    category_max: dict = field(default_factory=dict)  # phase → {category → its own largest value in the phase}
    peak_tensors: list = field(default_factory=list)  # largest storages alive at the peak (weights, buffers, optimizer state left out): category, bytes, op, shape
    phase_tensors: dict = field(default_factory=dict)  # phase → the same list at that phase's own peak

    @property
    def device_breakdown(self):
        """Device categories as far as fake tensors tell: allocator slack from the allocator model; no context or workspaces."""
        return {C.CUDA_CONTEXT: None, C.WORKSPACES: None,
                C.ALLOCATOR_SLACK: self.estimated_reserved_bytes - self.estimated_max_allocated_bytes}

    def to_dict(self):
        """JSON-ready dict; bytes stay integers."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["spec"] = self.spec.to_dict()
        d["timeline"] = [[i, ph, total, dict(cats)] for i, ph, total, cats in self.timeline]
        d["device_breakdown"] = self.device_breakdown
        return d


_ALLOC, _FREE, _RELABEL, _MARK = range(4)
_KV_GROWTH = "kv_growth"  # context marker inside Cache.update; its outputs are temporaries until adopted


class _Record:
    """One storage: its size, the category it was born with, the current one, and where it came from."""

    __slots__ = ("nbytes", "birth", "category", "origin", "born_at")

    def __init__(self, nbytes, category, origin, born_at):
        self.nbytes, self.birth, self.category, self.origin, self.born_at = nbytes, category, category, origin, born_at


def _tracker_class():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.weak import WeakIdKeyDictionary

    aten = torch.ops.aten
    to_copy = aten._to_copy.default
    scalar_dense = aten._local_scalar_dense.default

    class _Tracker(TorchDispatchMode):
        """Logs every storage's birth, death and re-labelling during a fake-tensor run.

        The log is replayed afterwards (`_replay`), so a storage whose role is only known later
        — optimizer state created inside step 1 — can carry its final category from birth."""

        def __init__(self, vocab):
            super().__init__()
            self.vocab = vocab
            self.events = []  # (_ALLOC, sid) | (_FREE, sid) | (_RELABEL, sid, category) | (_MARK, phase)
            self.records = []  # sid → _Record
            self.retro = {}  # sid → category it carries from birth (decided after the fact)
            self.context = []  # category overrides pushed by hooks (logits, KV growth)
            self.kv_pending = {}  # sid of a cached K/V tensor → sid of its grown copy (kv_cache once the old dies)
            self.in_optimizer = False
            self.optimizer_started = 0  # event index where the running optimizer.step began
            self.active = True
            self.ops = 0
            self._sid = WeakIdKeyDictionary()  # storage → sid

        def _on_free(self, sid):
            if self.active:
                self.events.append((_FREE, sid))
                grown = self.kv_pending.pop(sid, None)
                if grown is not None:
                    self.events.append((_RELABEL, grown, C.KV_CACHE))
                    self.records[grown].category = C.KV_CACHE

        def register(self, storage, category, origin=("", (), "")):
            """Log `storage` as born now under `category` unless already known; return its sid."""
            sid = self._sid.get(storage)
            if sid is not None:
                return sid
            sid = len(self.records)
            self.records.append(_Record(storage.nbytes(), category, origin, len(self.events)))
            self._sid[storage] = sid
            weakref.finalize(storage, self._on_free, sid)
            self.events.append((_ALLOC, sid))
            return sid

        def relabel(self, tensor, category, retro=False):
            """`tensor`'s storage is `category` from now on (from birth if `retro`)."""
            st = tensor.untyped_storage()
            sid = self._sid.get(st)
            if sid is None:
                self.register(st, category)
                return
            rec = self.records[sid]
            if retro:
                self.retro[sid] = category
            elif rec.category != category:
                self.events.append((_RELABEL, sid, category))
            rec.category = category

        def born_since(self, tensor, event_index):
            sid = self._sid.get(tensor.untyped_storage())
            return sid is not None and self.records[sid].born_at >= event_index

        def category_of(self, tensor):
            sid = self._sid.get(tensor.untyped_storage())
            return self.records[sid].category if sid is not None else None

        def mark(self, phase):
            """Workload callback: `phase` begins."""
            self.events.append((_MARK, phase))

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is scalar_dense:
                try:
                    return func(*args, **kwargs)
                except torch._subclasses.fake_tensor.DataDependentOutputException:
                    # .item() on a computed fake value: answer 1 (only Python control flow reads it).
                    dt = args[0].dtype
                    return True if dt == torch.bool else (1.0 if dt.is_floating_point else 1)
            out = func(*args, **kwargs)
            if not self.active:
                return out
            self.ops += 1
            name = func.overloadpacket.__name__
            growth = False
            if func is to_copy and isinstance(args[0], torch.Tensor) and self.category_of(args[0]) == C.WEIGHTS:
                default = C.TEMPORARIES  # autocast's cached cast of a weight
            elif self.in_optimizer:
                default = C.TEMPORARIES
            elif self.context:
                default = self.context[-1]
                growth = default == _KV_GROWTH
                if growth:
                    default = C.TEMPORARIES
            else:
                default = C.ACTIVATIONS
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    if st not in self._sid:
                        cat = default
                        if t.is_floating_point() and t.dim() in (2, 3) and t.shape[-1] == self.vocab:
                            cat = C.LOGITS  # logits and their gradients, wherever they are made
                        sid = self.register(st, cat, (name, tuple(t.shape), str(t.dtype).replace("torch.", "")))
                        if growth and name == "cat" and isinstance(args[0][0], torch.Tensor):
                            # torch.cat([cached, new]) in DynamicLayer.update: the grown copy is a temporary
                            # until the cached tensor it replaces dies, then it is the KV cache.
                            old = self._sid.get(args[0][0].untyped_storage())
                            if old is not None:
                                self.kv_pending[old] = sid
            return out

    return _Tracker


def _replay(tracker, allocator, capture=()):
    """Replay the log: live bytes per category after every event, peaks overall and per phase.

    Returns (peak, phase_peaks, phase_max, timeline, captured) where peak = (total, phase,
    breakdown, event index), phase_peaks = {phase: (total, breakdown, event index)}, phase_max =
    {phase: {category: its largest value in the phase}} and captured = {event index: [(sid,
    category) alive after it]} for the indices in `capture`."""
    live = dict.fromkeys(C.TENSOR_CATEGORIES, 0)
    total = 0
    phase = "load"
    label = {}
    peak = (-1, phase, {}, 0)
    phase_peaks = {}
    phase_max = {}
    captured = {}
    timeline = []
    records, retro = tracker.records, tracker.retro
    for i, ev in enumerate(tracker.events):
        kind = ev[0]
        if kind == _ALLOC:
            sid = ev[1]
            rec = records[sid]
            cat = retro.get(sid, rec.birth)
            label[sid] = cat
            if cat != HOST:
                live[cat] += rec.nbytes
                total += rec.nbytes
                allocator.malloc(sid, rec.nbytes)
        elif kind == _FREE:
            sid = ev[1]
            cat = label.pop(sid)
            if cat != HOST:
                live[cat] -= records[sid].nbytes
                total -= records[sid].nbytes
                allocator.free(sid)
        elif kind == _RELABEL:
            sid, cat = ev[1], ev[2]
            if sid in retro or sid not in label:
                continue
            old = label[sid]
            n = records[sid].nbytes
            if old != HOST:
                live[old] -= n
                total -= n
                allocator.free(sid)
            if cat != HOST:
                live[cat] += n
                total += n
                allocator.malloc(sid, n)
            label[sid] = cat
        else:
            phase = ev[1]
        timeline.append((i, phase, total, {c: v for c, v in live.items() if v}))
        if kind != _FREE:
            # ">=": among equal totals the later moment wins (step 2 over step 1, the end of a plateau).
            if total >= peak[0]:
                peak = (total, phase, dict(live), i)
            best = phase_peaks.get(phase)
            if best is None or total >= best[0]:
                phase_peaks[phase] = (total, dict(live), i)
            mx = phase_max.setdefault(phase, dict(live))
            for c, v in live.items():
                if v > mx[c]:
                    mx[c] = v
        if i in capture:
            captured[i] = [(sid, c) for sid, c in label.items() if c != HOST]
    return peak, phase_peaks, phase_max, timeline, captured


# ------------------------------------------------------------------ CUDA-like kernels on the CPU

def cuda_sdpa_backend(query, key, value, attn_mask=None, enable_gqa=False):
    """The SDPA kernel CUDA picks on sm80+ (flash, efficient or math), after `sdp_utils.cpp` select_sdp_backend.

    Flash: fp16/bf16, no mask, q/k/v head dims equal and ≤ 256, grouped K/V heads allowed.
    Memory-efficient: any float dtype, masks, v head dim may differ (MLA), head dims aligned to
    16 bytes, no grouped K/V heads. Otherwise math. (cuDNN attention, lower priority by default,
    is not modelled.)"""
    import torch

    if query.dim() != 4:
        return "math"
    hq, hk, hv = query.shape[-1], key.shape[-1], value.shape[-1]
    same_heads = query.shape[1] == key.shape[1] == value.shape[1]
    half = query.dtype in (torch.float16, torch.bfloat16)
    if attn_mask is None and half and hq == hk == hv <= 256 and (same_heads or enable_gqa):
        return "flash"
    align = 16 // query.element_size()
    if hq == hk and same_heads and hq % align == 0 and hv % align == 0:
        return "efficient"
    return "math"


@contextlib.contextmanager
def _cuda_like_kernels(notes):
    """Route dropout and SDPA to the kernels CUDA would run (see the module docstring)."""
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
        backend = cuda_sdpa_backend(query, key, value, attn_mask, enable_gqa)
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
        return orig_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                         scale=scale, enable_gqa=enable_gqa)

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


# ------------------------------------------------------------------ instrumentation

def _causal_lm(model):
    """The transformers *ForCausalLM module inside `model` (a PeftModel wraps one)."""
    from transformers import PreTrainedModel

    for _, m in model.named_modules():
        if isinstance(m, PreTrainedModel) and m.get_output_embeddings() is not None:
            return m
    raise ValueError(f"{type(model).__name__}: no module with an output embedding")


@contextlib.contextmanager
def _instrument(model, tracker, spec):
    """Hooks that tell the tracker what a tensor is: logits, gradients, optimizer state, KV cache."""
    import torch
    from transformers import cache_utils, masking_utils

    handles = []
    lm = _causal_lm(model)
    head = lm.get_output_embeddings()

    # From the output embedding's result to the end of the CausalLM forward (the loss) everything is
    # logits; inside the output embedding only its result is (the vocabulary rule), so autocast's cast
    # of its input stays an activation and the cast of its weight a temporary.
    def head_post(module, args, output):
        tracker.context.append(C.LOGITS)

    def lm_post(module, args, output):
        while C.LOGITS in tracker.context:
            tracker.context.remove(C.LOGITS)

    handles.append(head.register_forward_hook(head_post))
    handles.append(lm.register_forward_hook(lm_post))

    def grad_hook(p):
        if p.grad is not None:
            tracker.relabel(p.grad, C.GRADIENTS)

    for p in model.parameters():
        if p.requires_grad:
            handles.append(p.register_post_accumulate_grad_hook(grad_hook))

    def opt_pre(opt, args, kwargs):
        tracker.in_optimizer = True
        tracker.optimizer_started = len(tracker.events)

    def opt_post(opt, args, kwargs):
        tracker.in_optimizer = False
        # torch keeps AdamW/SGD `step` counters on the host unless fused or capturable.
        on_device_steps = any(g.get("fused") or g.get("capturable") for g in opt.param_groups)
        for state in opt.state.values():
            for key, v in state.items():
                if isinstance(v, torch.Tensor):
                    host = key == "step" and v.dim() == 0 and not on_device_steps
                    # State created inside this step (step 1) is optimizer state from its birth.
                    retro = tracker.born_since(v, tracker.optimizer_started)
                    tracker.relabel(v, HOST if host else C.OPTIMIZER_STATES, retro=retro)

    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    handles.append(register_optimizer_step_pre_hook(opt_pre))
    handles.append(register_optimizer_step_post_hook(opt_post))

    orig_update = cache_utils.Cache.update
    inference = spec.mode == "inference"

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if not inference:
            return orig_update(self, key_states, value_states, layer_idx, *args, **kwargs)
        tracker.context.append(_KV_GROWTH)  # the grown copy is a temporary while the old K/V lives
        try:
            out = orig_update(self, key_states, value_states, layer_idx, *args, **kwargs)
        finally:
            tracker.context.pop()
        layer = self.layers[layer_idx]
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor) and t.numel():
                tracker.relabel(t, C.KV_CACHE)
        return out

    # transformers treats a fake tensor as graph tracing (`is_tracing`) and then materializes the
    # causal mask instead of checking for padding or packed sequences; a real run finds neither and
    # passes no mask (flash attention). Ask only whether a compiler or jit is tracing.
    orig_is_tracing = masking_utils.is_tracing

    def is_tracing(tensor=None):
        return orig_is_tracing(None)

    cache_utils.Cache.update = update
    masking_utils.is_tracing = is_tracing
    try:
        yield
    finally:
        cache_utils.Cache.update = orig_update
        masking_utils.is_tracing = orig_is_tracing
        for h in handles:
            h.remove()


def _largest(tracker, alive):
    """The PEAK_TENSORS largest of `alive` [(sid, category)] that are not weights, buffers or optimizer state, as dicts."""
    out = []
    for sid, cat in alive:
        rec = tracker.records[sid]
        if cat not in (C.WEIGHTS, C.BUFFERS, C.OPTIMIZER_STATES):
            op, shp, dt = rec.origin
            out.append({"category": cat, "bytes": rec.nbytes, "op": op, "shape": list(shp), "dtype": dt})
    out.sort(key=lambda d: -d["bytes"])
    return out[:PEAK_TENSORS]


# ------------------------------------------------------------------ entry point

def trace(spec):
    """Run `spec`'s workload on fake tensors and return its per-category memory (TraceResult)."""
    shape = get_shape(spec.model)
    spec = validate(spec, shape)
    check_traceable(spec)
    if spec.mode == "train" and spec.optimizer in _UNTRACEABLE_OPTIMIZERS:
        raise SpecError(f"--optimizer {spec.optimizer}: bitsandbytes optimizers need their CUDA kernels; "
                        "trace adamw, sgd, sgd_momentum or adafactor")
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..workload.steps import TRAIN_STEPS, run_inference, run_training

    t0 = time.perf_counter()
    notes = []
    tracker = _tracker_class()(vocab=shape.vocab)
    fake_mode = FakeTensorMode()
    with fake_mode, _cuda_like_kernels(notes):
        with _fake_module_conversions(fake_mode):
            model = build_model(spec)
        n_params = sum(p.numel() for p in model.parameters())
        with _instrument(model, tracker, spec), tracker:
            for p in model.parameters():
                tracker.register(p.untyped_storage(), C.WEIGHTS, ("parameter", tuple(p.shape), str(p.dtype)))
            for b in model.buffers():
                tracker.register(b.untyped_storage(), C.BUFFERS, ("buffer", tuple(b.shape), str(b.dtype)))
            if spec.mode == "inference":
                kept = run_inference(model, spec, tracker.mark)
            else:
                kept = run_training(model, spec, tracker.mark)
            tracker.active = False  # the workload is over: what its return value and the model free next is not
        del model, kept

    allocator = CachingAllocatorModel()
    (total, peak_phase, bd, peak_event), phase_peaks, phase_max, timeline, _ = _replay(tracker, allocator)
    wanted = {peak_event} | {pk[2] for pk in phase_peaks.values()}
    captured = _replay(tracker, CachingAllocatorModel(), capture=wanted)[-1]
    seconds = time.perf_counter() - t0
    breakdown = {c: bd.get(c, 0) for c in C.TENSOR_CATEGORIES}
    phases, category_max = {}, {}
    for ph in (C.PHASES_INFERENCE if spec.mode == "inference" else C.PHASES_TRAIN):
        if ph in phase_peaks:
            phases[ph] = {c: phase_peaks[ph][1].get(c, 0) for c in C.TENSOR_CATEGORIES}
            category_max[ph] = {c: phase_max[ph].get(c, 0) for c in C.TENSOR_CATEGORIES}
    peak_tensors = _largest(tracker, captured[peak_event])
    phase_tensors = {ph: _largest(tracker, captured[phase_peaks[ph][2]]) for ph in phases}
    if shape.is_mla and spec.mode == "inference" and spec.mla_cache == "expanded":
        notes.append("MLA: transformers caches the compressed latent (kv_lora_rank + qk_rope_head_dim per layer), "
                     "whatever --mla-cache says; compare with --mla-cache compressed")
    if spec.mode == "train":
        notes.append(f"{TRAIN_STEPS} optimizer steps of {spec.grad_accum} micro-batch(es); figures are the max over them")
    notes.append("fake tensors on the CPU: CUDA kernel workspaces, context and allocator slack are not in peak_allocated_bytes")
    return TraceResult(
        spec=spec, breakdown=breakdown, peak_allocated_bytes=total, peak_phase=peak_phase, phases=phases,
        timeline=timeline, estimated_reserved_bytes=allocator.peak_reserved_bytes, seconds=seconds,
        notes=notes, estimated_max_allocated_bytes=allocator.peak_allocated_bytes, n_params=n_params,
        n_ops=tracker.ops, peak_tensors=peak_tensors, phase_tensors=phase_tensors, category_max=category_max,
    )


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
