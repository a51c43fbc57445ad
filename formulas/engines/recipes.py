"""Mixed per-tensor recipes of published GGUFs that no single llama-quantize file type gives.

A recipe is llama-quantize's --tensor-type list (regex → GGML type, first match wins), applied over a base
file type, plus --output-tensor-type / --token-embedding-type. A real file's header is always exact (`--model
file.gguf` or a Hub repo with --gguf); a recipe stands in where only the recipe is known.
"""

# Unsloth's 1.58-bit DeepSeek-R1 (unsloth/DeepSeek-R1-GGUF, DeepSeek-R1-UD-IQ1_S, 131 GB): "quantize only the MoE
# layers to 1.5bit, and leave attention and other layers in 4 or 6bit … leave the first 3 transformer dense
# layers in 4/6bit"; the MoE down_proj "2.06/1.56bit" (unsloth.ai/blog/deepseekr1-dynamic, 2025-01-27). The blog
# gives bit widths, not GGML types: the types below are an assumption (4-bit = Q4_K, 6-bit = Q6_K, 1.56-bit =
# IQ1_S, 2.06-bit = IQ2_XXS for the down projections of the first three MoE layers), and the attention is
# taken in llama.cpp's current MLA layout (attn_k_b / attn_v_b). Total 131.6 GiB against the published 131 GB.
UNSLOTH_R1_UD_IQ1_S = {
    "base": "iq1_s",
    "tensor_types": (
        (r"ffn_(gate|up)_exps", "IQ1_S"),
        (r"blk\.(3|4|5)\.ffn_down_exps", "IQ2_XXS"),
        (r"ffn_down_exps", "IQ1_S"),
        (r"ffn_.*_shexp", "Q6_K"),
        (r"blk\.[0-2]\.ffn_down\.", "Q6_K"),
        (r"blk\.[0-2]\.ffn_(gate|up)\.", "Q4_K"),
        (r"attn_output", "Q6_K"),
        (r"attn_", "Q4_K"),
    ),
    "output_type": "Q6_K",
    "embd_type": "Q4_K",
    "source": "unsloth.ai/blog/deepseekr1-dynamic (bit widths per part; GGML types assumed)",
}

RECIPES = {"ud-iq1_s": UNSLOTH_R1_UD_IQ1_S, "unsloth-ud-iq1_s": UNSLOTH_R1_UD_IQ1_S}
