"""Bytes per element, and how each quantization scheme stores a weight tensor.

A quantized tensor costs `weight` bytes (the packed codes) plus `quant_state` bytes
(scales, absmax, zeros, codebooks). Which tensors a scheme quantizes is part of the
scheme: bitsandbytes through transformers converts only nn.Linear / Conv1D modules
and keeps the output embedding in the compute dtype; GGUF quantizes every 2-D tensor
and keeps 1-D tensors in F32.
"""

from dataclasses import dataclass

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "uint8": 1, "bool": 1, "int32": 4, "int64": 8}
FLOAT_DTYPES = ("fp32", "bf16", "fp16")

BNB_DTYPES = ("int8", "nf4", "fp4")
INT4_DTYPES = ("gptq-int4", "awq-int4")
GGUF_DTYPES = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "q3_k_m", "q2_k")
WEIGHT_DTYPES = FLOAT_DTYPES + ("fp8", "mxfp4") + BNB_DTYPES + INT4_DTYPES + GGUF_DTYPES
KV_DTYPES = ("fp32", "bf16", "fp16", "fp8")

# bitsandbytes 4-bit: blockwise absmax over 64 weights; with double quantization the fp32
# absmax are themselves quantized to 8 bits in blocks of 256, with an fp32 offset.
# Source: bitsandbytes/functional.py quantize_4bit (blocksize=64, compress_statistics → quantize_blockwise(blocksize=256)).
BNB4_BLOCK = 64
BNB4_NESTED_BLOCK = 256
BNB4_CODE_BYTES = 16 * 4  # QuantState.code: the 16-entry fp32 NF4/FP4 table, one per tensor
# Double quantization's state2.code: the 256-entry fp32 dynamic map, copied per tensor
# (bitsandbytes functional.py quantize_blockwise: `code.to(A.device, copy=True)`).
BNB4_NESTED_CODE_BYTES = 256 * 4

# DeepSeek-V3 / transformers FineGrainedFP8: fp32 scale per 128×128 weight block.
# Source: DeepSeek-V3 config.json quantization_config.weight_block_size = [128, 128].
FP8_BLOCK = 128
# MXFP4 (OCP Microscaling): 4-bit E2M1 codes, two per byte, and one E8M0 (uint8) scale per 32 elements;
# transformers stores an expert tensor as `<name>_blocks` (…, n/32, 16) uint8 and `<name>_scales`
# (…, n/32) uint8 (integrations/mxfp4.py), quantizing only the MoE experts (gpt-oss), whose biases it keeps
# in fp32. The scales' swizzled kernel layout may pad them; that is not counted.
MXFP4_BLOCK = 32

# GGUF block types: (bytes per block, weights per block). Source: ggml/src/ggml-common.h
# (block_q8_0 = 2 + 32, block_q4_0 = 2 + 16, block_q2_K = 16 + 64 + 2 + 2 = 84, block_q3_K = 110,
# block_q4_K = 144, block_q5_K = 176, block_q6_K = 210; QK_K = 256).
GGML_BLOCKS = {
    "Q8_0": (34, 32),
    "Q4_0": (18, 32),
    "Q2_K": (84, 256),
    "Q3_K": (110, 256),
    "Q4_K": (144, 256),
    "Q5_K": (176, 256),
    "Q6_K": (210, 256),
    "F16": (2, 1),
    "F32": (4, 1),
}


def _use_more_bits(i, n):
    # llama.cpp src/llama-quant.cpp use_more_bits(): first and last eighth, and every third layer between.
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass(frozen=True)
class GGUFRecipe:
    """Per-tensor GGML types of one llama.cpp file type (simplified from llama_tensor_get_type)."""

    base: str  # most weights
    output: str  # output.weight (lm_head)
    attn_v: str = ""  # attn_v override for chosen layers ("" = base)
    ffn_down: str = ""  # ffn_down override for chosen layers
    attn_output: str = ""  # attn_output override
    rule: str = "none"  # which layers get the attn_v/ffn_down override: none | more_bits | q3_k_m

    def layer_type(self, role, i, n_layers, is_70b=False):
        """GGML type of a weight with role attn_v/ffn_down/attn_output/other in layer i."""
        if role == "attn_output" and self.attn_output:
            return self.attn_output
        if role == "attn_v" and is_70b:
            # llama-quant.cpp: "In the 70B model we have 8 heads sharing the same attn_v weights" → Q3_K/Q4_K become Q5_K.
            t = self.layer_type(role, i, n_layers)
            return "Q5_K" if t in ("Q3_K", "Q4_K") else t
        if role in ("attn_v", "ffn_down"):
            over = self.attn_v if role == "attn_v" else self.ffn_down
            if not over:
                return self.base
            if self.rule == "more_bits":
                return over if _use_more_bits(i, n_layers) else self.base
            if self.rule == "q3_k_m":
                if role == "attn_v":
                    return "Q5_K" if i < 2 else "Q4_K"
                return "Q5_K" if i < n_layers // 16 else "Q4_K"
            return over
        return self.base


# Source: llama.cpp src/llama-quant.cpp llama_tensor_get_type (simplified: the 70B/GQA and
# MoE special cases are left out; 1-D tensors stay F32; output.weight is Q6_K below Q8_0).
GGUF_RECIPES = {
    "q8_0": GGUFRecipe(base="Q8_0", output="Q8_0"),
    "q6_k": GGUFRecipe(base="Q6_K", output="Q6_K"),
    "q5_k_m": GGUFRecipe(base="Q5_K", output="Q6_K", attn_v="Q6_K", ffn_down="Q6_K", rule="more_bits"),
    "q4_k_m": GGUFRecipe(base="Q4_K", output="Q6_K", attn_v="Q6_K", ffn_down="Q6_K", rule="more_bits"),
    "q4_0": GGUFRecipe(base="Q4_0", output="Q6_K"),
    "q3_k_m": GGUFRecipe(base="Q3_K", output="Q6_K", attn_v="Q4_K", ffn_down="Q4_K", attn_output="Q4_K", rule="q3_k_m"),
    "q2_k": GGUFRecipe(base="Q2_K", output="Q6_K", attn_v="Q3_K", ffn_down="Q3_K", attn_output="Q3_K", rule="all"),
}


def ggml_tensor_bytes(numel, ggml_type):
    """Bytes of `numel` weights stored as one GGML type."""
    nbytes, n = GGML_BLOCKS[ggml_type]
    return -(-numel // n) * nbytes


def bnb4_state_bytes(numel, double_quant=True):
    """quant_state bytes of one bitsandbytes 4-bit tensor: absmax (+ nested absmax and offset) + code."""
    blocks = -(-numel // BNB4_BLOCK)
    if double_quant:
        nested = -(-blocks // BNB4_NESTED_BLOCK)
        return blocks * 1 + nested * 4 + 4 + BNB4_CODE_BYTES + BNB4_NESTED_CODE_BYTES
    return blocks * 4 + BNB4_CODE_BYTES


def int4_group_bytes(out_f, in_f, group_size, with_g_idx):
    """(packed weight bytes, scales+zeros(+g_idx) bytes) of a GPTQ/AWQ int4 linear.

    Source: auto-gptq / autoawq QuantLinear buffers: qweight int32 [in/8, out], qzeros int32
    [in/g, out/8], scales fp16 [in/g, out], g_idx int32 [in] (GPTQ only)."""
    groups = -(-in_f // group_size)
    qweight = in_f * out_f // 2
    qzeros = groups * (-(-out_f // 8)) * 4
    scales = groups * out_f * 2
    g_idx = in_f * 4 if with_g_idx else 0
    return qweight, qzeros + scales + g_idx
