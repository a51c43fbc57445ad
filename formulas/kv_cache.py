"""KV cache: keys and values kept per token for decoding."""

from .elementwise import vmin

_FP32 = 4


def _group_bytes(g, batch, tokens, kv_bytes, prefill=False):
    """Cache bytes of one CacheGroup (all its layers) for `batch` sequences of `tokens` tokens.

    full: every token. sliding: transformers' DynamicSlidingWindowLayer keeps the last window − 1
    tokens as a *view* of the tensor it concatenated (cache_utils.py `self.keys =
    full_key_states[:, :, -self.sliding_window + 1 :, :]`), so the memory held is that tensor: the
    whole prompt after the prefill, and min(tokens, window) after each decode step
    (docs/trace_findings.md #19). state: fixed conv + recurrent state per sequence
    (LinearAttentionLayer), in the compute dtype except what the model keeps in fp32.
    Source: transformers cache_utils.py (5.17–5.24)."""
    held = tokens
    if g.window and g.kind in ("sliding", "hybrid") and not prefill:
        held = vmin(tokens, g.window)
    per_layer = held * g.kv_per_token * kv_bytes + g.state_elems * kv_bytes + g.state_fp32_elems * _FP32
    return batch * per_layer * g.count


def kv_cache_bytes_per_token(shape, kv_bytes, mla_cache="expanded"):
    """Bytes of K and V one token adds over all layers.

    Standard attention: 2 · n_kv_heads · head_dim per layer — grouped-query attention shares
    K/V across n_heads / n_kv_heads query heads, which is what rules of thumb that use
    n_heads miss. MLA (DeepSeek-V2/V3) caches the compressed latent (kv_lora_rank +
    qk_rope_head_dim) in transformers 5 (`cache.update(kv_nope, k_rot)` before the expansion),
    vLLM, SGLang and FlashMLA; `expanded` is the per-head keys (qk_nope + qk_rope) and values
    (v_head_dim) that older remote-code implementations cached.
    Source: transformers models/deepseek_v3/modeling_deepseek_v3.py; DeepSeek-V2 paper §2.1.2."""
    if shape.cache_groups:  # general inventory: attention layers only (states do not grow with tokens)
        return sum(g.kv_per_token * g.count for g in shape.cache_groups if g.kind in ("full", "sliding", "hybrid")) * kv_bytes
    if shape.is_mla:
        if mla_cache == "compressed":
            per_layer = shape.kv_lora_rank + shape.qk_rope_head_dim
        else:
            per_layer = shape.n_heads * (shape.head_dim + shape.v_head_dim)
    else:
        per_layer = shape.n_kv_heads * (shape.head_dim + shape.v_head_dim)
    return per_layer * kv_bytes * shape.n_layers


def cached_tokens(shape, tokens):
    """Tokens a layer keeps: all of them, or the last `sliding_window` with a sliding window."""
    if shape.sliding_window:
        return vmin(tokens, shape.sliding_window)
    return tokens


def kv_cache_bytes(shape, batch, tokens, kv_bytes, mla_cache="expanded", prefill=False):
    """KV cache (and recurrent state) of `batch` sequences holding `tokens` tokens each; `prefill`: right
    after a prefill of `tokens`, when sliding-window layers still hold the whole prompt."""
    if shape.cache_groups:
        return sum(_group_bytes(g, batch, tokens, kv_bytes, prefill) for g in shape.cache_groups)
    return batch * cached_tokens(shape, tokens) * kv_cache_bytes_per_token(shape, kv_bytes, mla_cache)


def cache_summary(shape):
    """'20 sliding (window 128), 4 full' — the cache groups of a general-inventory shape, in words."""
    parts = []
    for g in shape.cache_groups:
        if g.kind == "sliding":
            parts.append(f"{g.count} sliding-window (window {g.window}; the whole prompt until the first decode step)")
        elif g.kind == "full":
            parts.append(f"{g.count} full attention")
        elif g.kind == "state":
            parts.append(f"{g.count} fixed state ({g.state_elems + g.state_fp32_elems:,} elements per sequence)")
        elif g.kind == "hybrid":
            parts.append(f"{g.count} attention beside a fixed state ({g.state_elems + g.state_fp32_elems:,} elements "
                         "per sequence)")
        else:
            parts.append(f"{g.count} without cache")
    return ", ".join(parts)
