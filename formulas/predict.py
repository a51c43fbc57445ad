"""Spec → Prediction: the memory breakdown at the peak moment, the peak phase, and two totals.

The workload modelled is the one vramlab's harness runs with transformers:
- inference: load, prefill of batch × seq tokens (generate-style: logits of the last
  position, upcast to fp32), then `gen` decode steps with the DynamicCache;
- training: steps of forward (`loss = model(ids, labels=ids).loss`, the output object
  dropped at once), backward and optimizer.step(), with `zero_grad(set_to_none=True)`;
  the optimizer state from step 1 is alive in every later step, which is where the
  steady-state peak is.

`peak_allocated_bytes` is the sum of tensor categories at the peak moment plus the library
workspaces the caching allocator holds then (what torch.cuda.max_memory_allocated reports);
`peak_reserved_bytes` adds the allocator's slack (torch.cuda.max_memory_reserved) and
`peak_device_bytes` the CUDA context outside the allocator (what NVML reports), from `Overheads`
(formulas/overhead.py, formulas/device.py).
Multi-GPU specs are predicted per GPU, for the GPU that needs the most.

`predict` answers one spec. The steps it takes are public so that `grid.predict_grid` can run
the same arithmetic on numpy arrays of batch, seq and gen: `workload_static` (everything that
does not depend on them, cached), `per_gpu_phases` (the breakdown of every phase on every
distinct GPU), `allocated_bytes` and `device_totals`.
"""

from dataclasses import dataclass, field, fields, replace
from functools import lru_cache

from . import categories as C
from . import remote_code
from .activations import (
    ActContext,
    ckpt_saved_per_token,
    forward_extras_per_position,
    largest_layer_saved_per_token,
    layer_saved_per_token,
    layers_saved_per_token,
    model_saved_per_token,
    prefill_working_set_per_token,
    sdpa_math_mask_bytes,
    selective_saved_per_token,
    state_layers_fixed_bytes,
)
from .catalog import get_shape
from .device import sdpa_backend
from .checkpoint import check_checkpoint_size
from .dtypes import BNB_DTYPES, DTYPE_BYTES
from .elementwise import pick as _pick
from .elementwise import to_int, vmax, vmin
from .kv_cache import cache_summary, kv_cache_bytes
from .lora import adapted_roles, default_targets, lora_params, lora_tensors, resolve_targets
from .overhead import DEFAULT_OVERHEADS
from . import recipes as R
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
    peak_allocated_bytes: int  # tensor categories + workspaces at the peak
    peak_device_bytes: int  # + allocator slack and the CUDA context
    peak_phase: str  # load | prefill | decode | forward | backward | optimizer_step
    phases: dict  # phase → {allocated category → bytes} at that phase's own peak
    notes: list = field(default_factory=list)  # assumptions worth reading
    overheads_source: str = ""  # where the device overheads came from
    calibrated: bool = False  # True when the overheads came from a calibration table (measurements)
    weights_source: str = "formula"  # formula | checkpoint (the safetensors headers' stored bytes)
    peak_reserved_bytes: int = 0  # what the caching allocator holds at its peak (max_memory_reserved)
    # Host RAM the workload keeps activations in (a recipe's offloaded checkpointing), not a device category
    host_ram_bytes: int = 0

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
    biased: bool = False  # the model has biased linears (cuBLASLt GEMMs where torch keeps their workspace apart)
    ep_frac: float = 0.0  # share of the layers' weight bytes in routed experts (what expert parallelism splits)
    rules: object = None  # formulas.recipes.Rules: what the fine-tuning recipe does to the step
    lm_head_elem_bytes: int = 2  # bytes per element of lm_head's weight (fp32 after kbit prep or under amp full training)


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
    dp = shard_world(spec)
    if spec.zero < 2 or dp < 2:
        return 0.0
    params = [t for t in shape.tensors if t.kind != "buffer" and t.shape]
    total = sum(t.total_numel for t in params)
    mine = sum(-(-t.shape[0] // dp) * (t.numel // t.shape[0]) * t.count for t in params)
    return mine / total if total else 1.0 / dp


def _routed_expert(t):
    """A tensor of the routed experts: fused 3-D experts, or transformers 4.x's nn.Linear per expert."""
    return t.kind == "experts" or (".experts." in t.name and "shared" not in t.name)


def shard_world(spec):
    """The data-parallel GPUs ZeRO / FSDP shards over: all of them (--gpus / (--tp × --pp), context-parallel ones
    included, as torchtitan's fsdp = dp_shard × cp), or the hybrid-sharding group (--shard-gpus)."""
    return spec.shard_gpus or spec.gpus // (spec.tp * spec.pp)


def zero1_whole_tensors(spec):
    """ZeRO-1 as torch's ZeroRedundancyOptimizer builds it (whole tensors per rank, what the tracer runs) — over
    plain data parallelism. Beside tensor, pipeline, context or expert parallelism ZeRO-1 is Megatron-LM's
    distributed optimizer (and DeepSpeed's stage 1): a flat buffer split evenly over the data-parallel ranks."""
    dp = spec.gpus // (spec.tp * spec.pp)
    return spec.zero == 1 and dp > 1 and spec.tp == spec.pp == spec.cp == spec.ep == 1 and not spec.shard_gpus


def fsdp_offload(spec):
    """FSDP's CPU offload (`--offload params` under ZeRO-2/3): parameters, gradients and the optimizer step on the
    CPU. torch 2.13 torch/distributed/fsdp/api.py:230-241 (CPUOffload: "offloads gradients to CPU as well, meaning
    that the optimizer step runs on CPU") and _fully_shard/_fsdp_api.py:183-189 (CPUOffloadPolicy, FSDP2)."""
    return spec.mode == "train" and spec.offload == "params" and spec.zero >= 2 and spec.gpus // (spec.tp * spec.pp) > 1


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
    rl = R.rules(spec, shape)
    if shape.remote_code:
        remote_code.check_spec(spec, shape)
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
        if spec.dtype in ("nf4", "fp4") and spec.double_quant:
            # bitsandbytes' _dequant_linear_fallback (backends/cuda/ops.py, 0.50): the nested absmax dequantized to
            # fp32, then `absmax_dq + absmax_offset`, a second fp32 copy, beside the dequantized weight
            quant_temp += 2 * 4 * -(-st.largest_quantized // spec.group_size if spec.group_size else 0)
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
    layer_numel = sum(t.total_numel for t in shape.tensors if _is_layer(t))
    tp_lin_frac = lin / layer_numel if lin else 0.0
    routed = sum(t.total_numel for t in shape.tensors if _is_layer(t) and _routed_expert(t))
    ep_frac = routed / layer_numel if routed else 0.0
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
                          lora=adapted_roles(shape, targets),
                          lora_rank=spec.lora_rank, lora_x_bytes=tb, lora_input_copied=tb != act_bytes)
        grads = gradient_bytes(trainable, tb)
        master_copy = spec.precision == "master" and not fsdp_master
        om = optimizer_memory(trainable, tb, spec.optimizer, spec.optimizer_impl, master=master_copy)
        state, master, opt_temp, paged = om.state_bytes, om.master_bytes, om.step_temp_bytes, om.paged
        opt_steps = om.step_counter_bytes
        dp = spec.gpus // (spec.tp * spec.pp)
        if zero1_whole_tensors(spec):
            # torch's ZeroRedundancyOptimizer gives each rank whole parameters, largest first to the lightest rank
            ranks = zero1_partition(trainable, tb, dp)
            zero1_state = max(optimizer_memory(r, tb, spec.optimizer, spec.optimizer_impl,
                                               master=master_copy).state_bytes for r in ranks)
        # The residual stream is fp32 under autocast when the embeddings are fp32 (full); a frozen
        # low-precision base keeps it in the compute dtype (freeze, LoRA).
        r = 4 if (amp and spec.method == "full") or kbit else cb
        repeat = spec.attn == "sdpa" and sdpa_repeats_kv(spec)
        grouped = shape.n_kv_heads < shape.n_heads and not repeat and shape.family in ("llama", "moe", "generic")
        # the attention's dtype: fp32 after kbit prep (the stream), else the compute dtype (autocast casts to it)
        attn_dtype = "fp32" if kbit else spec.compute_dtype
        math = spec.attn == "sdpa" and grouped and sdpa_backend(
            spec, head_dim_qk=shape.head_dim, head_dim_v=shape.head_dim, grouped=True, dtype=attn_dtype) == "math"
        reentrant = behaviour(spec, "reentrant") if rl.ckpt_reentrant is None else rl.ckpt_reentrant
        ctx = ActContext(b=4 if kbit else cb, r=r, amp=amp, attn=spec.attn, dropout=spec.dropout,
                         reentrant=spec.grad_ckpt and reentrant, repeat_kv=repeat, sdpa_math=math,
                         norm_kernel=rl.norm_kernel, swiglu_kernel=rl.swiglu_kernel, fused_lora=rl.fused_lora, **ctx_kw)
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
        moe_delta_temp=moe_delta_temp, biased=any(t.kind == "bias" for t in shape.tensors), ep_frac=ep_frac,
        rules=rl, lm_head_elem_bytes=4 if (kbit or (amp and spec.method == "full") or spec.compute_dtype == "fp32") else cb,
    )


@lru_cache(maxsize=8192)
def _static_cached(spec, checkpoint):
    if zero1_whole_tensors(spec):
        return _static(spec, checkpoint)  # ZeroRedundancyOptimizer's partition depends on the world
    # The static part depends on the layout only through FSDP's padded shard share and whether the data-parallel
    # GPUs are several (FSDP2's master precision), and on checkpointing only when it is reentrant: one core per
    # such class serves every count, split and lever the planner tries.
    dp = spec.gpus // (spec.tp * spec.pp)
    core_spec = spec.replace(gpus=2 if dp > 1 else 1, tp=1, pp=1, cp=1, ep=1, sequence_parallel=False, offload="none",
                             shard_gpus=0,
                             layer_split=False, grad_accum=1, ckpt_every=1, zero=spec.zero if spec.zero >= 2 else 0,
                             grad_ckpt=spec.grad_ckpt and behaviour(spec, "reentrant"))
    if core_spec == spec:
        return _static(spec, checkpoint)
    core = _static_cached(core_spec, checkpoint)
    return replace(core, spec=spec, fsdp_shard_frac=_fsdp_shard_frac(core.shape, spec))


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
    ep: int = 1  # expert-parallel degree: routed experts / ep where ZeRO does not shard them already
    label: str = "gpu"


def _slices(st):
    s, shape = st.spec, st.shape
    tp, pp = s.tp, s.pp
    dp = s.gpus // (tp * pp)
    shard = shard_world(s)  # hybrid sharding: ZeRO over groups of `shard`, plain replicas across the groups
    if shape.is_mla and s.mla_cache == "compressed":
        kv_div = 1.0  # one latent per token, replicated on every TP rank
    else:
        kv_div = min(tp, shape.n_kv_heads) if tp > 1 else 1
    z = s.zero
    train = s.mode == "train"
    common = dict(tp=tp, kv_div=kv_div, state_div=shard if z >= 1 else 1, grad_div=shard if z >= 2 else 1,
                  weight_div=shard if z >= 2 else 1, ddp_bucket=(dp > 1 and z <= 1 and train),
                  zero1=train and zero1_whole_tensors(s), fsdp=z if (dp > 1 and z >= 2 and train) else 0, ep=s.ep)
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
    a tied one is the replicated embedding. Megatron-LM and torchtitan (--sequence-parallel) split both."""
    return sl.tp if (st.spec.sequence_parallel or not st.shape.tie_embeddings) else 1


def _embed_tp(st, sl):
    """What the token embedding is split by: whole on every rank in transformers' TP plans; vocabulary-parallel in
    Megatron-LM (VocabParallelEmbedding) and torchtitan (RowwiseParallel on the embedding), --sequence-parallel."""
    return sl.tp if st.spec.sequence_parallel else 1


def _held(st, sl, layers, embed, head, other):
    """Bytes of stored model state one GPU holds, from its parts in the layers, embeddings, head and elsewhere.

    Tensor parallelism (transformers' plans) splits the layers' linear weights and an untied head;
    embeddings and norms stay whole on every rank. ZeRO-3 / FSDP2 keeps 1/dp of everything at rest
    (the gathered layers are transients of the forward and backward, `_fsdp_gathered`)."""
    ep = sl.ep if sl.weight_div == 1 else 1  # under ZeRO-3 the experts' shards are 1/dp whatever ep is
    w = layers * _layer_share(st, sl, ep) * sl.layer_frac + embed * sl.embed / _embed_tp(st, sl) + \
        head * sl.head / _head_tp(st, sl) + other
    if st.spec.offload == "params":
        w = 2 * layers * _layer_share(st, sl, ep) / st.shape.n_layers  # streamed: the running layer and the next
    if sl.weight_div > 1:
        w = w * st.fsdp_shard_frac if sl.fsdp else w / sl.weight_div
    return w


def _layer_share(st, sl, ep=1):
    """Share of a decoder layer's weight bytes one GPU holds: linear weights / tp (routed experts / (tp × ep))."""
    dense_lin = st.tp_lin_frac - st.ep_frac
    return (1 - st.tp_lin_frac) + dense_lin / sl.tp + st.ep_frac / (sl.tp * ep)


def _weights_on(st, sl):
    """{weights, quant_state} one GPU holds.

    bitsandbytes' 4-bit quantization state is a module attribute outside FSDP's flat parameters
    (bitsandbytes 0.50.2 bitsandbytes/nn/modules.py:487-501, `fix_4bit_weight_quant_state_from_module`: "the quant
    state got lost when the parameter got converted. This happens for example for fsdp"): under FSDP-QLoRA every
    rank keeps all of it on its GPU, whether or not the packed weights are sharded or offloaded."""
    quant = _held(st, sl, st.q_layers, 0, 0, st.q_other)
    if sl.fsdp and st.spec.dtype in BNB_DTYPES:
        quant = st.q_layers * sl.layer_frac + st.q_other
    return {C.WEIGHTS: _held(st, sl, st.w_layers - st.q_layers, st.w_embed, st.w_head, st.w_other - st.q_other),
            C.QUANT_STATE: quant}


def _param_share(st, sl, ep=1):
    """This GPU's share of the trainable parameters before any ZeRO split (pipeline stage, tensor-parallel shards,
    and with `ep` the expert-parallel split, for what ZeRO does not shard)."""
    total = st.w_layers + st.w_embed + st.w_head + st.w_other
    mine = st.w_layers * _layer_share(st, sl, ep) * sl.layer_frac + st.w_embed * sl.embed / _embed_tp(st, sl) + \
        st.w_head * sl.head / _head_tp(st, sl) + st.w_other
    return mine / total if total else 1.0


def _fsdp_gathered(st, sl):
    """FSDP2's gathered weights beside the shards during forward and backward: the root's parameters (embeddings,
    final norm, head — the root does not reshard after forward) and, at ZeRO-2, every layer's (kept until backward).
    Under tensor parallelism what is gathered is this rank's TP shard (an untied head / tp, layers' linears / tp)."""
    root = st.w_embed * sl.embed / _embed_tp(st, sl) + st.w_head * sl.head / _head_tp(st, sl) + st.w_other
    gathered = root + (st.w_layers * _layer_share(st, sl, sl.ep) * sl.layer_frac if sl.fsdp == 2 else 0)
    return gathered * st.cb / 4 if fsdp_master_precision(st.spec) else gathered


def _sdpa_math(st, repeats_kv, cc):
    """Whether SDPA runs its math kernel in this spec's prefill on a GPU of compute capability `cc`
    (formulas.device.sdpa_backend): transformers passes grouped K/V heads (enable_gqa) unless it repeats them, and no
    mask without padding."""
    shape, s = st.shape, st.spec
    if s.attn != "sdpa" or shape.family not in ("llama", "moe", "generic"):
        return False
    grouped = shape.n_kv_heads < shape.n_heads and not repeats_kv
    return sdpa_backend(s, head_dim_qk=shape.head_dim, head_dim_v=shape.head_dim, grouped=grouped, cc=cc) == "math"


def _phases_inference(st, sl, B, S, N, cc=None):
    shape, s, cb = st.shape, st.spec, st.cb
    base = {**_weights_on(st, sl), C.BUFFERS: st.buffers}
    T = B * S
    kv_pf = kv_cache_bytes(shape, B, S, st.kvb, s.mla_cache, prefill=True) * sl.layer_frac / sl.kv_div
    # + int64 input ids per token, and cos/sin, position ids (and position embeddings) per position
    rep = sdpa_repeats_kv(s)
    math = _sdpa_math(st, rep, cc)
    ws = (T * (prefill_working_set_per_token(shape, cb, s.attn, S, s.compute_dtype == "fp16", rep, math) + 8)
          + S * forward_extras_per_position(shape, cb) + state_layers_fixed_bytes(cb, shape, "ws")
          + (sdpa_math_mask_bytes(S, cb) if math else 0)) / sl.tp
    qtemp = st.quant_temp + T * st.quant_temp_per_token / sl.tp
    head_act = 2 * T * shape.hidden * cb * sl.head
    upcast_fwd = behaviour(s, "logits_upcast") == "forward"
    if upcast_fwd:
        # transformers < 4.46: the forward computes every prompt position's logits and upcasts them
        # (`logits = logits.float()`), whatever --logits says; generate's `outputs` keeps them into the first step
        logits = T * shape.vocab * (cb + (4 if cb != 4 else 0)) * sl.head
    else:
        logits = (B * shape.vocab * (cb + 4) if s.logits == "last" else T * shape.vocab * cb) * sl.head
    ws_q = ws
    if s.dtype in ("nf4", "fp4") and st.quant_temp and shape.n_dense_layers:
        # bitsandbytes dequantizes a whole weight inside gemm_4bit for a many-token matmul. The SwiGLU moment (act,
        # up and their product: 3·I per token) holds no dequantized weight; the up_proj moment (act, up's output
        # and the dequantized weight) holds one I-wide tensor less: the layer's peak is the larger of the two.
        ws_dq = ws - T * shape.intermediate * cb / sl.tp
        dq = (ws_dq + qtemp) > ws
        ws_q = _pick(dq, ws_dq, ws)
        qtemp = _pick(dq, qtemp, 0)
    in_layer = ws_q + qtemp
    at_head = head_act + logits
    pick = in_layer >= at_head
    prefill = dict(base)
    prefill[C.KV_CACHE] = kv_pf
    prefill[C.ACTIVATIONS] = _pick(pick, ws_q, head_act)
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
    # expert parallelism splits the experts' state where ZeRO does not already shard it over the data-parallel GPUs
    def ep_share(div):
        return _param_share(st, sl, sl.ep) if (sl.ep > 1 and div == 1) else share

    held = {**_weights_on(st, sl), C.BUFFERS: st.buffers}
    shard = (lambda x, div: x * st.fsdp_shard_frac) if sl.fsdp else (lambda x, div: x / div)  # noqa: E731
    grads = shard(st.grads * ep_share(sl.grad_div), sl.grad_div)
    bucket = st.grads * ep_share(1) if sl.ddp_bucket else 0
    cpu_step = fsdp_offload(s)  # FSDP CPU offload: sharded gradients go to the CPU in the backward, the step runs there
    offload_opt = s.offload == "optimizer" or cpu_step
    if cpu_step:
        grads = 0
    # every rank keeps a step counter per tensor it holds (FSDP2 and TP: all of them)
    sshare = ep_share(sl.state_div)
    state = 0 if offload_opt else shard((st.opt_state - st.opt_steps) * sshare, sl.state_div) + st.opt_steps
    if sl.zero1 and not offload_opt:
        state = st.zero1_state
    master = 0 if offload_opt else shard(st.master * sshare, sl.state_div)
    opt_temp = 0 if offload_opt else shard(st.opt_temp * sshare, sl.state_div)
    copies = st.autocast_copies * share / sl.weight_div
    if s.grad_ckpt:  # casts inside checkpointed layers are not saved: lm_head's, plus the layer running
        copies = (st.autocast_head + st.autocast_layer) * share / sl.weight_div
    if s.cp > 1:  # context parallelism: each GPU holds seq / cp positions of every sequence
        S_local = S / s.cp
        T = B * S_local
    else:
        S_local, T = S, B * S
    frac_layers = st.saved_layers_trainable / shape.n_layers
    if s.method == "freeze":
        per_layer = layer_saved_per_token(ctx, shape, S, shape.n_moe_layers > 0)
        # the first trainable layer's input comes from frozen layers: its input norm saves no fp32 copy or rsqrt
        acts = T * (per_layer * st.saved_layers_trainable - (4 * H + 4))
    else:
        acts = T * layers_saved_per_token(ctx, shape, S) + \
            state_layers_fixed_bytes(ctx.b, shape, "saved" if ctx.linears_trainable else "frozen")
    # Tensor parallel splits everything in a layer but the norms' inputs (Korthikanti et al. §4.2.2); with
    # sequence parallelism (Megatron-LM, torchtitan) those are split along the sequence too (§4.2.2, eq. 4).
    sp = s.sequence_parallel
    replicated = T * shape.n_layers * 2 * (4 * H + ctx.r * H) * frac_layers
    if sl.tp > 1:
        acts = acts / sl.tp if sp else (acts - replicated) / sl.tp + replicated
    acts = (acts + shape.n_moe_layers * st.moe_merged * sl.layer_frac / sl.tp) * sl.act_frac
    # final norm, lm_head input and ids per token; RoPE cos/sin and position ids per position
    ab = ctx.b  # the activations' dtype: the compute dtype, or fp32 after kbit prep
    model_saved = (T * model_saved_per_token(st.ctx_head, shape) + S_local * forward_extras_per_position(shape, ab)) \
        * sl.head
    ids_fwd = 0 if st.ctx_head.linears_trainable else T * 8  # the input ids, alive during the forward
    if s.grad_ckpt:
        ckpt = T * ckpt_saved_per_token(ctx, shape, S) * frac_layers * sl.act_frac / (sl.tp if sp else 1)
        # torchtitan's layer SAC wraps every k-th block (v0.2.2 torchtitan/distributed/activation_checkpoint.py:27-49,
        # `_layer_sac_count % ac_freq == 0`): L // k layers keep their input only, the others all they save
        kept = shape.n_layers // s.ckpt_every
        acts = ckpt if kept == shape.n_layers else ckpt * kept / shape.n_layers + acts * (1 - kept / shape.n_layers)
    qtemp = st.quant_temp + st.moe_delta_temp * sl.layer_frac / sl.tp  # (ΔW built in a MoE layer's forward)
    if sl.ep > 1 and shape.n_moe_layers:
        # expert parallelism: a MoE layer's tokens, permuted by expert (T · k rows) and received from the other
        # ranks by the all-to-all (as many again, with balanced routing), while the layer runs
        qtemp = qtemp + 2 * T * shape.experts_per_token * H * ab
    layer_transient = T * 4 * H / sl.tp
    if s.grad_ckpt:
        layer_transient = (T * prefill_working_set_per_token(shape, ab, s.attn, S, s.compute_dtype == "fp16",
                                                             sdpa_repeats_kv(s), ctx.sdpa_math)
                           + (sdpa_math_mask_bytes(S, ab) if ctx.sdpa_math else 0)) / sl.tp
    lb = ab  # logits come out of lm_head in the compute dtype (fp32 after kbit prep)
    # FSDP2 mixed precision: autograd's (unsharded) gradients come in the compute dtype, the shards are fp32
    ug = st.cb / 4 if (sl.fsdp and fsdp_master_precision(s)) else 1
    # transformers' TP plans gather the logits on every rank; the hidden state around the head is replicated
    # forward, at the loss: the logits and their fp32 copy (transformers < 4.46 upcast in the forward, freeing
    # the low-precision ones), the shifted copy (< 4.49: `logits[..., :-1, :].contiguous()`), the log-softmax
    fp32_logits = 4 if behaviour(s, "logits_upcast") == "forward" else lb + (4 if lb != 4 else 0)
    # (under sequence parallelism the loss is vocabulary-parallel, as Megatron-LM and torchtitan's loss_parallel
    # compute it: each rank its V / tp columns of the logits)
    vocab_div = sl.tp if sp else 1
    fwd_logits = T * V * (fp32_logits + 4 + (4 if behaviour(s, "shift_copy") else 0)) * sl.head / vocab_div
    bwd_logits = vmax(T * V * 12 * sl.head / vocab_div,
                      T * V * lb * sl.head / vocab_div + st.lm_grad * ug * sl.head / _head_tp(st, sl))
    rl = st.rules
    lm_in = T * H * (ab if st.ctx_head.amp else st.ctx_head.r) if st.ctx_head.linears_trainable else 0
    loss_hidden_bwd = 0  # what of the final hidden state the loss keeps for the backward (activations)
    model_saved_bwd = model_saved
    loss_temp_fwd = loss_temp_bwd = 0
    if rl.loss != "full":
        loss = _recipe_loss(st, T, B, S)
        fwd_logits, bwd_logits, loss_hidden_bwd = loss["fwd"], loss["bwd"], loss["bwd_acts"]
        loss_temp_fwd, loss_temp_bwd = loss["fwd_temp"], loss["bwd_temp"]
        model_saved_bwd = model_saved - lm_in * (1 - loss["keeps_lm_in"])  # fused, chunked: no lm_head input saved
    ckpt_buffers = 0
    if s.grad_ckpt and rl.ckpt_mode == "offload":
        # Unsloth checkpoints plainly below 512 tokens (recipes.effective_ckpt_mode)
        plain = S < R.UNSLOTH_OFFLOAD_MIN_SEQ
        off_acts, off_buffers = _offloaded_acts(st, T, S)
        acts, ckpt_buffers = _pick(plain, acts, off_acts), _pick(plain, 0, off_buffers)
    elif s.grad_ckpt and rl.ckpt_mode == "selective":
        acts = acts + T * shape.n_layers * selective_saved_per_token(ctx, shape)
    acc_grads = grads * ((s.grad_accum > 1) * 1)
    persistent = {**held, C.OPTIMIZER_STATES: state, C.MASTER_WEIGHTS: master}

    gathered = layer_flat = rs_held = root = 0
    if sl.fsdp:
        # FSDP2: the root's parameters (all, at ZeRO-2) gathered beside the shards; after the forward it
        # still holds the last layer's flat all-gather buffer, and in the backward the last reduce-scatter's
        # input (one layer's unsharded gradients) until the next one (docs/trace_findings.md #21).
        gathered = _fsdp_gathered(st, sl)
        root = _fsdp_gathered(st, replace(sl, fsdp=3))  # the root's parameters only
        one_w = st.w_layers / shape.n_layers * _layer_share(st, sl, sl.ep)  # one layer's (TP / EP shard's) weights
        layer_flat = one_w if sl.fsdp == 3 else 0
        if fsdp_master_precision(s):
            layer_flat = layer_flat * st.cb / 4  # gathered in the compute dtype
        rs_held = st.grads * one_w / (st.w_layers + st.w_embed + st.w_head + st.w_other)
    fwd = dict(persistent)
    fwd[C.WEIGHTS] = persistent[C.WEIGHTS] + gathered
    fwd[C.GRADIENTS] = acc_grads + bucket
    if (rl.recipe != "hf" or rl.loss != "full") and not s.grad_ckpt:  # the last layer's LoRA MLP, as below
        layer_transient = vmax(layer_transient, T * _lora_recompute_per_token(ctx, shape))
    pick = fwd_logits + loss_temp_fwd >= layer_transient
    # The final norm's output stays bound while lm_head and the loss run: beside its saved bf16 cast
    # under autocast (#11), or unsaved when lm_head is frozen (LoRA, freeze: #5).
    head_hidden = 0
    if ctx.amp and ctx.r == 4:
        head_hidden = T * H * 4 * sl.head
    elif not st.ctx_head.linears_trainable:
        head_hidden = T * H * ctx.r * sl.head
    fwd[C.ACTIVATIONS] = acts + ckpt_buffers + model_saved + ids_fwd + _pick(pick, head_hidden, layer_transient)
    fwd[C.LOGITS] = _pick(pick, fwd_logits, 0)
    fwd[C.TEMPORARIES] = copies + qtemp + layer_flat + _pick(pick, loss_temp_fwd, 0)

    # Backward, three moments: its start (all saved activations + logits gradients); under checkpointing,
    # the last layer recomputed while the checkpointed inputs are still held; its end (nearly all
    # gradients while the first layer's activations — saved or recomputed — are consumed).
    one_layer = (T * largest_layer_saved_per_token(ctx, shape, S) + (st.moe_merged if shape.n_moe_layers else 0)) / sl.tp
    grad_buf = 2 * T * H * ctx.r / (sl.tp if sp else 1)  # gradient of the hidden state flowing back, and its successor
    bwd_layer = 0
    if rl.recipe != "hf" or rl.loss != "full":
        # Without the full-vocabulary logits the peak moves into a layer: under checkpointing, its recompute at
        # the start of its backward (one incoming gradient, not two), where a LoRA MLP projection's forward holds
        # its transients beside what the layer has saved so far; without checkpointing, the last layer's MLP
        # backward beside every saved tensor, about as large (_lora_recompute_per_token)
        widest = vmax(_lora_recompute_per_token(ctx, shape) if s.grad_ckpt else 0, _mlp_backward_per_token(ctx, shape))
        if s.grad_ckpt:
            one_layer = one_layer + T * widest - T * H * ctx.r
        else:
            bwd_layer = T * widest
    early_grads = acc_grads if s.grad_accum > 1 else st.lm_grad * sl.head / _head_tp(st, sl)
    acts = acts + ckpt_buffers  # Unsloth's staging buffers stay for the whole run
    start_total = acts + model_saved_bwd + loss_hidden_bwd + bwd_logits + loss_temp_bwd + acc_grads + copies + \
        layer_flat + (gathered - root) + bwd_layer
    mid_total = (acts + one_layer + grad_buf + early_grads + copies) if s.grad_ckpt else 0
    end_total = grads + grad_buf + one_layer + rs_held + ckpt_buffers
    layer_w = layer_grads = 0
    if sl.fsdp:
        # FSDP2, a layer's backward: its parameters gathered (and, at ZeRO-3, the flat all-gather buffer), its
        # unsharded gradients beside the previous layer's reduce-scatter input, and an untied head's unsharded
        # gradient, which the root reduce-scatters only at the end (docs/trace_findings.md #21).
        layer_w = one_w * (st.cb / 4 if fsdp_master_precision(s) else 1)
        layer_grads = rs_held * ug
        head_ug = st.lm_grad * ug * sl.head / _head_tp(st, sl) if (not shape.tie_embeddings and s.method == "full") else 0
        layer_grads += head_ug
        end_total = grads + grad_buf + one_layer + rs_held + layer_grads + layer_w + layer_flat
    # A trained tied embedding gets two gradients, lm_head's and the embedding's (a dense (V, H) tensor,
    # aten embedding_dense_backward), which autograd sums before AccumulateGrad: at the very end of the
    # backward, the two and their sum are alive beside every other gradient (docs/trace_findings.md #18).
    tied_grad = st.lm_grad * sl.head * sl.embed / _embed_tp(st, sl) if (shape.tie_embeddings and s.method == "full") else 0
    end_acts = one_layer + grad_buf + ckpt_buffers
    end_grads = grads + layer_grads
    layer_moment = 1
    end_logits = 0
    if tied_grad:
        # under FSDP2 the embedding's shard is not written yet, and the sum is the unsharded gradient it reduces
        done = grads - shard(tied_grad, sl.grad_div) if sl.fsdp else grads - tied_grad
        tied_total = done + 3 * tied_grad * ug + grad_buf + rs_held + ckpt_buffers
        tied_wins = tied_total > end_total
        end_total = vmax(end_total, tied_total)
        end_acts = _pick(tied_wins, 3 * tied_grad * ug + grad_buf + ckpt_buffers, end_acts)
        end_grads = _pick(tied_wins, done, end_grads)
        layer_moment = 1 - tied_wins
        if rl.loss_impl == "liger":  # Liger's backward hands back the lm_head gradient its forward made (logits)
            end_logits = _pick(tied_wins, tied_grad * ug, 0)
            end_acts = end_acts - end_logits
    p_start = (start_total >= end_total) * (start_total >= mid_total)
    p_mid = ((mid_total > start_total) * (mid_total >= end_total)) if s.grad_ckpt else 0
    p_end = 1 - p_start - p_mid
    bwd = dict(persistent)
    # ZeRO-2 keeps every layer gathered until its own backward: all of them at its start, one at the end
    bwd[C.WEIGHTS] = persistent[C.WEIGHTS] + (p_start + p_mid) * gathered + p_end * (root + layer_moment * layer_w)
    bwd[C.ACTIVATIONS] = p_start * (acts + model_saved_bwd + loss_hidden_bwd + bwd_layer) + \
        p_mid * (acts + one_layer + grad_buf) + p_end * end_acts
    bwd[C.LOGITS] = p_start * bwd_logits + p_end * end_logits
    bwd[C.GRADIENTS] = p_start * acc_grads + p_mid * early_grads + p_end * (end_grads + rs_held) + bucket
    bwd[C.TEMPORARIES] = (p_start + p_mid) * copies + qtemp + p_start * (layer_flat + loss_temp_bwd) + \
        p_end * layer_moment * layer_flat

    opt = dict(persistent)
    opt[C.GRADIENTS] = grads + bucket
    opt[C.TEMPORARIES] = opt_temp
    opt[C.ACTIVATIONS] = ckpt_buffers
    load = dict(held)
    load[C.GRADIENTS] = bucket  # DDP allocates its buckets when it wraps the model
    return {"load": load, "forward": fwd, "backward": bwd, "optimizer_step": opt}


def _recipe_loss(st, T, B, S):
    """A recipe's loss on one GPU (the recipes are modelled on one): {fwd, bwd: bytes (logits category) at its
    worst forward moment and at the start of the backward; fwd_temp, bwd_temp: temporaries then; bwd_acts: what
    of the hidden states it keeps for, or makes at, the backward's start (activations); keeps_lm_in: whether
    lm_head's input stays saved}.

    fused, Unsloth: torch.compile's graph for a chunk holds the chunk's logits in lm_head's dtype, reuses them
    for their gradient, then the chunk's hidden-state gradient (scripts/check_unsloth_ce_compile.py); the
    forward keeps grad_inputs (and lm_head's gradient) for the backward, which scales them out of place.
    fused, Liger: grad_input zeros, a fp32 loss per row and a bool mask; per chunk its logits (gradient in
    place) and grad_logits @ W; grad_input is what the backward gets.
    chunked, TRL: the hidden states of the valid positions gathered (kept by the chunks' checkpoints) with the
    int64 order and labels; per chunk lm_head cast to fp32 (a temporary), the chunk's fp32 input and logits; in
    the backward the recomputed chunk's logits, log-softmax, exp and entropy product, and the gathered states'
    gradient.
    cut: the fp32 log-sum-exp and the hidden states; the backward's de.
    inplace (Unsloth < 2025.8.6): the logits kept, their gradient written over them, then grad_input."""
    rl = st.rules
    if rl.recipe == "unsloth" and rl.loss_impl == "cce":  # its Cut Cross-Entropy above 1,024 tokens only
        small = T < R.UNSLOTH_CCE_MIN_TOKENS
        cut, inplace = _loss_terms(st, "cce", T, B, S), _loss_terms(st, "unsloth_inplace", T, B, S)
        return {k: _pick(small, inplace[k], cut[k]) for k in cut}
    return _loss_terms(st, rl.loss_impl, T, B, S)


def _loss_terms(st, impl, T, B, S):
    """_recipe_loss for one implementation (keeps_lm_in is 1 or 0)."""
    shape = st.shape
    H, V = shape.hidden, shape.vocab
    hb = st.ctx.b  # the hidden state's dtype
    wb = st.lm_head_elem_bytes
    lb = st.cb if st.ctx.amp else hb  # a chunk's logits: the input dtype (autocast's under amp)
    w_grad = V * H * wb if st.lm_grad else 0  # a trainable lm_head's gradient, made in the forward
    labels = T * 8  # the shifted int64 labels
    out = {"fwd_temp": 0, "bwd_temp": 0, "bwd_acts": 0, "keeps_lm_in": 0}
    if impl == "unsloth":
        n = R.unsloth_ce_chunks(T, V, st.rules.ce_target_bytes)
        c = -(-T // n)
        cast = c * H * wb if hb != wb else 0
        out.update(fwd=labels + T * H * hb + w_grad + c * V * wb + vmax(c * H * wb, w_grad) + cast,
                   bwd=T * H * hb + w_grad, bwd_acts=T * H * hb + w_grad)  # saved, and scaled out of place
    elif impl == "liger":
        c = R.liger_chunk_tokens(T, H, V)
        chunk = c * V * lb + vmax(c * H * lb, (V * H * (lb + 4)) if st.lm_grad else 0)
        out.update(fwd=labels + T * H * hb + w_grad + T * 4 + T + chunk, bwd=T * H * hb + w_grad)
    elif impl == "cce":
        keep = 0 if st.ctx_head.linears_trainable else T * H * hb  # e (the final hidden state), saved
        out.update(fwd=labels + T * 4, bwd=labels + T * 4, keeps_lm_in=1,
                   bwd_acts=keep + T * H * hb + (V * H * wb if st.lm_grad else 0))  # + de (and dc)
    elif impl == "unsloth_inplace":
        out.update(fwd=labels + T * V * wb + 2 * T * 4, bwd=labels + T * V * wb + T * 4, bwd_acts=T * H * hb)
    else:  # chunked (TRL)
        tv = B * (S - 1)
        c = vmax(vmin(R.TRL_CHUNK_TOKENS, tv), 1)
        w32 = V * H * 4 if wb != 4 else 0  # `w.float()`: lm_head's fp32 copy, each chunk
        kept = tv * H * hb + 2 * tv * 8 + tv  # gathered states, order and labels (int64), the valid mask
        # a chunk's forward: its matmul (lm_head's fp32 copy, the fp32 input, the logits) or its entropy (logits,
        # log-softmax, exp and their product), whichever holds more
        matmul = w32 + c * H * 4 + c * V * 4
        entropy = 4 * c * V * 4
        at_matmul = matmul >= entropy
        out.update(fwd=kept + _pick(at_matmul, c * H * 4 + c * V * 4, entropy), fwd_temp=_pick(at_matmul, w32, 0),
                   bwd=kept + 4 * c * V * 4, bwd_temp=w32, bwd_acts=tv * H * hb)
    return out


def _mlp_backward_per_token(ctx, shape):
    """Per token, the widest moment of a gated MLP's backward beyond the saved tensors: the product's gradient and
    the two it makes (3 × intermediate); Liger's SiLU·mul and Unsloth's LoRA_MLP write those into their saved
    inputs (one intermediate-wide tensor); a LoRA down_proj with adapters in another dtype first holds the
    gradient of its input cast and its cast back (the base's gradient is then added in place).
    Dense Llama-style layers; 0 elsewhere."""
    if shape.family != "llama":
        return 0
    I, b, lx = shape.intermediate, ctx.b, ctx.lora_x_bytes
    if ctx.fused_lora and all(m in ctx.lora for m in ("gate_proj", "up_proj", "down_proj")):
        return I * b
    product = (1 if ctx.swiglu_kernel else 3) * I * b
    down = (lx + b) * I if ("down_proj" in ctx.lora and ctx.lora_input_copied) else 0
    return max(product, down)


def _lora_recompute_per_token(ctx, shape):
    """Per token, what a LoRA MLP adds inside its forward beyond the layer's saved tensors, at its widest
    projection (up_proj: gate's output is saved, down_proj has not run): peft's LoRA Linear holds the base
    output, the scaled LoRA output and their sum (promoted to the adapters' dtype), less what down_proj will
    save (its input cast, or the product itself); Unsloth's LoRA_MLP holds silu(e)·g. Dense Llama-style
    layers; 0 elsewhere or without adapters on the MLP.
    Source: peft tuners/lora/layer.py Linear.forward (result + lora_B(lora_A(x)) * scaling, then the cast back);
    traced (harness/workload/recipes.py)."""
    if shape.family != "llama" or "up_proj" not in ctx.lora:
        return 0
    I, b, lx = shape.intermediate, ctx.b, ctx.lora_x_bytes
    if ctx.fused_lora and all(m in ctx.lora for m in ("gate_proj", "down_proj")):
        return I * b
    down_saved = 0
    if "down_proj" in ctx.lora:
        down_saved = I * lx if ctx.lora_input_copied else I * b
    return I * (b + lx + max(b, lx)) - down_saved


def _offloaded_acts(st, T, S):
    """(kept on the GPU between forward and backward, Unsloth's staging buffers) under its offloaded checkpointing.

    From the second step on, the last layer's input stays on the GPU; the others are in pinned host RAM (unless
    one input is not above 2 MiB: then all stay, as with plain reentrant checkpointing). The buffers: one of
    max(2·256·2048 elements, a layer input), and since 2026.5 a second one as large from the second step on.
    Source: unsloth-zoo gradient_checkpointing.py lines 56-58, 605-700, 705-900."""
    shape, ctx, rl = st.shape, st.ctx, st.rules
    H, L = shape.hidden, shape.n_layers
    per_layer = T * H * ctx.r + (S * ctx.b if ctx.attn == "eager" else 0)
    off = R.unsloth_offloaded_layers(T, H, ctx.r, L)
    kept = L - off
    if st.spec.method != "full":
        # a frozen embedding's output is made to require grad (enable_input_require_grads): a leaf, which the
        # autograd graph's AccumulateGrad node holds until the backward, offloaded copy or not
        kept = kept + (off > 0)
    buf = vmax(R.UNSLOTH_GPU_BUFFER_ELEMENTS, T * H) * st.cb
    buffers = buf + (buf if rl.double_buffer else 0)
    return kept * per_layer, buffers


def host_ram_bytes(st, batch, seq):
    """Host RAM a recipe keeps activations in (Unsloth's pinned offload buffers), 0 where none."""
    s = st.spec
    if s.mode != "train" or not s.grad_ckpt or st.rules.ckpt_mode != "offload":
        return 0
    host = R.unsloth_host_bytes(batch * seq, st.shape.hidden, st.ctx.r, st.shape.n_layers)
    return _pick(seq < R.UNSLOTH_OFFLOAD_MIN_SEQ, 0, host)


def paged_bytes(st, phase_bd):
    """Optimizer state in CUDA unified memory: on the device, but not in the caching allocator."""
    return phase_bd.get(C.OPTIMIZER_STATES, 0) if st.opt_paged else 0


def allocated_bytes(st, phase_bd):
    """Bytes the caching allocator holds in a phase: its tensor categories and workspaces less paged optimizer state."""
    return sum(phase_bd.values()) - paged_bytes(st, phase_bd)


@lru_cache(maxsize=1024)
def _load_slack(model, stored, compute_dtype, double_quant, group_size, expandable):
    from .allocator import parse_alloc_conf
    from .overhead import load_slack_bytes

    config = parse_alloc_conf("expandable_segments:True") if expandable else None
    return load_slack_bytes(get_shape(model), stored, compute_dtype, double_quant, group_size, config)


def load_slack(st, overheads):
    """Reserved − allocated the loaded weights leave (formulas.overhead.load_slack_bytes), on this spec's GPUs."""
    s = st.spec
    stored = s.dtype if not (s.mode == "train" and s.precision == "amp" and s.method == "full") else "fp32"
    whole = _load_slack(s.model, stored, s.compute_dtype, s.double_quant, s.group_size, overheads.expandable)
    return whole // _weight_ways(s)


def _weight_ways(spec):
    """Over how many GPUs one copy of the weights is split: inference splits it over all of them (tensor parallel
    or layers); training over tensor × pipeline parallelism and, under ZeRO-3 / FSDP, the sharding group
    (hybrid sharding: --shard-gpus), while data-parallel replicas each hold their whole share."""
    if spec.mode != "train":
        return spec.gpus
    return spec.tp * spec.pp * (shard_world(spec) if spec.zero == 3 else 1)


def reserved_bytes(st, phase, phase_bd, allocated, overheads, batch=1, seq=1):
    """What the caching allocator has reserved at a phase's peak: `allocated` plus the slack rule's figure. The math
    kernel's score matrices (prefill) are left out of the transient bytes the rule scales: every layer allocates
    them again at the same sizes, so their cached blocks are reused, not left over (the H200's fp32 prefills)."""
    transient = overheads.transient(phase_bd)
    if phase == "prefill" and st.spec.mode == "inference" and _sdpa_math(st, sdpa_repeats_kv(st.spec), overheads.cc):
        shape = st.shape
        scores = batch * shape.n_heads * seq * seq * 2 * st.cb + sdpa_math_mask_bytes(seq, st.cb)
        transient = vmax(transient - scores, 0)
    return allocated + overheads.slack(st.spec, phase, transient, load_slack(st, overheads))


def device_totals(st, peak_bd, allocated, reserved_max, overheads, loaded=()):
    """(device categories, peak device bytes): the CUDA context outside the allocator and, as allocator slack, what
    the largest reservation (with paged optimizer state, which counts on the device) adds to the allocated peak.
    `loaded`: kernel-image families an earlier workload of the process loaded (formulas.device.KERNEL_IMAGES)."""
    ctx = overheads.context(st.spec, loaded)
    device = ctx + reserved_max
    return {C.CUDA_CONTEXT: ctx, C.ALLOCATOR_SLACK: device - ctx - allocated - paged_bytes(st, peak_bd)}, device


def _slice_phases(st, sl, B, S, N, overheads):
    raw = _phases_inference(st, sl, B, S, N, overheads.cc) if st.spec.mode == "inference" else \
        _phases_train(st, sl, B, S, N)
    out = {}
    for phase, bd in raw.items():
        full = {c: 0 for c in C.ALLOCATED_CATEGORIES}
        full.update(bd)
        full[C.WORKSPACES] = overheads.workspaces(st.spec, phase, st.biased)
        out[phase] = {c: to_int(v) for c, v in full.items()}
    return out


def per_gpu_phases(st, batch, seq, gen, overheads=DEFAULT_OVERHEADS):
    """[{phase: {allocated category: bytes}}], one per distinct GPU of the spec's layout (numbers or numpy arrays)."""
    return [_slice_phases(st, sl, batch, seq, gen, overheads) for sl in _slices(st)]


def _notes(st, spec=None):
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
    if shape.remote_code:
        notes[:0] = remote_code.notes(s, shape)
    if s.dtype in ("int8", "nf4", "fp4") and shape.is_moe:
        if behaviour(s, "experts") == "fused":
            notes.append("bitsandbytes via transformers quantizes nn.Linear only: transformers ≥ 5 fuses the MoE experts into "
                         "3-D tensors, which stay in the compute dtype" + (" (fp32 after kbit prep)" if kbit_prepared(s) else "")
                         + "; transformers 4.x (--transformers 4.57) kept nn.Linear experts, quantized")
        else:
            notes.append("transformers 4.x builds each MoE expert as nn.Linear: bitsandbytes quantizes every expert")
    notes.extend(stack_notes(s, shape))
    if s.mode == "train":
        notes.extend(R.describe(st.rules, spec or s))
    if s.gpus > 1:
        extra = "".join((f", cp={s.cp}" if s.cp > 1 else "", f", ep={s.ep}" if s.ep > 1 else "",
                         ", sequence parallel" if s.sequence_parallel else "", ", layer split" if s.layer_split else "",
                         f", offload {s.offload}" if s.offload != "none" else ""))
        notes.append(f"per-GPU figures for {s.gpus} GPUs (tp={s.tp}, pp={s.pp}, zero={s.zero}{extra})")
        if fsdp_offload(s):
            notes.append("FSDP CPU offload: parameter shards, gradient shards, optimizer state and the optimizer step "
                         "on the CPU; the GPU holds the layers being gathered")
    if s.mode == "train" and s.grad_ckpt and s.ckpt_every > 1:
        notes.append(f"checkpointing every {s.ckpt_every}th layer ({st.shape.n_layers // s.ckpt_every} of "
                     f"{st.shape.n_layers}: torchtitan's selective layer AC); the others save everything")
    return notes


def predict(spec, overheads=DEFAULT_OVERHEADS, checkpoint=None):
    """Predict the per-GPU memory of one workload. Raises SpecError / UnknownModelError on bad input.

    `checkpoint`: the model's stored weights (formulas.checkpoint.StoredWeights, from its safetensors
    headers), used in place of the formula's weights where they apply (`checkpoint_applies`)."""
    shape = get_shape(spec.model)
    spec = validate(spec, shape)
    st = workload_static(spec, checkpoint)
    notes = _notes(st, spec)
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
    for phases in per_gpu_phases(st, spec.batch, spec.seq, spec.gen, overheads):
        if spec.mode == "inference" and spec.gen == 0:
            phases = {k: v for k, v in phases.items() if k != "decode"}
        res = 0  # this GPU's largest reservation: reserved memory only grows (no empty_cache in the workload)
        for phase, bd in phases.items():
            alloc = allocated_bytes(st, bd)
            res = max(res, reserved_bytes(st, phase, bd, alloc, overheads, spec.batch, spec.seq) + paged_bytes(st, bd))
        for phase, bd in phases.items():
            alloc = allocated_bytes(st, bd)
            if best is None or alloc > best[0]:
                best = (alloc, phase, bd, phases, res)
    alloc, phase, bd, phases, res = best
    device_bd, device = device_totals(st, bd, alloc, res, overheads)
    return Prediction(
        spec=spec, model=shape.name, n_params=shape.n_params, breakdown={**bd, **device_bd},
        peak_allocated_bytes=alloc, peak_device_bytes=device, peak_phase=phase, phases=phases,
        notes=notes, overheads_source=overheads.source, calibrated=overheads.calibrated, weights_source=source,
        peak_reserved_bytes=res, host_ram_bytes=to_int(host_ram_bytes(st, spec.batch, spec.seq)),
    )
