"""KV cache: keys and values kept per token for decoding."""

from .elementwise import vmin


def kv_cache_bytes_per_token(shape, kv_bytes, mla_cache="expanded"):
    """Bytes of K and V one token adds over all layers.

    Standard attention: 2 · n_kv_heads · head_dim per layer — grouped-query attention shares
    K/V across n_heads / n_kv_heads query heads, which is what rules of thumb that use
    n_heads miss. MLA (DeepSeek-V2/V3) caches the compressed latent (kv_lora_rank +
    qk_rope_head_dim) in transformers 5 (`cache.update(kv_nope, k_rot)` before the expansion),
    vLLM, SGLang and FlashMLA; `expanded` is the per-head keys (qk_nope + qk_rope) and values
    (v_head_dim) that older remote-code implementations cached.
    Source: transformers models/deepseek_v3/modeling_deepseek_v3.py; DeepSeek-V2 paper §2.1.2."""
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


def kv_cache_bytes(shape, batch, tokens, kv_bytes, mla_cache="expanded"):
    """KV cache of `batch` sequences holding `tokens` tokens each."""
    return batch * cached_tokens(shape, tokens) * kv_cache_bytes_per_token(shape, kv_bytes, mla_cache)
