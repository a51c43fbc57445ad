"""Activation memory: tensors saved for backward (training) and the forward working set (inference).

Derived the way Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", §4) count saved tensors, but op by op over the Hugging Face modules
rather than Megatron's, and with autograd's rule that an op saves an input only when the
*other* operand needs a gradient (tools/autograd/derivatives.yaml): `q * cos` saves `cos`
only, a frozen nn.Linear saves nothing of its input. That rule is what makes LoRA's
activations smaller than full fine-tuning's.

All functions return bytes per token (and per layer where named so); callers multiply
by batch × sequence. Sequence lengths may be numpy arrays: only + - * // and abs are used.
Source of each term: the forward of transformers/models/<family>/modeling_<family>.py (v5).
"""

from dataclasses import dataclass, field

from .elementwise import vmax


@dataclass(frozen=True)
class ActContext:
    """What decides which tensors a training forward saves."""

    b: int  # bytes of matmul outputs (compute dtype: 2 under bf16/fp16 or autocast, 4 in fp32)
    r: int  # bytes of the residual stream (4 under autocast: embeddings and norms stay fp32)
    amp: bool  # autocast: every trainable-linear input is cast to the compute dtype (a new tensor)
    attn: str  # sdpa | eager
    linears_trainable: bool  # base linear weights need grad (full / freeze) or not (LoRA / QLoRA)
    norms_trainable: bool  # norm weights need grad
    int8_linears: bool = False  # bitsandbytes int8 layers: they save their input for backward, trainable or not
    lora: dict = field(default_factory=dict)  # target module → (in_features, out_features)
    lora_rank: int = 0
    lora_x_bytes: int = 0  # bytes of lora_A's input and output (the adapter dtype)
    lora_input_copied: bool = True  # peft casts lora_A's input to the adapter dtype (a new tensor per module)
    # unless it already has it (kbit prep's fp32 stream, bf16 adapters over bf16): then lora_A saves the
    # very tensor the base module reads, once for all modules that read it
    dropout: bool = True  # training-mode dropout with the config's probabilities
    # bitsandbytes < 0.43.2: 4-bit layers keep their input (cast to the compute dtype) on ctx: its bytes, 0 = not
    bnb4_input_bytes: int = 0
    bnb4_input_copied: bool = False  # the stream is not in the compute dtype: each 4-bit linear casts its own copy
    experts_linear: bool = False  # transformers 4.x: MoE experts are nn.Linear (quantized like the rest)
    reentrant: bool = False  # reentrant checkpointing: inputs held on ctx are dropped outside the recomputed layer
    moe_param_lora: bool = False  # peft ≥ 0.20 LoRA on fused expert parameters: the experts' weight needs grad
    repeat_kv: bool = False  # SDPA on K/V copied to every query head (transformers < 4.54 or torch < 2.5)
    sdpa_math: bool = False  # SDPA runs its math kernel (formulas.device.sdpa_backend: fp32 with grouped K/V heads)
    # Fine-tuning recipes' kernels (formulas/recipes.py), on dense Llama-style layers:
    norm_kernel: bool = False  # Liger / Unsloth RMSNorm: saves its input (as it comes) and a fp32 rstd per row
    swiglu_kernel: bool = False  # Liger SiLU·mul: saves gate and up, recomputes silu(gate) in backward
    fused_lora: bool = False  # Unsloth LoRA_QKV / LoRA_W / LoRA_MLP: the module input (and gate, up) only


def _inputs_saved(ctx):
    """Whether the base linears keep their inputs for backward: trainable ones do (weight gradient), and
    bitsandbytes' MatMul8bitLt keeps A whenever A needs a gradient (autograd/_functions.py)."""
    return ctx.linears_trainable or ctx.int8_linears


def _lora_saved(ctx, module, in_features):
    """Saved by one LoRA-adapted module: the input cast to the adapter dtype (when peft casts it) and
    lora_A's output. An input that is not cast is counted once per tensor by `_lora_shared_input`."""
    if module not in ctx.lora:
        return 0
    return (in_features * ctx.lora_x_bytes if ctx.lora_input_copied else 0) + ctx.lora_rank * ctx.lora_x_bytes


def _lora_shared_input(ctx, modules, elements, saved_already=False):
    """Bytes of one input tensor several LoRA modules read uncast (`elements` per token at the activation
    dtype): lora_A saves it for its weight gradient unless something else saves it already."""
    if ctx.lora_input_copied or saved_already or not any(m in ctx.lora for m in modules):
        return 0
    return elements * ctx.b


def _linear_input(ctx, in_features, count=1):
    """Bytes a trainable linear saves of its input; under autocast each linear casts its own copy."""
    if not ctx.linears_trainable:
        return 0
    return in_features * ctx.b * count if ctx.amp else 0


def _rms_norm(ctx, dim, in_bytes, shape=None):
    """LlamaRMSNorm: saves the fp32 input (a new tensor unless already fp32), rsqrt, and x·rsqrt cast
    back to the input dtype when the norm weight trains; its output is counted by its consumers.
    A general-inventory shape with 2-byte activations uses what its own norm module saved on fake
    tensors (`shape.norm_saved`: Gemma's norms keep x·rsqrt in fp32 for the weight gradient)."""
    if ctx.norm_kernel:
        # Liger ops/rms_norm.py line 657 `save_for_backward(X, W, RSTD)`, RSTD fp32 per row (line 452); Unsloth
        # kernels/rms_layernorm.py line 205 `save_for_backward(X, W, r)`: the input as it is, trainable or not
        return dim * in_bytes + 4
    if shape is not None and shape.norm_saved and in_bytes == 2:
        return int(dim * shape.norm_saved[0 if ctx.norms_trainable else 1])
    saved = 4 * dim + 4
    if ctx.norms_trainable:
        saved += in_bytes * dim
    return saved


def _sdpa_saved(ctx, n_q, n_kv, qk_dim, v_dim, seq, q_is_fresh=False, shape=None):
    """Saved by attention: q, k, v as the kernel sees them, its output, and the o_proj input copy."""
    b = ctx.b
    out = n_q * v_dim * b  # kernel output (B, nH, S, dv)
    # transpose(1, 2).contiguous() that o_proj reads, saved when o_proj trains. Flash / efficient
    # kernels lay their output out like q: for q = q_proj(x).view(B, S, H, D).transpose(1, 2) that is
    # (B, S, H, D) in memory and .contiguous() is a view; eager's matmul output and MLA's cat-built q
    # are (B, H, S, D), so there it is a real copy (docs/trace_findings.md #6).
    copies = ctx.attn == "eager" or q_is_fresh or (ctx.sdpa_math and ctx.attn == "sdpa")
    contiguous = n_q * v_dim * b if _inputs_saved(ctx) and copies else 0
    if ctx.sdpa_math and ctx.attn == "sdpa":
        # _scaled_dot_product_attention_math: matmul(q·s, (k_rep·s)^T) saves the scaled q and the scaled, repeated
        # k; softmax saves its output, which matmul(attn, v_rep) saves too, with v_rep (attention.cpp; the tracer
        # runs this composite kernel)
        return 2 * n_q * qk_dim * b + n_q * seq * b + n_q * v_dim * b + contiguous
    if ctx.attn == "eager":
        # matmul(q, k_rep^T) saves q and the repeat_kv copies; softmax(fp32) saves its output;
        # matmul(probs_bf16, v_rep) saves probs and v_rep (transformers eager_attention_forward).
        probs = _softmax_probs(ctx, n_q * seq)
        if shape is not None and shape.eager_per_score and b == 2:  # what this model's eager code saves per score
            probs = n_q * seq * shape.eager_per_score[1 if ctx.linears_trainable else 2]  # seq may be an array
        return n_q * qk_dim * b + n_q * qk_dim * b + n_q * v_dim * b + probs + contiguous
    # Memory-efficient / flash kernels save q, k, v (native GQA, no repeat), out and fp32 logsumexp.
    scores = 0
    if shape is not None and shape.sdpa_per_score and b == 2:  # SDPA left with the math kernel (read off the model)
        scores = n_q * seq * shape.sdpa_per_score[1 if ctx.linears_trainable else 2]
    if ctx.repeat_kv:  # repeat_kv's copies are what the kernel sees, and saves
        n_kv = n_q
    return n_q * qk_dim * b + n_kv * qk_dim * b + n_kv * v_dim * b + out + 4 * n_q + contiguous + scores


def _gated_mlp_saved(ctx, H, inter):
    """SwiGLU MLP: silu saves gate, act*up saves both, down_proj saves the product if it trains."""
    b = ctx.b
    if ctx.fused_lora and all(m in ctx.lora for m in ("gate_proj", "up_proj", "down_proj")):
        # Unsloth LoRA_MLP (kernels/fast_lora.py line 110): `save_for_backward(…, X, e, g)`, silu(e)·g recomputed
        return H * b + 2 * inter * b
    saved = (2 if ctx.swiglu_kernel else 3) * inter * b  # gate (silu input), act, up; Liger's kernel: gate and up
    if _inputs_saved(ctx):
        saved += inter * b  # down_proj input
    saved += _linear_input(ctx, H, 2)  # gate/up casts under autocast
    saved += _lora_saved(ctx, "gate_proj", H) + _lora_saved(ctx, "up_proj", H) + _lora_saved(ctx, "down_proj", inter)
    saved += _lora_shared_input(ctx, ("gate_proj", "up_proj"), H, saved_already=_inputs_saved(ctx))  # post-attn norm out
    saved += _lora_shared_input(ctx, ("down_proj",), inter, saved_already=_inputs_saved(ctx))  # act * up
    return saved


def _has_bias(shape, module):
    """Whether the model's `module` linears have a bias (Unsloth fuses only bias-free LoRA projections)."""
    return any(t.kind == "bias" and t.module == module for t in shape.tensors)


def _llama_attention_saved(ctx, shape, seq):
    H, hd, nH, nKV = shape.hidden, shape.head_dim, shape.n_heads, shape.n_kv_heads
    saved = _sdpa_saved(ctx, nH, nKV, hd, hd, seq, shape=shape if shape.family == "generic" else None)
    saved += _linear_input(ctx, H, 3) + _linear_input(ctx, nH * hd)
    if shape.qk_norm:  # Qwen3 q_norm / k_norm on the projections, before RoPE
        saved += _rms_norm(ctx, nH * hd, ctx.b, shape) + _rms_norm(ctx, nKV * hd, ctx.b, shape)
    fused_qkv = ctx.fused_lora and not _has_bias(shape, "q_proj") and all(m in ctx.lora for m in ("q_proj", "k_proj", "v_proj"))
    fused_o = ctx.fused_lora and "o_proj" in ctx.lora
    for m, fin in (("q_proj", H), ("k_proj", H), ("v_proj", H), ("o_proj", nH * hd)):
        if not ((fused_qkv and m != "o_proj") or (fused_o and m == "o_proj")):
            saved += _lora_saved(ctx, m, fin)
    if fused_qkv:  # Unsloth LoRA_QKV (kernels/fast_lora.py line 418): the normed input, once
        saved += H * ctx.b
    else:
        saved += _lora_shared_input(ctx, ("q_proj", "k_proj", "v_proj"), H, saved_already=_inputs_saved(ctx))
    # o_proj reads the kernel output through a view (flash / efficient layout), already saved; eager (and SDPA's
    # math kernel) copies it. Unsloth's LoRA_W (line 612) saves that same input.
    copied = ctx.attn == "eager" or ctx.sdpa_math
    if fused_o:
        saved += nH * hd * ctx.b if copied and not _inputs_saved(ctx) else 0
    else:
        saved += _lora_shared_input(ctx, ("o_proj",), nH * hd, saved_already=not copied or _inputs_saved(ctx))
    return saved


def _mla_attention_saved(ctx, shape, seq):
    H, nH = shape.hidden, shape.n_heads
    qr, kvr, rope, nope, vd = shape.q_lora_rank, shape.kv_lora_rank, shape.qk_rope_head_dim, shape.qk_nope_head_dim, shape.v_head_dim
    qk = rope + nope
    b = ctx.b
    saved = 0
    if qr:
        saved += _rms_norm(ctx, qr, b) + (qr * b if _inputs_saved(ctx) else 0)  # q_a_layernorm, q_b_proj input
        saved += _linear_input(ctx, H) + _lora_saved(ctx, "q_a_proj", H) + _lora_saved(ctx, "q_b_proj", qr)
    else:
        saved += _linear_input(ctx, H) + _lora_saved(ctx, "q_proj", H)
    saved += _rms_norm(ctx, kvr, b) + (kvr * b if _inputs_saved(ctx) else 0)  # kv_a_layernorm, kv_b_proj input
    saved += _linear_input(ctx, H) + _lora_saved(ctx, "kv_a_proj_with_mqa", H) + _lora_saved(ctx, "kv_b_proj", kvr)
    # q and k are rebuilt by torch.cat(pass, rot) per head: full-size (nH, qk) copies go to SDPA.
    saved += _sdpa_saved(ctx, nH, nH, qk, vd, seq, q_is_fresh=True)
    saved += _linear_input(ctx, nH * vd) + _lora_saved(ctx, "o_proj", nH * vd)
    return saved


def _moe_saved(ctx, shape):
    """Routed experts (transformers v5 fused experts loop) + router + shared expert, per token."""
    H, b, k = shape.hidden, ctx.b, shape.experts_per_token
    I = shape.moe_intermediate
    # Router scores (E). DeepSeek's router runs F.linear on hidden.float(), saving that fp32 copy when it
    # trains; Mixtral's and Qwen's run in the compute dtype on the input the experts gather anyway (#13).
    saved = (4 * H if ctx.linears_trainable and shape.is_mla else 0) + 4 * shape.n_experts
    # Per routed copy: gathered input (if experts train), gate_up output (kept alive by the chunk views
    # silu and mul save), act, product (down input, if experts train), down output (saved by the weighting).
    per_copy = 2 * I * b + I * b + H * b
    if ctx.linears_trainable or ctx.moe_param_lora:  # the experts' weight needs grad: their inputs are saved
        per_copy += H * b + I * b
    if ctx.experts_linear:  # transformers 4.x: every expert an nn.Linear, which LoRA (all-linear) adapts
        gate, up, down = ("w1", "w3", "w2") if shape.model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        adapted = [m for m in (gate, up, down) if m in ctx.lora or f"experts.{m}" in ctx.lora]
        if adapted:
            lx, r = ctx.lora_x_bytes, ctx.lora_rank
            if ctx.lora_input_copied:  # each adapter casts its own copy: the gathered rows (gate, up), the product (down)
                per_copy += sum(H * lx for m in adapted if m != down) + (I * lx if down in adapted else 0)
            else:  # lora_A saves the very tensors: the gathered rows once, the product
                per_copy += (H * b if any(m != down for m in adapted) else 0) + (I * b if down in adapted else 0)
            per_copy += len(adapted) * r * lx
    saved += k * per_copy
    if shape.shared_intermediate:
        saved += _gated_mlp_saved(ctx, H, shape.shared_intermediate)
        if shape.model_type == "qwen2_moe":
            saved += H * b + 4  # sigmoid(shared_expert_gate(x)) * shared_out saves both
    return saved


def _layer_norm_saved(ctx, dim):
    """nn.LayerNorm saves its input plus fp32 mean and rstd per token."""
    return dim * ctx.r + 8


def _softmax_probs(ctx, scores):
    """An eager softmax in fp32 saves its output, and the cast back to the activations' dtype saves a copy
    (none when they are fp32 already: `.to(torch.float32)` of an fp32 tensor is the tensor itself)."""
    return scores * 4 + (scores * ctx.b if ctx.b != 4 else 0)


def _dropout_mask(ctx, p, elements):
    """A fused CUDA dropout saves a bool mask per element when p > 0 in training."""
    return elements if (ctx.dropout and p > 0) else 0


def layer_saved_per_token(ctx, shape, seq, moe_layer=False):
    """Bytes one decoder layer saves for backward, per token (seq matters only for eager attention)."""
    H, I, b, r = shape.hidden, shape.intermediate, ctx.b, ctx.r
    fam = shape.family
    if fam in ("llama", "moe", "mla", "generic"):  # generic: the Llama-style rule on the inventory's sizes
        saved = shape.norms_per_layer * _rms_norm(ctx, H, r, shape)  # input_layernorm, post_attention_layernorm, …
        if _inputs_saved(ctx) and not ctx.amp:
            saved += 2 * H * b  # norm outputs, read by the q/k/v and gate/up projections
        attn = _mla_attention_saved(ctx, shape, seq) if fam == "mla" else _llama_attention_saved(ctx, shape, seq)
        mlp = _moe_saved(ctx, shape) if moe_layer else _gated_mlp_saved(ctx, H, I)
        return saved + attn + mlp + _bnb4_inputs_per_token(ctx, shape, moe_layer)
    nH, hd = shape.n_heads, shape.head_dim
    drop_attn = _dropout_mask(ctx, shape.attn_dropout, nH * seq) if ctx.attn == "eager" else 0
    if fam == "gpt2" or fam == "gpt_bigcode":
        kv = 2 * (shape.n_kv_heads * hd)
        qkv = (H + kv) * b  # c_attn output; q, k, v are views of it
        attn = qkv + H * b + 4 * nH  # kernel out, lse (merging heads is a view: #6)
        if ctx.attn == "eager":
            # softmax saves its output; with attention dropout, the mask and the dropped-out copy (saved by
            # the matmul) too. GPT-2 keeps the softmax in the compute dtype; GPTBigCode upcasts to fp32.
            dropped = ctx.dropout and shape.attn_dropout > 0
            probs = (nH * seq * b if fam == "gpt2" else _softmax_probs(ctx, nH * seq)) + (nH * seq * b if dropped else 0)
            attn = qkv + probs + drop_attn + H * b + H * b
        # gelu_new (gpt2) is a Python formula that saves x, tanh(.), 0.5x and 1+tanh; gelu_pytorch_tanh saves x.
        act = 4 * I * b if fam == "gpt2" else I * b
        saved = 2 * _layer_norm_saved(ctx, H) + 2 * H * b + attn + I * b + act + I * b
        saved += 2 * _dropout_mask(ctx, shape.resid_dropout, H)
        saved += _lora_saved(ctx, "c_attn", H) + _lora_saved(ctx, "c_fc", H)
        return saved
    if fam == "opt":
        attn = 3 * H * b + H * b + 4 * nH
        if ctx.attn == "eager":
            attn = 3 * H * b + _softmax_probs(ctx, nH * seq) + drop_attn + H * b + H * b
        saved = 2 * _layer_norm_saved(ctx, H) + 2 * H * b + attn + I * b + I * b  # fc1 out → relu saves its output = fc2 input
        saved += 2 * _dropout_mask(ctx, shape.resid_dropout, H)
        for m, fin in (("q_proj", H), ("k_proj", H), ("v_proj", H), ("out_proj", H), ("fc1", H), ("fc2", I)):
            saved += _lora_saved(ctx, m, fin)
        return saved
    if fam == "gpt_neox":
        # Parallel residual: both norms read the same input (saved once); q and k are rebuilt by the
        # partial-rotary cat, v stays a view of the fused qkv output, which therefore stays alive.
        attn = 3 * H * b + 2 * H * b + H * b + 4 * nH + H * b
        if ctx.attn == "eager":
            attn = 3 * H * b + 2 * H * b + _softmax_probs(ctx, nH * seq) + drop_attn + H * b + H * b
        saved = H * ctx.r + 16 + 2 * H * b + attn + I * b + I * b
        saved += _lora_saved(ctx, "query_key_value", H) + _lora_saved(ctx, "dense_h_to_4h", H)
        return saved
    raise ValueError(f"no activation model for family {fam!r}")


def _padded(seq, chunk):
    """Tokens a chunked scan runs over: the sequence padded to whole chunks."""
    return (seq + chunk - 1) // chunk * chunk if chunk else seq


def _probe_bytes(ctx, per_token, per_seq, seq, chunk=0):
    """Per-token bytes of a probed line (measured at bf16: 2-byte activations), at the context's width."""
    scale = ctx.b // 2 if ctx.b > 2 else 1
    return (per_token * _padded(seq, chunk) // seq + per_seq // seq) * scale


def state_layer_saved_per_token(ctx, group, seq):
    """Saved bytes per token of one probed state layer (linear attention / SSM, with its feed-forward)."""
    p = group.probe
    if ctx.linears_trainable:
        return _probe_bytes(ctx, p[3], p[4], seq, p[9])
    return _probe_bytes(ctx, p[6], p[7], seq, p[9])


def state_layers_fixed_bytes(ctx_b, shape, what):
    """Bytes the probed state layers need whatever the batch and length (per layer: casts of their own
    parameters and the like); what: ws | saved | frozen."""
    i = {"ws": 2, "saved": 5, "frozen": 8}[what]
    scale = ctx_b // 2 if ctx_b > 2 else 1
    return sum(g.count * g.probe[i] * scale for g in _state_groups(shape)) if what != "ws" else \
        max((g.probe[i] * scale for g in _state_groups(shape)), default=0)


def _rule_layers(shape):
    """(dense, MoE) counts of the layers the per-op rule covers (all but probed state layers)."""
    if not shape.n_state_layers:
        return shape.n_dense_layers, shape.n_moe_layers
    moe = shape.n_moe_layers - shape.n_state_moe_layers
    return shape.n_layers - shape.n_state_layers - moe, moe


def _state_groups(shape):
    """Cache groups whose layers' activations were probed (states, hybrids, cache-less blocks)."""
    return [g for g in shape.cache_groups if g.probe]


def layers_saved_per_token(ctx, shape, seq):
    """Saved bytes per token over all decoder layers (dense and MoE layers counted apart; state layers of a
    general inventory by their probe)."""
    n_dense, n_moe = _rule_layers(shape)
    dense = n_dense * layer_saved_per_token(ctx, shape, seq, False) if n_dense else 0
    moe = n_moe * layer_saved_per_token(ctx, shape, seq, True) if n_moe else 0
    state = sum(g.count * state_layer_saved_per_token(ctx, g, seq) for g in _state_groups(shape))
    return dense + moe + state


def largest_layer_saved_per_token(ctx, shape, seq):
    """Saved bytes per token of the most expensive single layer (what checkpointing recomputes at once)."""
    n_dense, n_moe = _rule_layers(shape)
    if n_moe and n_dense:
        most = vmax(layer_saved_per_token(ctx, shape, seq, False), layer_saved_per_token(ctx, shape, seq, True))
    else:
        most = layer_saved_per_token(ctx, shape, seq, n_moe > 0)
    for g in _state_groups(shape):
        most = vmax(most, state_layer_saved_per_token(ctx, g, seq))
    return most


def model_saved_per_token(ctx, shape):
    """Saved outside the layers: final norm, lm_head input, RoPE cos/sin, embedding dropout."""
    H, b, r = shape.hidden, ctx.b, ctx.r
    if shape.norm == "rms":
        saved = _rms_norm(ctx, H, r, shape)
    else:
        saved = _layer_norm_saved(ctx, H)
    if ctx.linears_trainable:
        saved += H * (b if ctx.amp else r)  # lm_head input (the final-norm output; cast under autocast)
        saved += 8  # int64 input ids, saved by the embedding's backward
    saved += _dropout_mask(ctx, shape.embd_dropout, H)
    return saved  # RoPE cos/sin are per position: forward_extras_per_position


def _int8_inputs_per_token(ctx, shape, moe_layer=False):
    """What a layer's bitsandbytes int8 linears keep of their inputs, per token: MatMul8bitLt holds A as a
    plain ctx attribute, outside autograd's saved-tensor hooks, so checkpointing does not free it.
    Inputs several linears share (q/k/v, gate/up) are one tensor."""
    if not ctx.int8_linears or shape.family not in ("llama", "moe", "mla", "generic"):
        return 0
    H, b = shape.hidden, ctx.b
    if shape.family == "mla":
        attn = H + (shape.q_lora_rank or 0) + shape.kv_lora_rank + shape.n_heads * shape.v_head_dim
    else:
        attn = H + shape.n_heads * shape.head_dim
    if moe_layer:  # experts are fused 3-D parameters bitsandbytes leaves alone; the router and shared expert are linears
        mlp = H + (shape.shared_intermediate if shape.shared_intermediate else 0)
    else:
        mlp = H + shape.intermediate
    return (attn + mlp) * b


def _bnb4_inputs_per_token(ctx, shape, moe_layer=False):
    """What a layer's bitsandbytes 4-bit linears keep of their inputs before bitsandbytes 0.43.2, per token:
    MatMul4Bit stored A (the input Linear4bit cast to the compute dtype) as `ctx.tensors`, outside autograd's
    saved-tensor hooks. Where the stream already has the compute dtype the cast is the same tensor, one per
    input several linears read; where it does not (fp32 after kbit prep) every linear holds its own copy."""
    if not ctx.bnb4_input_bytes or shape.family not in ("llama", "moe", "mla", "generic"):
        return 0
    H = shape.hidden
    nq = shape.n_heads * shape.head_dim
    if shape.family == "mla":
        q_in = H + (shape.q_lora_rank or 0)
        attn_copied = q_in + H + shape.kv_lora_rank + shape.n_heads * shape.v_head_dim
        attn_shared = attn_copied
    else:
        attn_copied = 3 * H + nq  # q, k, v each cast the normed input; o_proj its own
        attn_shared = H + nq
    if moe_layer:
        k = shape.experts_per_token
        mlp_copied = H  # the router (nn.Linear in 4.x)
        mlp_shared = H
        if ctx.experts_linear:  # every routed token enters k experts' w1, w3 (and w2 with the product)
            mlp_copied += k * (2 * H + shape.moe_intermediate)
            mlp_shared += k * (H + shape.moe_intermediate)
        if shape.shared_intermediate:
            mlp_copied += 2 * H + shape.shared_intermediate
            mlp_shared += H + shape.shared_intermediate
    else:
        mlp_copied = 2 * H + shape.intermediate
        mlp_shared = H + shape.intermediate
    elems = attn_copied + mlp_copied if ctx.bnb4_input_copied else attn_shared + mlp_shared
    return elems * ctx.bnb4_input_bytes


def ckpt_saved_per_token(ctx, shape, seq=0):
    """With gradient checkpointing each layer keeps only its input hidden state (and, with eager
    attention, the additive mask it was called with, once for all layers: #5) — and what bitsandbytes
    int8 linears hold outside autograd's hooks (`_int8_inputs_per_token`; 4-bit ones before bitsandbytes 0.43.2,
    `_bnb4_inputs_per_token`), unless the checkpoint is reentrant (transformers < 5's default)."""
    int8 = shape.n_dense_layers * (_int8_inputs_per_token(ctx, shape) + _bnb4_inputs_per_token(ctx, shape)) + \
        shape.n_moe_layers * (_int8_inputs_per_token(ctx, shape, moe_layer=True) +
                              _bnb4_inputs_per_token(ctx, shape, moe_layer=True))
    if ctx.reentrant:  # the checkpointed forward ran under no_grad: nothing was put on ctx
        int8 = 0
    return shape.n_layers * shape.hidden * ctx.r + (seq * ctx.b if ctx.attn == "eager" else 0) + int8


def selective_saved_per_token(ctx, shape):
    """Per layer and token, what selective checkpointing (axolotl's policy: the SDPA / flash ops' outputs saved,
    the rest recomputed) keeps beside the layer input: the kernel output and its fp32 logsumexp. Eager attention
    runs no such op. Source: axolotl monkeypatch/selective_checkpointing.py (_ATEN_ATTENTION_PACKETS)."""
    if ctx.attn == "eager":
        return 0
    v_dim = shape.v_head_dim if shape.family == "mla" else shape.head_dim
    return shape.n_heads * v_dim * ctx.b + 4 * shape.n_heads


# ---------------------------------------------------------------- inference (no grad)

def prefill_working_set_per_token(shape, b, attn, seq, fp16=False, repeat_kv=False, sdpa_math=False):
    """Live forward tensors per token at the worst moment inside one layer (no grad: nothing is saved).

    Beside every op of a layer, hidden-size tensors stay bound by the Python code: the model's
    `inputs_embeds`, the layer's input, the post-attention residual and the normed input (four
    for Llama-style layers; GPT-2's block also keeps `attn_output`). Then the widest op: SwiGLU
    holds act, up and their product (3·I); RMSNorm two fp32 copies; MoE runs transformers'
    `grouped_mm` experts over all T·k routed rows at once; eager attention holds the score matrix,
    its fp32 softmax and the cast back, the additive mask, and — bound to `_` by the decoder
    layer — the probabilities until the layer returns. SDPA left with its math kernel (`sdpa_math`:
    formulas.device.sdpa_backend) holds the scaled query and key, K and V repeated to every query head
    (grouped models), the score matrix and its softmax (aten/src/ATen/native/transformers/attention.cpp
    _scaled_dot_product_attention_math; read off it on fake tensors); its S × S causal mask is the
    caller's (`sdpa_math_mask_bytes`).
    Source: transformers 5 modeling_*.py and integrations/moe.py; checked by the tracer
    (docs/trace_findings.md #1-#5)."""
    H, I, nH = shape.hidden, shape.intermediate, shape.n_heads
    eager_held = (nH * seq * b + seq * b) if attn == "eager" else 0  # probabilities bound to `_`, the mask
    if shape.family in ("llama", "moe", "mla", "generic"):
        beside = 4 * H * b
        norm = beside + 8 * H + eager_held
        width = I if shape.n_dense_layers else 0
        mlp = beside + 3 * width * b + eager_held
        if shape.is_moe:
            k, E, Im = shape.experts_per_token, shape.n_experts, shape.moe_intermediate
            w = 4 if shape.is_mla else b  # DeepSeek routes in fp32
            # router logits, top-k weights and int64 indices, three int64 permutations; then the wider
            # of the gate_up moment and the weighting moment over the T·k gathered rows.
            moe = beside + E * w + k * (w + 8) + 3 * k * 8 + vmax(k * (H + 2 * Im + Im) * b, k * H * (2 * b + 2 * w))
            moe = vmax(moe, beside + 3 * shape.shared_intermediate * b + H * b)
            mlp = vmax(mlp, moe + eager_held)
        qk = shape.head_dim
        attn_ws = beside + nH * qk * b * 3 + shape.n_kv_heads * qk * b * 2
        if repeat_kv and attn == "sdpa" and shape.n_kv_heads < nH and shape.family != "mla":
            attn_ws = attn_ws + 2 * nH * qk * b  # repeat_kv's copies of K and V beside the originals
        if shape.family == "mla":
            # the cached latent re-expanded by kv_b_proj and the rebuilt per-head keys, every forward
            expand = nH * (shape.qk_nope_head_dim + shape.v_head_dim + qk) * b
            attn_ws = beside + nH * (qk + shape.v_head_dim) * b * 2 + nH * qk * b * 2 + expand
    else:
        beside = 5 * H * b
        act = 4 * I * b if shape.family == "gpt2" else 2 * I * b  # gelu_new is a Python formula
        norm = beside + 8 + eager_held
        mlp = beside + act + eager_held
        attn_ws = beside + 3 * H * b + H * b
    for g in _state_groups(shape):
        # a probed state layer: what it needs above its input, beside the model's inputs_embeds and that input
        scale = b // 2 if b > 2 else 1
        norm = vmax(norm, 2 * H * b + (g.probe[0] * _padded(seq, g.probe[9]) // seq + g.probe[1] // seq) * scale)
    if attn == "eager":
        # softmax(x, dtype=float32): ATen casts x to fp32 first (a copy) and then runs _softmax, except for
        # fp16 on CUDA, which has a fused half-to-float kernel (aten/src/ATen/native/SoftMax.cpp). So per
        # score: bf16 scores + fp32 copy + fp32 softmax (2 + 4 + 4); fp16: scores, softmax, cast back
        # (2 + 4 + 2); fp32: scores and softmax (4 + 4).
        per_score = 8 if b == 4 or fp16 else b + 8
        if shape.family == "gpt2":  # GPT-2's eager attention runs softmax in the compute dtype
            per_score = 2 * b
        if shape.eager_per_score and b == 2:  # what this model's eager code holds per score (read off it)
            per_score = shape.eager_per_score[0]
        attn_ws = attn_ws + nH * seq * per_score + seq * b
    elif sdpa_math and shape.family != "gpt2":
        grouped = shape.n_kv_heads < nH and not repeat_kv
        attn_ws = attn_ws + nH * seq * 2 * b + nH * shape.head_dim * b * (4 if grouped else 2)
    elif shape.sdpa_per_score and b == 2:  # SDPA left with the math kernel: its score matrices
        attn_ws = attn_ws + nH * seq * shape.sdpa_per_score[0]
    return vmax(vmax(norm, mlp), attn_ws)


def sdpa_math_mask_bytes(seq, b):
    """The causal mask SDPA's math kernel builds once per call: a bool S × S `ones`, its `tril`, and the additive
    mask in the compute dtype (attention.cpp convert_boolean_attn_mask)."""
    return seq * seq * (b + 2)


def forward_extras_per_position(shape, b):
    """Alive for a whole forward, per sequence position (not per token): RoPE cos/sin (1, S, rot),
    int64 position ids, and learned position embeddings (1, S, H) where the model has them."""
    extra = 2 * shape.rotary_dim * b + 8
    if shape.family in ("gpt2", "gpt_bigcode"):
        extra += shape.hidden * b
    return extra
