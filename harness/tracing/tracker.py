"""Every tensor's bytes per memory category while a workload runs, on fake tensors or real ones.

Tracing (harness/tracing/tracer.py) runs it on fake tensors on the CPU; GPU measurement
(harness/gpu/measure.py) runs it on the real tensors, so a measured record has the same
categories as a traced one. `CategoryTracker` wraps the workload: a small TorchDispatchMode
(`_Tracker`) sees every aten op, registers each new storage once (views share their storage;
fake tensors have no real data_ptr, so the key is the `untyped_storage()` object, whose Python
identity torch preserves for the storage's lifetime) and learns of its death from a
`weakref.finalize` on that storage. It holds no reference to any tensor, so it frees nothing
late and allocates nothing on the device.

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
final category from birth. The highest total is the peak `torch.cuda.max_memory_allocated`
would report (before 512-byte rounding); the sequence replayed through a model of the CUDA
caching allocator (`allocator.py`) estimates reserved memory.

How a storage gets its category (first match wins; later re-labels move its bytes):
- parameters → weights (LoRA adapters too), the quantization state bitsandbytes keeps beside
  packed weights → quant_state, module buffers → buffers (at the start);
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

Which steps are counted op by op (`window`): `all` (tracing), or `last` (GPU measurement, where
every dispatched op costs ~50 µs of Python, most of a small model's step): the load, the prefill,
the last two decode steps and the last optimizer step. Between them the dispatch mode is off but
the hooks stay on, so the storages that outlive a step are still logged as they are made and
freed — gradients, optimizer state, KV-cache tensors — and the counted steps start with every
long-lived storage known. The decode peak is at the last step (the largest cache) and the
training peak in the last step (the optimizer state exists from step 1 on), so the peak and its
categories are those of `all` (tests/test_measure_speed.py compares both on real tensors); the
second-to-last decode step is counted too because the logits the last one starts with are born
there. Light steps log fewer storages, so their totals are too low and never the peak.
"""

import contextlib
import weakref
from dataclasses import dataclass, field

from formulas import categories as C

from .allocator import DEFAULT_CONFIG, CachingAllocatorModel

HOST = "host"  # storages that live on the CPU in a CUDA run: not counted
HOST_RAM = "host_ram"  # pinned host buffers a recipe offloads activations into: not on the device, tallied apart
WINDOWS = ("all", "last")  # which steps the dispatch mode counts op by op (CategoryTracker's `window`)
PEAK_TENSORS = 16  # how many of the largest transient storages at each peak the result lists


_ALLOC, _FREE, _RELABEL, _MARK = range(4)
# aten ops that run cuBLAS: the first on a thread allocates that thread's workspace through the caching allocator
# (aten/src/ATen/cuda/CublasHandlePool.cpp getCurrentCUDABlasHandle → setCublasWorkspace)
_CUBLAS_OPS = frozenset(("mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "_scaled_mm", "_int_mm"))
_KV_GROWTH = "kv_growth"  # context marker inside Cache.update; its outputs are temporaries until adopted
DDP_BUCKETS = "ddp_buckets"  # context marker while DDP wraps a model: float storages are gradient buckets, the rest host


class _Record:
    """One storage: its size, the category it was born with, the current one, and where it came from."""

    __slots__ = ("nbytes", "birth", "category", "origin", "born_at")

    def __init__(self, nbytes, category, origin, born_at):
        self.nbytes, self.birth, self.category, self.origin, self.born_at = nbytes, category, category, origin, born_at


def _local(t):
    """A DTensor's local shard (what this rank stores); any other tensor itself."""
    inner = getattr(t, "_local_tensor", None)
    return inner if inner is not None else t


def _tracker_class():
    import torch

    from ..workload.recipes import current_label as recipe_label
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.weak import WeakIdKeyDictionary

    aten = torch.ops.aten
    to_copy = aten._to_copy.default
    scalar_dense = aten._local_scalar_dense.default

    class _Tracker(TorchDispatchMode):
        """Logs every storage's birth, death and re-labelling while a workload runs.

        The log is replayed afterwards (`_replay`), so a storage whose role is only known later
        — optimizer state created inside step 1 — can carry its final category from birth.
        Only storages on `device_type` count (a GPU run's host tensors do not)."""

        def __init__(self, vocab, device_type="cpu", workspace_bytes=0):
            super().__init__()
            self.vocab = vocab
            self.device_type = device_type
            self.workspace_bytes = workspace_bytes  # one thread's cuBLAS workspace (0: not logged)
            self.gemm_threads = set()  # threads that have run a GEMM: "main", and "autograd" in backward
            self.phase = "load"
            self.events = []  # (_ALLOC, sid) | (_FREE, sid) | (_RELABEL, sid, category) | (_MARK, phase)
            self.records = []  # sid → _Record
            self.retro = {}  # sid → category it carries from birth (decided after the fact)
            self.context = []  # category overrides pushed by hooks (logits, KV growth)
            self.kv_pending = {}  # sid of a cached K/V tensor → sid of its grown copy (kv_cache once the old dies)
            self.in_optimizer = False
            self.optimizer_started = 0  # event index where the running optimizer.step began
            self.active = True
            self.ops = 0
            self.released = set()  # sids whose storage was resized to 0 bytes (FSDP's free_storage)
            self._sid = WeakIdKeyDictionary()  # storage → sid

        def _on_free(self, sid):
            if sid in self.released:
                return
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

        def release(self, storage):
            """`storage` was resized to 0 bytes (its object lives on): log its death now; a later
            resize back registers it afresh."""
            sid = self._sid.pop(storage, None)
            if sid is not None and self.active:
                self.released.add(sid)
                self.events.append((_FREE, sid))

        def counts(self, tensor):
            """Whether `tensor` lives where this run counts (a fake tensor's storage is on meta: its device decides)."""
            return tensor.device.type == self.device_type

        def track(self, tensor, category, origin=("", (), "")):
            """Register `tensor`'s storage (a DTensor's local shard) if it counts."""
            tensor = _local(tensor)
            if self.counts(tensor):
                self.register(tensor.untyped_storage(), category, origin)

        def relabel(self, tensor, category, retro=False):
            """`tensor`'s storage is `category` from now on (from birth if `retro`)."""
            tensor = _local(tensor)
            st = tensor.untyped_storage()
            sid = self._sid.get(st)
            if sid is None:
                self.track(tensor, category)
                return
            rec = self.records[sid]
            if retro:
                self.retro[sid] = category
            elif rec.category != category:
                self.events.append((_RELABEL, sid, category))
            rec.category = category

        def born_since(self, tensor, event_index):
            sid = self._sid.get(_local(tensor).untyped_storage())
            return sid is not None and self.records[sid].born_at >= event_index

        def category_of(self, tensor):
            sid = self._sid.get(_local(tensor).untyped_storage())
            return self.records[sid].category if sid is not None else None

        def mark(self, phase):
            """Workload callback: `phase` begins."""
            self.phase = phase
            self.events.append((_MARK, phase))

        def workspace(self):
            """A GEMM ran: the first on its thread allocates the thread's cuBLAS workspace, kept to the end. On a GPU
            the backward runs on autograd's device thread, which has a cuBLAS handle and workspace of its own."""
            thread = "autograd" if self.phase == "backward" else "main"
            if not self.workspace_bytes or thread in self.gemm_threads:
                return
            self.gemm_threads.add(thread)
            self.records.append(_Record(self.workspace_bytes, C.WORKSPACES, ("cublas_workspace", (), thread),
                                        len(self.events)))
            self.events.append((_ALLOC, len(self.records) - 1))

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
            marked = recipe_label()  # inside an emulated fused kernel's arithmetic, or host memory
            if marked:
                default = HOST if marked == "internal" else HOST_RAM
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and self.counts(_local(t)) \
                            and _local(t).untyped_storage() not in self._sid:
                        self.register(_local(t).untyped_storage(), default,
                                      (name, tuple(t.shape), str(t.dtype).replace("torch.", "")))
                return out
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
            if isinstance(out, torch.Tensor):
                outs = (out,)
            elif isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in out):
                outs = out  # most multi-output ops: skip pytree
            else:
                outs = tree_flatten(out)[0]
            for t in outs:
                if isinstance(t, torch.Tensor):
                    t = _local(t)
                    st = t.untyped_storage()
                    if st not in self._sid and self.counts(t):
                        cat = default
                        if t.is_floating_point() and t.dim() in (2, 3) and t.shape[-1] == self.vocab:
                            cat = C.LOGITS  # logits and their gradients, wherever they are made
                        elif cat == DDP_BUCKETS:
                            # the reducer's int32 bookkeeping (unused-parameter map) is not the model's memory
                            cat = C.GRADIENTS if t.is_floating_point() else HOST
                        sid = self.register(st, cat, (name, tuple(t.shape), str(t.dtype).replace("torch.", "")))
                        if growth and name == "cat" and isinstance(args[0][0], torch.Tensor):
                            # torch.cat([cached, new]) in DynamicLayer.update: the grown copy is a temporary
                            # until the cached tensor it replaces dies, then it is the KV cache.
                            old = self._sid.get(args[0][0].untyped_storage())
                            if old is not None:
                                self.kv_pending[old] = sid
            if name in _CUBLAS_OPS:
                self.workspace()
            return out

    return _Tracker


class _Recorder:
    """Passes malloc/free/mark on to a simulated allocator (`sim`, or none) and keeps them as a stream if asked."""

    def __init__(self, sim, keep):
        self.sim, self.events = sim, [] if keep else None

    def malloc(self, key, nbytes):
        if self.sim is not None:
            self.sim.malloc(key, nbytes)
        if self.events is not None:
            self.events.append(("malloc", key, nbytes))

    def free(self, key):
        if self.sim is not None:
            self.sim.free(key)
        if self.events is not None:
            self.events.append(("free", key))

    def mark(self, phase):
        if self.sim is not None:
            self.sim.mark(phase)
        if self.events is not None:
            self.events.append(("mark", phase))


def _replay(tracker, allocator, capture=(), timeline=True):
    """Replay the log: live bytes per category after every event, peaks overall and per phase.

    Returns (peak, phase_peaks, phase_max, timeline, captured) where peak = (total, phase,
    breakdown, event index), phase_peaks = {phase: (total, breakdown, event index)}, phase_max =
    {phase: {category: its largest value in the phase}} and captured = {event index: [(sid,
    category) alive after it]} for the indices in `capture`. `timeline=False` leaves the timeline
    empty (a tuple and a dict per event: a third of the replay's time)."""
    live = dict.fromkeys(C.ALLOCATED_CATEGORIES, 0)
    total = 0
    phase = "load"
    label = {}
    peak = (-1, phase, {}, 0)
    phase_peaks = {}
    phase_max = {}
    captured = {}
    timeline = [] if timeline else None
    records, retro = tracker.records, tracker.retro
    host_ram = host_ram_peak = 0
    for i, ev in enumerate(tracker.events):
        kind = ev[0]
        if kind == _ALLOC:
            sid = ev[1]
            rec = records[sid]
            cat = retro.get(sid, rec.birth)
            label[sid] = cat
            if cat == HOST_RAM:
                host_ram += rec.nbytes
                host_ram_peak = max(host_ram_peak, host_ram)
                continue
            if cat != HOST:
                live[cat] += rec.nbytes
                total += rec.nbytes
                allocator.malloc(sid, rec.nbytes)
        elif kind == _FREE:
            sid = ev[1]
            cat = label.pop(sid)
            if cat == HOST_RAM:
                host_ram -= records[sid].nbytes
                continue
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
            if HOST_RAM in (old, cat):
                continue
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
            allocator.mark(phase)
        if timeline is not None:
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
            captured[i] = [(sid, c) for sid, c in label.items() if c not in (HOST, HOST_RAM)]
    tracker.host_ram_peak = host_ram_peak
    return peak, phase_peaks, phase_max, timeline or [], captured



def _causal_lm(model):
    """The transformers *ForCausalLM module inside `model` (a PeftModel wraps one)."""
    from ..workload.recipes import causal_lm

    return causal_lm(model)


@contextlib.contextmanager
def _instrument(model, tracker, spec):
    """Hooks that tell the tracker what a tensor is: logits, gradients, optimizer state, KV cache."""
    import torch
    from transformers import cache_utils

    try:
        from transformers import masking_utils
    except ImportError:  # transformers < 4.53 builds its masks elsewhere, without the fake-tensor test below
        masking_utils = None

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
    # A recipe's loss (harness/workload/recipes.py) reads lm_head's weight without calling it: all it allocates is
    # the loss's (logits).
    recipe_loss = getattr(lm, "recipe_loss", None)
    if recipe_loss is not None:
        handles.append(recipe_loss.register_forward_pre_hook(lambda module, args: tracker.context.append(C.LOGITS)))

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

    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

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
    orig_is_tracing = masking_utils.is_tracing if masking_utils is not None else None

    def is_tracing(tensor=None):
        return orig_is_tracing(None)

    # Linear-attention / SSM layers (LinearAttentionLayer, transformers ≥ 5.1x) keep a conv and a recurrent
    # state per sequence, allocated on first use and then updated in place: KV cache from then on.
    linear = getattr(cache_utils, "LinearAttentionLayer", None)
    state_methods = {}
    if linear is not None and inference:
        for meth, attr in (("update_conv_state", "conv_states"), ("update_recurrent_state", "recurrent_states")):
            orig = getattr(linear, meth)
            state_methods[meth] = orig

            def state_update(self, *args, _orig=orig, _attr=attr, **kwargs):
                out = _orig(self, *args, **kwargs)
                for t in (getattr(self, _attr, None) or {}).values():
                    if isinstance(t, torch.Tensor) and t.numel():
                        tracker.relabel(t, C.KV_CACHE)
                return out

            setattr(linear, meth, state_update)

    cache_utils.Cache.update = update
    if masking_utils is not None:
        masking_utils.is_tracing = is_tracing
    try:
        yield
    finally:
        cache_utils.Cache.update = orig_update
        if masking_utils is not None:
            masking_utils.is_tracing = orig_is_tracing
        for meth, orig in state_methods.items():
            setattr(linear, meth, orig)
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _label(tracker, category):
    """Everything born inside is `category` (unless the vocabulary rule says logits)."""
    tracker.context.append(category)
    try:
        yield
    finally:
        tracker.context.remove(category)


@contextlib.contextmanager
def _instrument_fsdp(tracker):
    """What FSDP2's buffers are: gathered parameters are weights, the flat all-gather and reduce-scatter
    buffers temporaries, the unsharded gradients it reduce-scatters and the sharded gradients it
    writes gradients. FSDP2 frees and re-allocates a gathered parameter's storage in place
    (`free_storage` / `alloc_storage`: `untyped_storage().resize_()`, which no aten op shows), so
    those two tell the tracker directly."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group

    orig = {(m, n): getattr(m, n) for m in (_fsdp_param, _fsdp_param_group)
            for n in ("alloc_storage", "free_storage", "foreach_all_gather", "foreach_all_gather_copy_out",
                      "foreach_reduce") if hasattr(m, n)}

    def free_storage(tensor):
        st = _local(tensor).untyped_storage()
        if st.size() > 0:
            tracker.release(st)
        orig[(_fsdp_param, "free_storage")](tensor)

    def alloc_storage(tensor):
        orig[(_fsdp_param, "alloc_storage")](tensor)
        tracker.track(tensor, C.WEIGHTS, ("fsdp_unsharded_param", tuple(tensor.shape), str(tensor.dtype)))

    def labelled(fn, category):
        def call(*args, **kwargs):
            with _label(tracker, category):
                return fn(*args, **kwargs)
        return call

    def foreach_reduce(fsdp_params, unsharded_grads, *args, **kwargs):
        for g in unsharded_grads:  # autograd's full-size gradients of the layer, reduce-scattered now
            tracker.relabel(g, C.GRADIENTS, retro=True)
        with _label(tracker, C.GRADIENTS):  # the reduce-scatter output holds the sharded gradients
            return orig[(_fsdp_param_group, "foreach_reduce")](fsdp_params, unsharded_grads, *args, **kwargs)

    new = {"alloc_storage": alloc_storage, "free_storage": free_storage, "foreach_reduce": foreach_reduce}
    for (m, n), fn in orig.items():
        if n in new:
            setattr(m, n, new[n])
        else:
            setattr(m, n, labelled(fn, C.TEMPORARIES if n == "foreach_all_gather" else C.WEIGHTS))
    try:
        yield
    finally:
        for (m, n), fn in orig.items():
            setattr(m, n, fn)


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


def _quant_state_tensors(param):
    """Tensors bitsandbytes keeps beside a packed weight: 4-bit absmax/code/offset (and the nested
    double-quantization state), 8-bit row scales (SCB)."""
    out, qs = [], getattr(param, "quant_state", None)
    while qs is not None:
        out += [t for t in (getattr(qs, "absmax", None), getattr(qs, "code", None), getattr(qs, "offset", None))
                if t is not None and hasattr(t, "untyped_storage")]
        qs = getattr(qs, "state2", None)
    scb = getattr(param, "SCB", None)
    if scb is not None and hasattr(scb, "untyped_storage"):
        out.append(scb)
    return out


@dataclass
class TrackedMemory:
    """What a CategoryTracker counted, as integer bytes by memory category."""

    breakdown: dict  # allocated category (tensors, workspaces) → bytes at the overall peak
    peak_allocated_bytes: int  # live tensor and workspace bytes at the peak (unrounded max_memory_allocated)
    peak_phase: str  # phase holding the peak
    phases: dict  # phase → {allocated category → bytes} at that phase's own peak
    timeline: list  # (event index, phase, total bytes, {category: bytes}) per allocation / free / phase mark
    estimated_reserved_bytes: int  # peak reserved by a modelled CUDA caching allocator
    estimated_max_allocated_bytes: int  # peak allocated with the allocator's 512-byte rounding
    n_ops: int  # aten ops dispatched
    category_max: dict = field(default_factory=dict)  # phase → {category → its own largest value in the phase}
    # phase → {"max_allocated_bytes", "max_reserved_bytes"} of the allocator simulation (as measurement records them)
    estimated_phases: dict = field(default_factory=dict)
    # the allocation stream the simulation replayed: ("malloc", sid, bytes) | ("free", sid) | ("mark", phase)
    stream: list = field(default_factory=list, repr=False)
    peak_tensors: list = field(default_factory=list)  # largest storages alive at the peak (weights, buffers, optimizer state left out)
    phase_tensors: dict = field(default_factory=dict)  # phase → the same list at that phase's own peak
    host_ram_bytes: int = 0  # peak of the pinned host buffers a recipe offloads activations into (not on the device)


def _uses_fsdp(model):
    """Whether FSDP2 (`fully_shard`) manages any of the model's modules. Not imported here unless something
    already has: torch.distributed.fsdp pulls in DTensor and sympy, seconds a one-GPU run need not pay."""
    import sys

    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None or not hasattr(fsdp, "FSDPModule"):
        return False
    return any(isinstance(m, fsdp.FSDPModule) for m in model.modules())


class CategoryTracker:
    """Counts every storage's bytes per memory category while a workload runs, on fake or real tensors.

        with CategoryTracker(model, spec, vocab, device_type="cuda") as tracker:
            run_training(model, spec, mark=tracker.mark, ...)
        memory = tracker.result()

    The model's parameters, their quantization state and its buffers are registered on entry; only
    storages on `device_type` count. What is freed after the block (the workload's return value, the
    model) is not the workload's and is not logged. `window`: WINDOWS (the module docstring); with
    `last`, `steps` is the number of optimizer steps the workload runs (its last is counted)."""

    def __init__(self, model, spec, vocab, device_type="cpu", workspace_bytes=0, window="all", steps=2):
        if window not in WINDOWS:
            raise ValueError(f"track_window: {window!r} is not one of {', '.join(WINDOWS)}")
        self.model, self.spec = model, spec
        self._log = _tracker_class()(vocab=vocab, device_type=device_type, workspace_bytes=workspace_bytes)
        self._stack = contextlib.ExitStack()
        self.window = window
        # the mark that opens the counted steps: the first forward of the last optimizer step, or the
        # second-to-last decode step (numbered from 1); None: every op is counted
        self._counted_from = None
        if window == "last":
            if spec.mode == "train":
                self._counted_from = ("forward", (max(steps, 1) - 1) * max(spec.grad_accum, 1) + 1)
            elif spec.gen > 2:
                self._counted_from = ("decode", spec.gen - 1)
        self._marks = {}  # phase → how many times it has begun
        self._dispatching = False  # the dispatch mode is on the mode stack

    def __enter__(self):
        log = self._log
        self._stack.enter_context(_instrument(self.model, log, self.spec))
        if _uses_fsdp(self.model):
            self._stack.enter_context(_instrument_fsdp(log))
        self._dispatch(True)
        self._stack.callback(self._dispatch, False)
        for p in self.model.parameters():
            log.track(p, C.WEIGHTS, ("parameter", tuple(p.shape), str(p.dtype)))
            for q in _quant_state_tensors(p):
                log.track(q, C.QUANT_STATE, ("quant_state", tuple(q.shape), str(q.dtype)))
        for b in self.model.buffers():
            log.track(b, C.BUFFERS, ("buffer", tuple(b.shape), str(b.dtype)))
        return self

    def _dispatch(self, on):
        """Put the dispatch mode on the mode stack, or take it off (hooks and finalizers stay)."""
        if on and not self._dispatching:
            self._log.__enter__()
        elif not on and self._dispatching:
            self._log.__exit__(None, None, None)
        self._dispatching = on

    def mark(self, phase):
        """Workload callback: `phase` begins (and, with window `last`, whether its ops are counted)."""
        self._log.mark(phase)
        n = self._marks[phase] = self._marks.get(phase, 0) + 1
        if self._counted_from is not None and phase == self._counted_from[0]:
            counted = n >= self._counted_from[1]
            self._dispatch(counted)
            if counted:
                self._counted_from = None  # counted from here to the end

    def labelled(self, category):
        """Context: storages born inside are `category` (DDP's gradient buckets, made when it wraps the model)."""
        return _label(self._log, category)

    def __exit__(self, *exc):
        self._log.active = False
        self.model = None  # the tracker must not keep the model alive past the workload
        return self._stack.__exit__(*exc)

    def result(self, allocator_config=None, keep_stream=False, timeline=True, reserved=True):
        """Replay the log into a TrackedMemory (phases in the workload's order), through a simulated caching
        allocator with `allocator_config` (formulas.allocator.AllocatorConfig; None: torch's defaults).
        `keep_stream`: keep the allocation stream in the result (to replay it under other settings). A GPU
        measurement needs neither the timeline nor the reserved estimate (`timeline=False, reserved=False`: less
        than half the replay's time)."""
        log = self._log
        sim = CachingAllocatorModel(allocator_config or DEFAULT_CONFIG) if reserved else None
        allocator = _Recorder(sim, keep_stream)
        (total, peak_phase, bd, peak_event), phase_peaks, phase_max, timeline, _ = _replay(log, allocator,
                                                                                             timeline=timeline)
        wanted = {peak_event} | {pk[2] for pk in phase_peaks.values()}
        captured = _replay(log, _Recorder(None, False), capture=wanted, timeline=False)[-1]
        phases, category_max = {}, {}
        for ph in (C.PHASES_INFERENCE if self.spec.mode == "inference" else C.PHASES_TRAIN):
            if ph in phase_peaks:
                phases[ph] = {c: phase_peaks[ph][1].get(c, 0) for c in C.ALLOCATED_CATEGORIES}
                category_max[ph] = {c: phase_max[ph].get(c, 0) for c in C.ALLOCATED_CATEGORIES}
        return TrackedMemory(
            breakdown={c: bd.get(c, 0) for c in C.ALLOCATED_CATEGORIES}, peak_allocated_bytes=total,
            peak_phase=peak_phase, phases=phases, timeline=timeline,
            estimated_reserved_bytes=sim.peak_reserved_bytes if sim else None,
            estimated_max_allocated_bytes=sim.peak_allocated_bytes if sim else None, n_ops=log.ops,
            estimated_phases={ph: dict(v) for ph, v in sim.stats.phases.items()} if sim else {},
            stream=allocator.events or [],
            category_max=category_max, peak_tensors=_largest(log, captured.get(peak_event, [])),
            phase_tensors={ph: _largest(log, captured.get(phase_peaks[ph][2], [])) for ph in phases},
            host_ram_bytes=getattr(log, "host_ram_peak", 0))
