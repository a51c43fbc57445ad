"""Weight storage of a model at a given precision: weights, quantization state, buffers."""

from dataclasses import dataclass

from .dtypes import (
    BNB_DTYPES,
    DTYPE_BYTES,
    FP8_BLOCK,
    GGUF_DTYPES,
    GGUF_RECIPES,
    INT4_DTYPES,
    MXFP4_BLOCK,
    bnb4_state_bytes,
    ggml_tensor_bytes,
    int4_group_bytes,
)

_LAYER_PREFIXES = ("layers.", "h.")
_ATTN_V = ("v_proj", "kv_b_proj")
_FFN_DOWN = ("down_proj", "fc2", "dense_4h_to_h")
_ATTN_OUT = ("o_proj", "out_proj")
_TOKEN_EMBEDDINGS = ("embed_tokens", "wte", "embed_in")


@dataclass(frozen=True)
class WeightStorage:
    """Bytes a model's parameters and buffers occupy once loaded."""

    weight_bytes: int  # parameters (packed codes for quantized ones)
    quant_state_bytes: int  # scales / absmax / zeros
    buffer_bytes: int  # non-parameter module state
    layer_bytes: int  # weight + quant_state of the decoder layers (the part a layer split distributes)
    layer_quant_state_bytes: int  # of which quantization state
    largest_quantized: int  # elements of the largest single quantized weight (dequantization temporary)
    embed_bytes: int = 0  # input (and position) embeddings
    head_bytes: int = 0  # untied lm_head


def _is_layer(t):
    return t.name.startswith(_LAYER_PREFIXES)


def _ggml_role(t):
    if t.module in _ATTN_V:
        return "attn_v"
    if t.module in _FFN_DOWN or t.name == "h.mlp.c_proj" or t.name == "layers.mlp.experts.down_proj":
        return "ffn_down"
    if t.module in _ATTN_OUT or t.name in ("h.attn.c_proj", "layers.attention.dense"):
        return "attn_output"
    return "other"


def _bnb_quantizes(t):
    # transformers integrations/bitsandbytes.py replaces nn.Linear and Conv1D only; the output
    # embedding stays unquantized (quantizers/base.py get_keys_to_not_convert). Fused 3-D MoE
    # expert parameters and router Parameters are not nn.Linear and stay in the compute dtype.
    return t.kind == "linear" and t.module != "lm_head"


def _tensor_storage(t, dtype, cb, n_layers, double_quant, group_size, tied=False, is_70b=False):
    """(weight bytes, quant_state bytes, quantized?) of all copies of one inventory tensor."""
    n = t.numel
    forced = DTYPE_BYTES[t.dtype] if t.dtype else None
    plain = (forced or cb) * n * t.count
    if dtype in BNB_DTYPES:
        if not _bnb_quantizes(t):
            return plain, 0, False
        if dtype == "int8":  # Int8Params: int8 codes + fp32 per-row scale SCB (bitsandbytes/nn/modules.py)
            return n * t.count, t.shape[0] * 4 * t.count, True
        return -(-n // 2) * t.count, bnb4_state_bytes(n, double_quant) * t.count, True
    if dtype == "fp8":
        if t.kind not in ("linear", "experts") or t.module == "lm_head" or t.dtype:
            return plain, 0, False
        rows, cols = t.shape[-2], t.shape[-1]
        experts = t.shape[0] if t.kind == "experts" else 1
        scales = experts * (-(-rows // FP8_BLOCK)) * (-(-cols // FP8_BLOCK)) * 4
        return n * t.count, scales * t.count, True
    if dtype == "mxfp4":
        if t.kind != "experts":  # attention, router, embeddings and head stay in the compute dtype,
            if "experts." in t.name and t.name.endswith("_bias"):  # but the experts' biases are fp32
                return 4 * n * t.count, 0, False  # (integrations/mxfp4.py Mxfp4GptOssExperts)
            return plain, 0, False
        blocks = -(-n // MXFP4_BLOCK) * t.count
        return blocks * MXFP4_BLOCK // 2, blocks, True
    if dtype in INT4_DTYPES:
        if t.kind not in ("linear", "experts") or t.module == "lm_head":
            return plain, 0, False
        experts = t.shape[0] if t.kind == "experts" else 1
        q, s = int4_group_bytes(t.shape[-2], t.shape[-1], group_size, dtype == "gptq-int4")
        return q * experts * t.count, s * experts * t.count, True
    if dtype in GGUF_DTYPES:
        recipe = GGUF_RECIPES[dtype]
        if len(t.shape) == 1 or t.kind == "router":
            return 4 * n * t.count, 0, False  # 1-D tensors and ffn_gate_inp stay F32 in GGUF
        # output.weight gets the output type; with tied embeddings token_embd plays that part.
        if t.module == "lm_head" or (tied and t.kind == "embedding" and t.module in _TOKEN_EMBEDDINGS):
            return ggml_tensor_bytes(n, recipe.output) * t.count, 0, True
        if not _is_layer(t):
            return ggml_tensor_bytes(n, recipe.base) * t.count, 0, True
        role = _ggml_role(t)
        first = n_layers - t.count if t.count <= n_layers else 0
        per_layer = t.count // n_layers if t.count > n_layers else 1
        total = 0
        for i in range(first, first + min(t.count, n_layers)):
            total += ggml_tensor_bytes(n, recipe.layer_type(role, i, n_layers, is_70b)) * per_layer
        return total, 0, True
    return plain, 0, False


def weight_storage(shape, dtype, compute_dtype="bf16", double_quant=True, group_size=128):
    """Bytes of weights, quantization state and buffers of `shape` stored at `dtype`.

    Float dtypes store everything at that dtype (tensors the model pins, like DeepSeek's fp32
    router, keep theirs). Quantized dtypes store what the scheme quantizes packed and the rest
    at `compute_dtype`. Source: see formulas/dtypes.py per scheme."""
    cb = DTYPE_BYTES[dtype] if dtype in ("fp32", "bf16", "fp16") else DTYPE_BYTES[compute_dtype]
    weights = qstate = layer = layer_q = largest_q = embed = head = 0
    # llama.cpp classifies an 80-layer Llama with 8 query heads per KV head as LLM_TYPE_70B.
    is_70b = shape.family == "llama" and shape.n_layers == 80 and shape.n_heads == 8 * shape.n_kv_heads
    for t in shape.tensors:
        w, q, quantized = _tensor_storage(t, dtype, cb, shape.n_layers, double_quant, group_size, shape.tie_embeddings, is_70b)
        weights += w
        qstate += q
        if _is_layer(t):
            layer += w + q
            layer_q += q
        elif t.kind == "embedding":
            embed += w + q
        elif t.module == "lm_head":
            head += w + q
        if quantized:
            largest_q = max(largest_q, t.numel if t.kind != "experts" else t.numel // t.shape[0])
    buffers = 0
    for b in shape.buffers:
        bb = DTYPE_BYTES[b.dtype] if b.dtype else cb
        buffers += bb * b.numel * b.count
    return WeightStorage(weights, qstate, buffers, layer, layer_q, largest_q, embed, head)
