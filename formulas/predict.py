"""Spec → Prediction: the memory breakdown at the peak moment, the peak phase, and two totals.

The workload modelled is the one vramlab's harness runs with transformers:
- inference: load, prefill of batch × seq tokens (generate-style: logits of the last
  position, upcast to fp32), then `gen` decode steps with the DynamicCache;
- training: steps of forward (`loss = model(ids, labels=ids).loss`, the output object
  dropped at once), backward and optimizer.step(), with `zero_grad(set_to_none=True)`;
  the optimizer state from step 1 is alive in every later step, which is where the
  steady-state peak is.

`peak_allocated_bytes` is the sum of tensor categories at the peak moment (what
torch.cuda.max_memory_allocated reports); `peak_device_bytes` adds the device categories —
CUDA context, workspaces and allocator slack (what NVML reports) — from `Overheads`.
Multi-GPU specs are predicted per GPU, for the GPU that needs the most.

`predict` answers one spec. The steps it takes are public so that `grid.predict_grid` can run
the same arithmetic on numpy arrays of batch, seq and gen: `workload_static` (everything that
does not depend on them, cached), `per_gpu_phases` (the breakdown of every phase on every
distinct GPU), `allocated_bytes` and `device_totals`.
"""

from dataclasses import dataclass, field, fields, replace
from functools import lru_cache

from . import categories as C
from .activations import (
    ActContext,
    ckpt_saved_per_token,
    forward_extras_per_position,
    largest_layer_saved_per_token,
    layer_saved_per_token,
    layers_saved_per_token,
    model_saved_per_token,
    prefill_working_set_per_token,
    state_layers_fixed_bytes,
)
from .catalog import get_shape
from .checkpoint import check_checkpoint_size
from .dtypes import BNB_DTYPES, DTYPE_BYTES
from .elementwise import pick as _pick
from .elementwise import to_int, vmax
from .kv_cache import cache_summary, kv_cache_bytes
from .lora import default_targets, lora_params, lora_tensors, resolve_targets
from .overhead import DEFAULT_OVERHEADS
from .spec import Spec, SpecError, validate
from .stack import behaviour, linear_experts, sdpa_repeats_kv, stack_notes
from .training import gradient_bytes, optimizer_memory, zero1_partition
from .weights import _TOKEN_EMBEDDINGS, _is_layer, weight_storage


@dataclass
class Prediction:
    """What a workload needs, per GPU, as integer bytes by memory category."""

    spec: Spec  # the validated spec ('auto' fields resolved)
    model: str  # model name as resolved
    n_params: int  # parameters of the whole model
    breakdown: dict  # category → bytes at the peak moment, device categories included
    peak_allocated_bytes: int  # sum of tensor categories at the peak
    peak_device_bytes: int  # + CUDA context, workspaces, allocator slack
    peak_phase: str  # load | prefill | decode | forward | backward | optimizer_step
    phases: dict  # phase → {tensor category → bytes} at that phase's own peak
    notes: list = field(default_factory=list)  # assumptions worth reading
    overheads_source: str = ""  # where the device overheads came from
    calibrated: bool = False  # True when the overheads came from a calibration table (measurements)
    weights_source: str = "formula"  # formula | checkpoint (the safetensors headers' stored bytes)

    def to_dict(self):
        """JSON-ready dict; bytes stay integers."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["spec"] = self.spec.to_dict()
        return d


# ------------------------------------------------------------------ static part (no batch/seq)

@dataclass(frozen=True)
class _Static:
    shape: object
    spec: Spec
    cb: int  # compute bytes
    kvb: int  # KV cache bytes per element
    w_layers: int  # weights + quant state of decoder layers (at the stored precision)
    w_embed: int
    w_head: int
    w_other: int  # final norm and other non-layer weights
    q_layers: int  # of w_layers, quantization state
    q_other: int  # of w_other, quantization state
    buffers: int
    quant_temp: int  # dequantization / int8 matmul temporary per matmul, bytes per token or absolute
    quant_temp_per_token: int
    n_trainable: int
    grads: int
    opt_state: int
    opt_paged: bool
    master: int
    opt_temp: int
    autocast_copies: int  # bf16 casts of trainable fp32 weights that autocast caches and autograd saves
    autocast_head: int  # of which lm_head's (or the tied token embedding's)
    autocast_layer: int  # of which one decoder layer's (what checkpointing keeps at a time)
    lm_grad: int  # bytes of the lm_head (or tied embedding) gradient, 0 when frozen
    ctx: object  # ActContext (training) or None
    ctx_head: object  # the ActContext of the final norm and lm_head (frozen under freeze)
    saved_layers_trainable: int  # layers whose activations are saved (freeze: the trainable ones)
    tp_lin_frac: float = 0.0  # share of the layers' weight bytes in linear layers and experts (what tensor parallelism splits)
    opt_steps: int = 0  # bytes of the optimizer's per-tensor `step` counters on the device (in opt_state)
    zero1_state: int = 0  # ZeRO-1: optimizer state of the rank holding the most (greedy partition), steps included
    fsdp_shard_frac: float = 0.0  # FSDP2: rank 0's share of the parameters, each first dimension padded to the world
    moe_merged: int = 0  # peft ≥ 0.20 LoRA on fused experts: one MoE layer's W + ΔW (compute dtype), saved for backward
    moe_delta_temp: int = 0  # … and the largest ΔW while it is built (fp32 einsum, then its cast)


def _trainable_copies(t, shape, k):
    """Copies of tensor t inside the last k decoder layers (freeze tuning)."""
    L = shape.n_layers
    c = t.count
    if not t.name.startswith(("layers.", "h.")):
        return 0
    if c >= L:
        return c * k // L
    routed = t.kind in ("experts", "router") or "shared_expert" in t.name
    if routed:  # MoE blocks sit in the last c layers (DeepSeek first_k_dense_replace, Qwen sparse step 1)
        return min(k, c)
    return max(0, k - (L - c))  # dense MLPs in the first c layers


def kbit_prepared(spec):
    """LoRA over a bitsandbytes base with peft's prepare_model_for_kbit_training (validated spec)."""
    return spec.mode == "train" and spec.kbit_prep and spec.method in ("lora", "qlora") and spec.dtype in BNB_DTYPES


def checkpoint_applies(spec, checkpoint):
    """Whether a checkpoint's stored weights are the weights of this (validated) spec.

    They are where the spec loads the checkpoint as stored: the same --dtype, not upcast to fp32
    parameters for amp full training, and not recast by kbit prep. A quantization the formula does not
    model (checkpoint.dtype None) is loaded as stored when --dtype names no other quantization (a float
    --dtype is then its compute dtype): its stored bytes are the only count there is."""
    if _recast(spec):
        return False
    if checkpoint.dtype is None:
        return spec.dtype in ("fp32", "bf16", "fp16")
    return checkpoint.dtype == spec.dtype


def _recast(spec):
    """Whether loading recasts stored weights: fp32 parameters under amp full training, or kbit prep."""
    fp32_params = spec.precision == "amp" or fsdp_master_precision(spec)
    return (spec.mode == "train" and fp32_params and spec.method == "full") or kbit_prepared(spec)


def _fsdp_shard_frac(shape, spec):
    """Rank 0's share of the parameters under FSDP2: each tensor's first dimension split in `dp` chunks of
    ceil(d0 / dp) rows (`torch.chunk`; the last ranks' shards are padded to that), so rank 0 holds the most."""
    dp = spec.gpus // (spec.tp * spec.pp)
    if spec.zero < 2 or dp < 2:
        return 0.0
    params = [t for t in shape.tensors if t.kind != "buffer" and t.shape]
    total = sum(t.total_numel for t in params)
    mine = sum(-(-t.shape[0] // dp) * (t.numel // t.shape[0]) * t.count for t in params)
    return mine / total if total else 1.0 / dp


def fsdp_master_precision(spec):
    """Whether `--precision master` runs as FSDP2 does it (ZeRO-2/3 over several GPUs): fp32 parameter shards
    that are the master copy, gathered in the compute dtype, gradients reduce-scattered in fp32."""
    return (spec.mode == "train" and spec.precision == "master" and spec.zero >= 2
            and spec.gpus // (spec.tp * spec.pp) > 1)


def moe_parameter_adapters(shape, r):
    """LoRA adapters peft ≥ 0.20 puts on fused 3-D expert parameters and the router under all-linear
    (target_parameters, PR #3232), as (numel, shape, copies): gate_up_proj at rank 2r, down_proj at r —
    A (E·r', in), B (out, E·r') — and the router's (E, H) weight at rank r."""
    out = []
    for t in shape.tensors:
        if t.kind == "experts" and len(t.shape) == 3:
            e, rows, cols = t.shape
            rr = 2 * r if t.module == "gate_up_proj" else r
            out += [(e * rr * cols, (e * rr, cols), t.count), (rows * e * rr, (rows, e * rr), t.count)]
        elif t.kind == "router" and len(t.shape) == 2:
            e, h = t.shape
            out += [(r * h, (r, h), t.count), (e * r, (e, r), t.count)]
    return out


def stack_shape(spec):
    """The model's shape as the spec's transformers builds it (4.x: MoE experts as nn.Linear per expert)."""
    shape = get_shape(spec.model)
    return linear_experts(shape) if behaviour(spec, "experts") == "linear" else shape


def _static(spec, checkpoint=None):
    shape = stack_shape(spec)
    cb = DTYPE_BYTES[spec.compute_dtype]
    kvb = DTYPE_BYTES[spec.kv_dtype]
    train = spec.mode == "train"
    amp = train and spec.precision == "amp"
    # FSDP2's mixed precision: the fp32 parameters are the master copy, sharded; gathered in the compute dtype
    fsdp_master = fsdp_master_precision(spec)
    kbit = kbit_prepared(spec)
    stored = spec.dtype
    if (amp or fsdp_master) and spec.method == "full":
        stored = "fp32"  # autocast trains fp32 parameters
    # kbit prep casts every unquantized fp16/bf16 weight (embeddings, norms, lm_head, biases) to fp32
    st = weight_storage(shape, stored, "fp32" if kbit else spec.compute_dtype, spec.double_quant, spec.group_size)
    if checkpoint is not None and checkpoint_applies(spec, checkpoint):
        check_checkpoint_size(checkpoint, st.weight_bytes + st.quant_state_bytes)
        # the checkpoint's own tensors, as its safetensors headers list them, in place of the formula's
        st = replace(st, weight_bytes=checkpoint.total_bytes - checkpoint.quant_bytes,
                     quant_state_bytes=checkpoint.quant_bytes, layer_bytes=checkpoint.layer_bytes,
                     layer_quant_state_bytes=checkpoint.layer_quant_bytes, embed_bytes=checkpoint.embed_bytes,
                     head_bytes=checkpoint.head_bytes)
    rope = {"llama": "rope_cache_llama", "mixtral": "rope_cache_mixtral"}.get(shape.model_type)
    if rope and behaviour(spec, rope):  # transformers 4.x: cos and sin for every position, in every attention layer
        st = replace(st, buffer_bytes=st.buffer_bytes + shape.n_layers * 2 * shape.max_positions * shape.head_dim * cb)
    w_total = st.weight_bytes + st.quant_state_bytes
    w_other = w_total - st.layer_bytes - st.embed_bytes - st.head_bytes
    q_other = st.quant_state_bytes - st.layer_quant_state_bytes

    quant_temp = quant_temp_tok = 0
    if spec.dtype in ("nf4", "fp4", "gptq-int4", "awq-int4"):
        quant_temp = st.largest_quantized * cb  # a whole weight dequantized for a multi-token matmul
    if spec.dtype == "gptq-int4" and spec.gptq_kernel == "exllamav2":
        # AutoGPTQ's exllamav2_post_init: one fp16 scratch tensor per device, the largest of every quantized
        # linear's scratch_space_fixed(max_input_len=2048, max_batch_size=8) = (in·out·2 + 128) + (out·2048·8·4 + 128),
        # allocated once and kept (it holds the dequantization buffer, so no separate one)
        scratch = max((t.shape[0] * t.shape[1] * 2 + 128 + t.shape[0] * 2048 * 8 * 4 + 128 for t in shape.tensors
                       if t.kind == "linear" and t.module != "lm_head" and len(t.shape) == 2), default=0)
        st = replace(st, buffer_bytes=st.buffer_bytes + scratch)
        quant_temp = 0
    elif spec.dtype == "int8":
        quant_temp_tok = shape.intermediate * 4 + shape.hidden  # int32 matmul output + int8 input copy

    n_tr = grads = state = master = opt_temp = copies = copies_head = copies_layer = lm_grad = opt_steps = zero1_state = 0
    moe_merged = moe_delta_temp = 0
    lin = sum(t.total_numel for t in shape.tensors if t.kind in ("linear", "experts") and _is_layer(t))
    tp_lin_frac = lin / sum(t.total_numel for t in shape.tensors if _is_layer(t)) if lin else 0.0
    paged = False
    ctx = ctx_head = None
    saved_layers = shape.n_layers
    if train:
        tb = 4 if (amp or fsdp_master) else cb  # trainable parameter / gradient bytes
        pinned = {t.name: DTYPE_BYTES[t.dtype] for t in shape.tensors if t.dtype}  # e.g. DeepSeek's fp32 router
        head = [t for t in shape.tensors if t.module == "lm_head"] or \
            [t for t in shape.tensors if t.kind == "embedding" and t.module in _TOKEN_EMBEDDINGS and shape.tie_embeddings]
        if spec.method == "full":
            trainable = [(t.numel, t.shape, t.count, pinned.get(t.name, tb)) for t in shape.tensors]
            n_tr = shape.n_params
            if amp:
                # autocast casts the weights and biases of every matmul; a tied lm_head casts the token embedding
                copies = 2 * sum(t.total_numel for t in shape.tensors if t.kind in ("linear", "experts", "bias"))
                copies_head = 2 * head[0].numel if head else 0
                if shape.tie_embeddings:
                    copies += copies_head
                copies_layer = 2 * sum(t.total_numel for t in shape.tensors if t.kind in ("linear", "experts", "bias")
                                       and t.name.startswith(("layers.", "h."))) // shape.n_layers
            lm_grad = head[0].numel * tb if head else 0
            ctx_kw = dict(linears_trainable=True, norms_trainable=True)
        elif spec.method == "freeze":
            k = spec.trainable_layers
            trainable = []
            for t in shape.tensors:
                c = _trainable_copies(t, shape, k)
                if c:
                    trainable.append((t.numel, t.shape, c, pinned.get(t.name, tb)))
            n_tr = sum(n * c for n, _, c, _ in trainable)
            w_other += (tb - cb) * n_tr  # trainable layers upcast to fp32 under autocast
            if amp:
                copies = 2 * sum(t.numel * _trainable_copies(t, shape, k) for t in shape.tensors
                                 if t.kind in ("linear", "experts", "bias"))
                copies_layer = copies // k
            saved_layers = k
            ctx_kw = dict(linears_trainable=True, norms_trainable=True)
        else:  # lora / qlora
            try:
                targets = resolve_targets(shape, spec.lora_targets)
            except ValueError as e:
                raise SpecError(str(e)) from None
            tb = DTYPE_BYTES[spec.lora_dtype]
            trainable = lora_tensors(targets, spec.lora_rank)
            n_tr = lora_params(targets, spec.lora_rank)
            if spec.lora_targets == ("all-linear",) and behaviour(spec, "experts") == "fused" \
                    and behaviour(spec, "peft_moe_targets"):
                extra = moe_parameter_adapters(shape, spec.lora_rank)
                trainable = trainable + extra
                n_tr += sum(n * c for n, _, c in extra)
                # peft's ParamWrapper parametrizes the expert weights: every forward builds ΔW = B·A (fp32 einsum,
                # cast to the weight's dtype) and runs the experts on W + ΔW, which their matmuls save for backward
                moe = [t for t in shape.tensors if t.kind in ("experts", "router") and len(t.shape) >= 2]
                moe_merged = sum(t.numel * wb for t in moe for wb in [DTYPE_BYTES[t.dtype] if t.dtype else cb])
                moe_delta_temp = max((t.numel * (4 + cb) for t in moe), default=0)
            # kbit prep makes the embeddings fp32, so every activation is: bitsandbytes layers compute in
            # the compute dtype and return their input's dtype (bitsandbytes/nn/modules.py Linear4bit.forward)
            act_bytes = 4 if kbit else cb
            bnb4_held = spec.dtype in ("nf4", "fp4") and behaviour(spec, "bnb4_keeps_input")
            ctx_kw = dict(linears_trainable=False, norms_trainable=False, int8_linears=spec.dtype == "int8",
                          bnb4_input_bytes=cb if bnb4_held else 0, bnb4_input_copied=act_bytes != cb,
                          experts_linear=behaviour(spec, "experts") == "linear", moe_param_lora=moe_merged > 0,
                          lora={m: (i, o) for m, (i, o, _) in targets.items()},
                          lora_rank=spec.lora_rank, lora_x_bytes=tb, lora_input_copied=tb != act_bytes)
        grads = gradient_bytes(trainable, tb)
        master_copy = spec.precision == "master" and not fsdp_master
        om = optimizer_memory(trainable, tb, spec.optimizer, spec.optimizer_impl, master=master_copy)
        state, master, opt_temp, paged = om.state_bytes, om.master_bytes, om.step_temp_bytes, om.paged
        opt_steps = om.step_counter_bytes
        dp = spec.gpus // (spec.tp * spec.pp)
        if spec.zero == 1 and dp > 1:
            # torch's ZeroRedundancyOptimizer gives each rank whole parameters, largest first to the lightest rank
            ranks = zero1_partition(trainable, tb, dp)
            zero1_state = max(optimizer_memory(r, tb, spec.optimizer, spec.optimizer_impl,
                                               master=master_copy).state_bytes for r in ranks)
        # The residual stream is fp32 under autocast when the embeddings are fp32 (full); a frozen
        # low-precision base keeps it in the compute dtype (freeze, LoRA).
        r = 4 if (amp and spec.method == "full") or kbit else cb
        ctx = ActContext(b=4 if kbit else cb, r=r, amp=amp, attn=spec.attn, dropout=spec.dropout,
                         reentrant=spec.grad_ckpt and behaviour(spec, "reentrant"),
                         repeat_kv=spec.attn == "sdpa" and sdpa_repeats_kv(spec), **ctx_kw)
        ctx_head = ctx if spec.method != "freeze" else replace(ctx, linears_trainable=False, norms_trainable=False)
        if spec.method in ("lora", "qlora"):
            w_other += n_tr * tb  # adapters counted with the weights
    return _Static(
        shape=shape, spec=spec, cb=cb, kvb=kvb, w_layers=st.layer_bytes, w_embed=st.embed_bytes,
        w_head=st.head_bytes, w_other=w_other, q_layers=st.layer_quant_state_bytes, q_other=q_other,
        buffers=st.buffer_bytes, quant_temp=quant_temp, quant_temp_per_token=quant_temp_tok,
        n_trainable=n_tr, grads=grads, opt_state=state, opt_paged=paged, master=master, opt_temp=opt_temp,
        autocast_copies=copies, autocast_head=copies_head, autocast_layer=copies_layer, lm_grad=lm_grad, ctx=ctx,
        ctx_head=ctx_head, saved_layers_trainable=saved_layers, tp_lin_frac=tp_lin_frac, opt_steps=opt_steps,
        zero1_state=zero1_state, fsdp_shard_frac=_fsdp_shard_frac(shape, spec), moe_merged=moe_merged,
        moe_delta_temp=moe_delta_temp,
    )


@lru_cache(maxsize=4096)
def _static_cached(spec, checkpoint):
    return _static(spec, checkpoint)


def workload_static(spec, checkpoint=None):
    """What a validated spec's prediction needs beyond batch, seq and gen (cached per spec without them).

    `checkpoint`: a formulas.checkpoint.StoredWeights whose bytes replace the formula's weights where
    `checkpoint_applies`."""
    return _static_cached(spec.replace(batch=1, seq=1, gen=0), checkpoint)


# ------------------------------------------------------------------ GPU slices (parallelism)

@dataclass(frozen=True)
class _Slice:
    """What one GPU holds: fractions of layers / embeddings / head, and divisors."""

    layer_frac: float = 1.0  # share of decoder layers (weights, KV cache)
    act_frac: float = 1.0  # share of per-layer saved activations (1F1B first stage holds pp micro-batches)
    embed: float = 1.0
    head: float = 1.0  # lm_head, final norm, logits
    tp: int = 1
    kv_div: float = 1.0
    state_div: int = 1  # ZeRO-1+: optimizer states and master weights
    grad_div: int = 1  # ZeRO-2+: gradients
    weight_div: int = 1  # ZeRO-3: weights
    ddp_bucket: bool = False  # DDP keeps a bucketed copy of the gradients for all-reduce
    zero1: bool = False  # optimizer state split by whole parameters (ZeroRedundancyOptimizer)
    fsdp: int = 0  # FSDP2 (2: parameters stay gathered from forward to backward; 3: gathered per layer)
    label: str = "gpu"


def _slices(st):
    s, shape = st.spec, st.shape
    tp, pp = s.tp, s.pp
    dp = s.gpus // (tp * pp)
    if shape.is_mla and s.mla_cache == "compressed":
        kv_div = 1.0  # one latent per token, replicated on every TP rank
    else:
        kv_div = min(tp, shape.n_kv_heads) if tp > 1 else 1
    z = s.zero
    train = s.mode == "train"
    common = dict(tp=tp, kv_div=kv_div, state_div=dp if z >= 1 else 1, grad_div=dp if z >= 2 else 1,
                  weight_div=dp if z >= 2 else 1, ddp_bucket=(dp > 1 and z <= 1 and train),
                  zero1=(dp > 1 and z == 1 and train), fsdp=z if (dp > 1 and z >= 2 and train) else 0)
    if s.layer_split and s.gpus > 1:
        g = s.gpus
        per = -(-shape.n_layers // g) / shape.n_layers
        tied = 1.0 if shape.tie_embeddings else 0.0
        return [_Slice(layer_frac=per, act_frac=per, embed=1.0, head=0.0, label="first GPU", **common),
                _Slice(layer_frac=per, act_frac=per, embed=tied, head=1.0, label="last GPU", **common)]
    if pp > 1:
        per = -(-shape.n_layers // pp) / shape.n_layers
        tied = 1.0 if shape.tie_embeddings else 0.0
        first_acts = min(1.0, per * pp) if s.mode == "train" else per
        return [_Slice(layer_frac=per, act_frac=first_acts, embed=1.0, head=0.0, label="first stage", **common),
                _Slice(layer_frac=per, act_frac=per, embed=tied, head=1.0, label="last stage", **common)]
    return [_Slice(**common)]


# ------------------------------------------------------------------ phases

def _head_tp(st, sl):
    """What the lm_head is split by: transformers' plans shard an untied head column-wise ("colwise_gather_output");
    a tied one is the replicated embedding."""
    return 1 if st.shape.tie_embeddings else sl.tp


def _held(st, sl, layers, embed, head, other):
    """Bytes of stored model state one GPU holds, from its parts in the layers, embeddings, head and elsewhere.

    Tensor parallelism (transformers' plans) splits the layers' linear weights and an untied head;
    embeddings and norms stay whole on every rank. ZeRO-3 / FSDP2 keeps 1/dp of everything at rest
    (the gathered layers are transients of the forward and backward, `_fsdp_gathered`)."""
    lin = layers * st.tp_lin_frac
    w = (layers - lin + lin / sl.tp) * sl.layer_frac + embed * sl.embed + head * sl.head / _head_tp(st, sl) + other
    if st.spec.offload == "params":
        w = 2 * (layers - lin + lin / sl.tp) / st.shape.n_layers  # streamed: the running layer and the next
    if sl.weight_div > 1:
        w = w * st.fsdp_shard_frac if sl.fsdp else w / sl.weight_div
    return w


def _weights_on(st, sl):
    """{weights, quant_state} one GPU holds."""
    return {C.WEIGHTS: _held(st, sl, st.w_layers - st.q_layers, st.w_embed, st.w_head, st.w_other - st.q_other),
            C.QUANT_STATE: _held(st, sl, st.q_layers, 0, 0, st.q_other)}


def _param_share(st, sl):
    """This GPU's share of the trainable parameters before any ZeRO split (pipeline stage, tensor-parallel shards)."""
    total = st.w_layers + st.w_embed + st.w_head + st.w_other
    lin = st.w_layers * st.tp_lin_frac
    mine = (st.w_layers - lin + lin / sl.tp) * sl.layer_frac + st.w_embed * sl.embed + \
        st.w_head * sl.head / _head_tp(st, sl) + st.w_other
    return mine / total if total else 1.0


def _fsdp_gathered(st, sl):
    """FSDP2's gathered weights beside the shards during forward and backward: the root's parameters (embeddings,
    final norm, head — the root does not reshard after forward) and, at ZeRO-2, every layer's (kept until backward)."""
    total = st.w_layers + st.w_embed + st.w_head + st.w_other
    gathered = total if sl.fsdp == 2 else total - st.w_layers
    return gathered * st.cb / 4 if fsdp_master_precision(st.spec) else gathered


def _phases_inference(st, sl, B, S, N):
    shape, s, cb = st.shape, st.spec, st.cb
    base = {**_weights_on(st, sl), C.BUFFERS: st.buffers}
    T = B * S
    kv_pf = kv_cache_bytes(shape, B, S, st.kvb, s.mla_cache, prefill=True) * sl.layer_frac / sl.kv_div
    # + int64 input ids per token, and cos/sin, position ids (and position embeddings) per position
    rep = sdpa_repeats_kv(s)
    ws = (T * (prefill_working_set_per_token(shape, cb, s.attn, S, s.compute_dtype == "fp16", rep) + 8) + S * forward_extras_per_position(shape, cb)
          + state_layers_fixed_bytes(cb, shape, "ws")) / sl.tp
    qtemp = st.quant_temp + T * st.quant_temp_per_token / sl.tp
    head_act = 2 * T * shape.hidden * cb * sl.head
    upcast_fwd = behaviour(s, "logits_upcast") == "forward"
    if upcast_fwd:
        # transformers < 4.46: the forward computes every prompt position's logits and upcasts them
        # (`logits = logits.float()`), whatever --logits says; generate's `outputs` keeps them into the first step
        logits = T * shape.vocab * (cb + (4 if cb != 4 else 0)) * sl.head
    else:
        logits = (B * shape.vocab * (cb + 4) if s.logits == "last" else T * shape.vocab * cb) * sl.head
    in_layer = ws + qtemp
    at_head = head_act + logits
    pick = in_layer >= at_head
    prefill = dict(base)
    prefill[C.KV_CACHE] = kv_pf
    prefill[C.ACTIVATIONS] = _pick(pick, ws, head_act)
    prefill[C.TEMPORARIES] = _pick(pick, qtemp, 0)
    prefill[C.LOGITS] = _pick(pick, 0, logits)
    has_dec = (N > 0) * 1
    total = S + N
    kv_dec = kv_cache_bytes(shape, B, total, st.kvb, s.mla_cache) * sl.layer_frac / sl.kv_div
    # DynamicLayer.update: torch.cat builds the grown K (then V) of one layer before freeing the old.
    cat_temp = kv_cache_bytes(shape, B, total, st.kvb, s.mla_cache) / shape.n_layers / 2 / sl.kv_div
    if behaviour(s, "legacy_cache"):  # transformers < 4.42: the previous step's whole cache is still referenced
        cat_temp = kv_cache_bytes(shape, B, total - 1, st.kvb, s.mla_cache) * sl.layer_frac / sl.kv_div
    step_ws = B * (prefill_working_set_per_token(shape, cb, s.attn, total, s.compute_dtype == "fp16", rep) + 8) + forward_extras_per_position(shape, cb)
    if shape.is_mla:  # every step re-expands the whole cached latent (kv_b_proj) and rebuilds per-head keys
        step_ws = step_ws + B * total * shape.n_heads * (shape.qk_nope_head_dim + shape.v_head_dim + shape.head_dim) * cb
    if (s.attn == "eager" or rep) and shape.n_kv_heads < shape.n_heads and not shape.is_mla:  # repeat_kv copies K and V of all cached tokens
        step_ws = step_ws + 2 * B * total * shape.n_heads * shape.head_dim * cb
    step_ws = step_ws / sl.tp
    # generate keeps the previous step's fp32 logits while copying the new ones: bf16 + 2 × fp32
    dec_logits = B * shape.vocab * (cb + 8) * sl.head
    if upcast_fwd:  # the step's logits upcast in the forward, beside the prompt's fp32 logits still held
        dec_logits = (B * shape.vocab * (cb + 8) + T * shape.vocab * 4) * sl.head
    decode = dict(base)
    decode[C.KV_CACHE] = kv_dec * has_dec
    decode[C.ACTIVATIONS] = step_ws * has_dec
    decode[C.TEMPORARIES] = (cat_temp + B * st.quant_temp_per_token / sl.tp) * has_dec
    decode[C.LOGITS] = dec_logits * has_dec
    return {"load": dict(base), "prefill": prefill, "decode": decode}


def _phases_train(st, sl, B, S, N):
    shape, s, ctx = st.shape, st.spec, st.ctx
    H, V = shape.hidden, shape.vocab
    share = _param_share(st, sl)
    held = {**_weights_on(st, sl), C.BUFFERS: st.buffers}
    shard = (lambda x, div: x * st.fsdp_shard_frac) if sl.fsdp else (lambda x, div: x / div)  # noqa: E731
    grads = shard(st.grads * share, sl.grad_div)
    bucket = st.grads * share if sl.ddp_bucket else 0
    offload_opt = s.offload == "optimizer"
    # every rank keeps a step counter per tensor it holds (FSDP2 and TP: all of them)
    state = 0 if offload_opt else shard((st.opt_state - st.opt_steps) * share, sl.state_div) + st.opt_steps
    if sl.zero1 and not offload_opt:
        state = st.zero1_state
    master = 0 if offload_opt else shard(st.master * share, sl.state_div)
    opt_temp = 0 if offload_opt else shard(st.opt_temp * share, sl.state_div)
    copies = st.autocast_copies * share / sl.weight_div
    if s.grad_ckpt:  # casts inside checkpointed layers are not saved: lm_head's, plus the layer running
        copies = (st.autocast_head + st.autocast_layer) * share / sl.weight_div
    T = B * S
    frac_layers = st.saved_layers_trainable / shape.n_layers
    if s.method == "freeze":
        per_layer = layer_saved_per_token(ctx, shape, S, shape.n_moe_layers > 0)
        # the first trainable layer's input comes from frozen layers: its input norm saves no fp32 copy or rsqrt
        acts = T * (per_layer * st.saved_layers_trainable - (4 * H + 4))
    else:
        acts = T * layers_saved_per_token(ctx, shape, S) + \
            state_layers_fixed_bytes(ctx.b, shape, "saved" if ctx.linears_trainable else "frozen")
    # Tensor parallel splits everything in a layer but the norms' inputs (Korthikanti et al. §4.2.2).
    replicated = T * shape.n_layers * 2 * (4 * H + ctx.r * H) * frac_layers
    acts = (acts - replicated) / sl.tp + replicated if sl.tp > 1 else acts
    acts = (acts + shape.n_moe_layers * st.moe_merged * sl.layer_frac / sl.tp) * sl.act_frac
    # final norm, lm_head input and ids per token; RoPE cos/sin and position ids per position
    ab = ctx.b  # the activations' dtype: the compute dtype, or fp32 after kbit prep
    model_saved = (T * model_saved_per_token(st.ctx_head, shape) + S * forward_extras_per_position(shape, ab)) * sl.head
    ids_fwd = 0 if st.ctx_head.linears_trainable else T * 8  # the input ids, alive during the forward
    if s.grad_ckpt:
        acts = T * ckpt_saved_per_token(ctx, shape, S) * frac_layers * sl.act_frac
    qtemp = st.quant_temp + st.moe_delta_temp * sl.layer_frac / sl.tp  # (ΔW built in a MoE layer's forward)
    layer_transient = T * 4 * H / sl.tp
    if s.grad_ckpt:
        layer_transient = T * prefill_working_set_per_token(shape, ab, s.attn, S, s.compute_dtype == "fp16",
                                                            sdpa_repeats_kv(s)) / sl.tp
    lb = ab  # logits come out of lm_head in the compute dtype (fp32 after kbit prep)
    # FSDP2 mixed precision: autograd's (unsharded) gradients come in the compute dtype, the shards are fp32
    ug = st.cb / 4 if (sl.fsdp and fsdp_master_precision(s)) else 1
    # transformers' TP plans gather the logits on every rank; the hidden state around the head is replicated
    # forward, at the loss: the logits and their fp32 copy (transformers < 4.46 upcast in the forward, freeing
    # the low-precision ones), the shifted copy (< 4.49: `logits[..., :-1, :].contiguous()`), the log-softmax
    fp32_logits = 4 if behaviour(s, "logits_upcast") == "forward" else lb + (4 if lb != 4 else 0)
    fwd_logits = T * V * (fp32_logits + 4 + (4 if behaviour(s, "shift_copy") else 0)) * sl.head
    bwd_logits = vmax(T * V * 12 * sl.head, T * V * lb * sl.head + st.lm_grad * ug * sl.head / _head_tp(st, sl))
    acc_grads = grads * ((s.grad_accum > 1) * 1)
    persistent = {**held, C.OPTIMIZER_STATES: state, C.MASTER_WEIGHTS: master}

    gathered = layer_flat = rs_held = root = 0
    if sl.fsdp:
        # FSDP2: the root's parameters (all, at ZeRO-2) gathered beside the shards; after the forward it
        # still holds the last layer's flat all-gather buffer, and in the backward the last reduce-scatter's
        # input (one layer's unsharded gradients) until the next one (docs/trace_findings.md #21).
        gathered = _fsdp_gathered(st, sl)
        root = _fsdp_gathered(st, replace(sl, fsdp=3))  # the root's parameters only
        layer_flat = st.w_layers / shape.n_layers if sl.fsdp == 3 else 0
        if fsdp_master_precision(s):
            layer_flat = layer_flat * st.cb / 4  # gathered in the compute dtype
        rs_held = st.grads * (st.w_layers / shape.n_layers) / (st.w_layers + st.w_embed + st.w_head + st.w_other)
    fwd = dict(persistent)
    fwd[C.WEIGHTS] = persistent[C.WEIGHTS] + gathered
    fwd[C.GRADIENTS] = acc_grads + bucket
    pick = fwd_logits >= layer_transient
    # The final norm's output stays bound while lm_head and the loss run: beside its saved bf16 cast
    # under autocast (#11), or unsaved when lm_head is frozen (LoRA, freeze: #5).
    head_hidden = 0
    if ctx.amp and ctx.r == 4:
        head_hidden = T * H * 4 * sl.head
    elif not st.ctx_head.linears_trainable:
        head_hidden = T * H * ctx.r * sl.head
    fwd[C.ACTIVATIONS] = acts + model_saved + ids_fwd + _pick(pick, head_hidden, layer_transient)
    fwd[C.LOGITS] = _pick(pick, fwd_logits, 0)
    fwd[C.TEMPORARIES] = copies + qtemp + layer_flat

    # Backward, three moments: its start (all saved activations + logits gradients); under checkpointing,
    # the last layer recomputed while the checkpointed inputs are still held; its end (nearly all
    # gradients while the first layer's activations — saved or recomputed — are consumed).
    one_layer = (T * largest_layer_saved_per_token(ctx, shape, S) + (st.moe_merged if shape.n_moe_layers else 0)) / sl.tp
    grad_buf = 2 * T * H * ctx.r  # gradient of the (replicated) hidden state flowing back, and its successor
    early_grads = acc_grads if s.grad_accum > 1 else st.lm_grad * sl.head / _head_tp(st, sl)
    start_total = acts + model_saved + bwd_logits + acc_grads + copies + layer_flat + (gathered - root)
    mid_total = (acts + one_layer + grad_buf + early_grads + copies) if s.grad_ckpt else 0
    end_total = grads + grad_buf + one_layer + rs_held
    layer_w = layer_grads = 0
    if sl.fsdp:
        # FSDP2, a layer's backward: its parameters gathered (and, at ZeRO-3, the flat all-gather buffer), its
        # unsharded gradients beside the previous layer's reduce-scatter input, and an untied head's unsharded
        # gradient, which the root reduce-scatters only at the end (docs/trace_findings.md #21).
        layer_w = st.w_layers / shape.n_layers * (st.cb / 4 if fsdp_master_precision(s) else 1)
        layer_grads = rs_held * ug
        head_ug = st.lm_grad * ug * sl.head if (not shape.tie_embeddings and s.method == "full") else 0
        layer_grads += head_ug
        end_total = grads + grad_buf + one_layer + rs_held + layer_grads + layer_w + layer_flat
    # A trained tied embedding gets two gradients, lm_head's and the embedding's (a dense (V, H) tensor,
    # aten embedding_dense_backward), which autograd sums before AccumulateGrad: at the very end of the
    # backward, the two and their sum are alive beside every other gradient (docs/trace_findings.md #18).
    tied_grad = st.lm_grad * sl.head * sl.embed if (shape.tie_embeddings and s.method == "full") else 0
    end_acts = one_layer + grad_buf
    end_grads = grads + layer_grads
    layer_moment = 1
    if tied_grad:
        # under FSDP2 the embedding's shard is not written yet, and the sum is the unsharded gradient it reduces
        done = grads - shard(tied_grad, sl.grad_div) if sl.fsdp else grads - tied_grad
        tied_total = done + 3 * tied_grad * ug + grad_buf + rs_held
        tied_wins = tied_total > end_total
        end_total = vmax(end_total, tied_total)
        end_acts = _pick(tied_wins, 3 * tied_grad * ug + grad_buf, end_acts)
        end_grads = _pick(tied_wins, done, end_grads)
        layer_moment = 1 - tied_wins
    p_start = (start_total >= end_total) * (start_total >= mid_total)
    p_mid = ((mid_total > start_total) * (mid_total >= end_total)) if s.grad_ckpt else 0
    p_end = 1 - p_start - p_mid
    bwd = dict(persistent)
    # ZeRO-2 keeps every layer gathered until its own backward: all of them at its start, one at the end
    bwd[C.WEIGHTS] = persistent[C.WEIGHTS] + (p_start + p_mid) * gathered + p_end * (root + layer_moment * layer_w)
    bwd[C.ACTIVATIONS] = p_start * (acts + model_saved) + p_mid * (acts + one_layer + grad_buf) + p_end * end_acts
    bwd[C.LOGITS] = p_start * bwd_logits
    bwd[C.GRADIENTS] = p_start * acc_grads + p_mid * early_grads + p_end * (end_grads + rs_held) + bucket
    bwd[C.TEMPORARIES] = (p_start + p_mid) * copies + qtemp + p_start * layer_flat + p_end * layer_moment * layer_flat

    opt = dict(persistent)
    opt[C.GRADIENTS] = grads + bucket
    opt[C.TEMPORARIES] = opt_temp
    load = dict(held)
    load[C.GRADIENTS] = bucket  # DDP allocates its buckets when it wraps the model
    return {"load": load, "forward": fwd, "backward": bwd, "optimizer_step": opt}


def paged_bytes(st, phase_bd):
    """Optimizer state in CUDA unified memory: on the device, but not in the caching allocator."""
    return phase_bd.get(C.OPTIMIZER_STATES, 0) if st.opt_paged else 0


def allocated_bytes(st, phase_bd):
    """Bytes the caching allocator holds in a phase: its tensor categories less paged optimizer state."""
    return sum(phase_bd.values()) - paged_bytes(st, phase_bd)


def device_totals(st, phase_bd, allocated, overheads):
    """(device categories, peak device bytes) on top of `allocated`; paged optimizer state counts on the device."""
    device = overheads.device_breakdown(allocated)
    return device, allocated + paged_bytes(st, phase_bd) + sum(device.values())


def _slice_phases(st, sl, B, S, N):
    raw = _phases_inference(st, sl, B, S, N) if st.spec.mode == "inference" else _phases_train(st, sl, B, S, N)
    out = {}
    for phase, bd in raw.items():
        full = {c: 0 for c in C.TENSOR_CATEGORIES}
        full.update(bd)
        out[phase] = {c: to_int(v) for c, v in full.items()}
    return out


def per_gpu_phases(st, batch, seq, gen):
    """[{phase: {tensor category: bytes}}], one per distinct GPU of the spec's layout (numbers or numpy arrays)."""
    return [_slice_phases(st, sl, batch, seq, gen) for sl in _slices(st)]


def _notes(st):
    s, shape = st.spec, st.shape
    notes = []
    if s.mode == "train":
        notes.append(f"precision {s.precision}: " + {
            "amp": "fp32 parameters, gradients and optimizer states; autocast to "
                   f"{s.compute_dtype} with cached weight copies",
            "pure": f"trainable parameters, gradients and optimizer states in "
                    f"{s.dtype if s.method not in ('lora', 'qlora') else s.lora_dtype}",
            "master": ("fp32 parameter shards (the master copy), gathered in "
                       f"{s.compute_dtype}; fp32 gradients and optimizer states (FSDP2 mixed precision)"
                       if fsdp_master_precision(s) else
                       "low-precision parameters and gradients, fp32 master weights and optimizer states"),
        }[s.precision])
        if st.opt_paged:
            notes.append("paged optimizer state lives in CUDA unified memory: counted on the device, not in peak_allocated")
        if s.method in ("lora", "qlora"):
            targets = ", ".join(s.lora_targets or default_targets(shape))
            notes.append(f"LoRA r={s.lora_rank} on {targets}: {st.n_trainable:,} trainable parameters in {s.lora_dtype}")
        if s.method == "freeze":
            notes.append(f"freeze: last {s.trainable_layers} of {shape.n_layers} layers train ({st.n_trainable:,} parameters)")
        if kbit_prepared(s):
            notes.append("kbit prep (peft prepare_model_for_kbit_training): unquantized weights, activations and logits "
                         "in fp32; --no-kbit-prep for a trainer that skips it (TRL ≥ 0.26)")
    else:
        if shape.is_mla:
            notes.append(f"MLA KV cache {s.mla_cache}" + (" (the latent, as transformers 5, vLLM and SGLang cache it)"
                                                          if s.mla_cache == "compressed"
                                                          else " (per-head K/V, as older remote-code DeepSeek models)"))
        if shape.cache_groups:
            notes.append("cache per layer as transformers keeps it: " + cache_summary(shape))
        elif shape.sliding_window:
            notes.append(f"sliding window: KV cache capped at {shape.sliding_window} tokens per layer")
        if s.dtype.startswith("q") and "_" in s.dtype:
            notes.append("GGUF: weights as llama.cpp stores them; activations and KV cache as transformers would hold them")
    if s.dtype == "mxfp4":
        notes.append("MXFP4: MoE experts packed (4-bit codes + a uint8 scale per 32 values, fp32 biases) as transformers "
                     "keeps them with its triton kernels; without them it dequantizes to bf16 (--dtype bf16)")
    elif shape.stored_quant and s.dtype in ("bf16", "fp16", "fp32") and not shape.stored_quant == s.dtype:
        notes.append(f"the checkpoint is stored as {shape.stored_quant}; this is the model transformers dequantizes it to "
                     f"when the {shape.stored_quant} kernels are missing (--dtype {shape.stored_quant} for the stored form)")
    if shape.family == "generic":
        notes.insert(0, f"{shape.model_type}: tensors read off the model {shape.inventory_source} builds (general "
                        "inventory); activations by the Llama-style per-layer rule on its sizes")
        probed = sum(g.count for g in shape.cache_groups if g.probe)
        if probed:
            notes.append(f"{probed} linear-attention/SSM layers: activations read off one such layer run on fake tensors "
                         "when the inventory was built (transformers' PyTorch reference path; the fused kernels of "
                         "flash-linear-attention / mamba-ssm need less)")
        if shape.n_state_layers > probed:
            notes.append(f"no activation rule for {shape.n_state_layers - probed} linear-attention/SSM layers (counted "
                         "like attention layers); `vramlab trace` gives the exact figure")
        attends = any(g.kind in ("full", "sliding") for g in shape.cache_groups) or not shape.cache_groups
        if shape.attn_implementations == ("eager",) and s.attn == "eager" and attends:
            notes.append(f"{shape.model_type} runs eager attention only ({shape.inventory_source})")
    if s.dtype in ("int8", "nf4", "fp4") and shape.is_moe:
        if behaviour(s, "experts") == "fused":
            notes.append("bitsandbytes via transformers quantizes nn.Linear only: transformers ≥ 5 fuses the MoE experts into "
                         "3-D tensors, which stay in the compute dtype" + (" (fp32 after kbit prep)" if kbit_prepared(s) else "")
                         + "; transformers 4.x (--transformers 4.57) kept nn.Linear experts, quantized")
        else:
            notes.append("transformers 4.x builds each MoE expert as nn.Linear: bitsandbytes quantizes every expert")
    notes.extend(stack_notes(s, shape))
    if s.gpus > 1:
        notes.append(f"per-GPU figures for {s.gpus} GPUs (tp={s.tp}, pp={s.pp}, zero={s.zero}"
                     f"{', layer split' if s.layer_split else ''}{', offload ' + s.offload if s.offload != 'none' else ''})")
    return notes


def predict(spec, overheads=DEFAULT_OVERHEADS, checkpoint=None):
    """Predict the per-GPU memory of one workload. Raises SpecError / UnknownModelError on bad input.

    `checkpoint`: the model's stored weights (formulas.checkpoint.StoredWeights, from its safetensors
    headers), used in place of the formula's weights where they apply (`checkpoint_applies`)."""
    shape = get_shape(spec.model)
    spec = validate(spec, shape)
    st = workload_static(spec, checkpoint)
    notes = _notes(st)
    source = "formula"
    if checkpoint is not None:
        stored_as = checkpoint.dtype or f"{checkpoint.quant_method or 'a format'} (not modelled by the formula)"
        if checkpoint_applies(spec, checkpoint):
            source = "checkpoint"
            notes.insert(0, f"weights: the checkpoint's stored bytes (its safetensors headers, {stored_as}), "
                            "not the formula")
        elif _recast(spec):
            notes.insert(0, "weights: the formula's, not the checkpoint's: recast on loading (fp32 parameters for "
                            "amp full training, or kbit prep)")
        else:
            notes.insert(0, f"weights: the formula's, not the checkpoint's: stored as {stored_as}, loaded as "
                            f"{spec.dtype}" + (f" (--dtype {checkpoint.dtype} loads it as stored)" if checkpoint.dtype
                                               else " (a float --dtype loads it as stored)"))
    best = None  # the GPU and phase that hold the most
    for phases in per_gpu_phases(st, spec.batch, spec.seq, spec.gen):
        for phase, bd in phases.items():
            alloc = allocated_bytes(st, bd)
            if best is None or alloc > best[0]:
                best = (alloc, phase, bd, phases)
    alloc, phase, bd, phases = best
    device_bd, device = device_totals(st, bd, alloc, overheads)
    if spec.mode == "inference" and spec.gen == 0:
        phases = {k: v for k, v in phases.items() if k != "decode"}
    return Prediction(
        spec=spec, model=shape.name, n_params=shape.n_params, breakdown={**bd, **device_bd},
        peak_allocated_bytes=alloc, peak_device_bytes=device, peak_phase=phase, phases=phases,
        notes=notes, overheads_source=overheads.source, calibrated=overheads.calibrated, weights_source=source,
    )
