"""FLOPs and bytes moved per token: the time side of the planner.

Every figure here is an idealised count — matmul FLOPs and bytes that must cross the memory
bus — so times derived from it at peak throughput are lower bounds (speeds upper bounds).
Real runs reach a fraction of peak: model-FLOPs utilisation (MFU) for compute, 70-90 % of
peak bandwidth for decode. Communication between GPUs is not counted.

Sources: 2·N FLOPs per token forward and 6·N for training, Kaplan et al. 2020, *Scaling Laws
for Neural Language Models*, §2.1 and Table 1 (N without embeddings; the attention term
2·n_layer·n_ctx·d_attn). Recomputation under activation checkpointing costs one more forward,
Korthikanti et al. 2022, *Reducing Activation Recomputation in Large Transformer Models*, §5.
Frozen weights need no weight gradient, so backward through them costs 2·N (input gradient)
instead of 4·N — the LoRA/freeze count below follows from the same matmul accounting.
"""

from .kv_cache import kv_cache_bytes


def matmul_params(shape):
    """Parameters multiplied per token: all but embedding lookups (a tied lm_head counts once) and unrouted experts."""
    n = shape.n_active_params()
    for t in shape.tensors:
        if t.kind == "embedding":
            n -= t.total_numel
    if shape.tie_embeddings:
        n += shape.vocab * shape.hidden  # the tied matrix is also the lm_head matmul
    return n


def _attn_width(shape):
    """Per layer: query heads × (q·k head dim + v head dim), the width of QKᵀ plus AV."""
    return shape.n_heads * (shape.head_dim + (shape.v_head_dim or shape.head_dim))


def attention_flops(shape, context):
    """Forward FLOPs of QKᵀ and AV for one query token attending to `context` keys (Kaplan Table 1)."""
    if shape.sliding_window:
        context = min(context, shape.sliding_window)
    return 2 * shape.n_layers * _attn_width(shape) * context


def prefill_flops(shape, batch, seq):
    """Forward FLOPs of a causal prefill: 2·N per token plus attention over on average half the prompt."""
    return batch * seq * (2 * matmul_params(shape) + attention_flops(shape, seq / 2))


def decode_flops_per_token(shape, context):
    """Forward FLOPs to generate one token with `context` tokens already cached."""
    return 2 * matmul_params(shape) + attention_flops(shape, context)


def training_flops_per_token(shape, seq, method="full", trainable_layers=2, grad_ckpt=False, trainable_params=0,
                             recompute_fraction=1.0):
    """FLOPs per trained token: 6·N full; 4·N LoRA/QLoRA (no weight gradient for the frozen base); +2·N recompute.

    Attention has no weights, so its backward is always twice its forward. Freeze: only the top
    `trainable_layers` run a backward (input and weight gradient), plus the input gradient through
    the frozen lm_head. LoRA adapters add 6 FLOPs per trainable parameter. `recompute_fraction`: the share of
    layers checkpointed (selective checkpointing of every k-th layer recomputes 1/k of the forward).
    """
    n = matmul_params(shape)
    attn = attention_flops(shape, seq / 2)  # causal: each token sees half the sequence on average
    fwd = 2 * n + attn
    if method == "full":
        bwd = 4 * n + 2 * attn
        recompute = fwd
    elif method in ("lora", "qlora"):
        bwd = 2 * n + 2 * attn + 6 * trainable_params
        recompute = fwd
    elif method == "freeze":
        head = shape.vocab * shape.hidden
        frac = trainable_layers / shape.n_layers
        body = n - head
        bwd = 2 * head + frac * (4 * body + 2 * attn)
        recompute = frac * (2 * body + attn)
    else:
        raise ValueError(f"--method {method}: no FLOP count")
    return fwd + bwd + (recompute * recompute_fraction if grad_ckpt else 0)


def expert_fraction_touched(shape, tokens):
    """Expected share of an MoE layer's routed experts hit by `tokens` tokens with uniform top-k routing."""
    if not shape.is_moe:
        return 1.0
    miss = 1 - shape.experts_per_token / shape.n_experts
    return 1 - miss ** tokens


def weight_bytes_read_per_step(shape, weight_bytes, batch):
    """Weight bytes one decode step must read: all of them, except the routed experts no token in the batch uses."""
    if not shape.is_moe:
        return weight_bytes
    expert = sum(t.total_numel for t in shape.tensors if t.kind == "experts") / shape.n_params
    return weight_bytes * (1 - expert * (1 - expert_fraction_touched(shape, batch)))


def kv_bytes_read_per_step(shape, batch, context, kv_dtype_bytes, mla_cache="expanded"):
    """KV cache bytes one decode step reads: every cached token of every sequence."""
    return kv_cache_bytes(shape, batch, context, kv_dtype_bytes, mla_cache)


def seconds(flops, flops_per_s):
    """Time for `flops` at a sustained rate; a lower bound when the rate is a peak."""
    return flops / flops_per_s


def gpus_for_deadline(total_flops, deadline_s, flops_per_s_per_gpu):
    """Fewest GPUs that finish `total_flops` within `deadline_s` at the given sustained rate per GPU."""
    need = total_flops / (deadline_s * flops_per_s_per_gpu)
    whole = int(need)
    return max(1, whole if whole >= need else whole + 1)
