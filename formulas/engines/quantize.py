"""The GGML type llama.cpp's quantizer gives each tensor, per file type (ftype): `llama-quantize` in Python.

A port of src/llama-quant.cpp (ggml-org/llama.cpp@0c1e57098): `tensor_allows_quantization` (L290-386: only
2-D/3-D tensors whose name ends in `weight`, not norms, routers, conv1d, positions), `llama_tensor_get_type_impl`
(L446-705: output / tied token_embd, attn_v-like, attn_k, attn_q, ffn_down, attn_output, attn_qkv, ffn_gate,
ffn_up, by ftype, with the MoE (n_expert == 8) and 70B bumps and `use_more_bits`), `tensor_type_fallback`
(L388-444: a row that is not whole blocks falls back to a 32-block type, else F16) and
`llama_ftype_get_default_type` (L888-930). Counters run in the loader's order (weights_map: non-block tensors,
then by block, then by name — llama-model-loader.h weight_name_comparer), as the quantizer's do; ffn_* layer
indices come from the tensor name when the model has experts (`layer_info`). No importance matrix is assumed
(`has_imatrix` false), which decides a few IQ choices.
"""

from .gguf import FLOAT_TYPES, GGUFModel, GGUFTensor, block_elements

# ftype name (llama-quantize's, lower case) → (LLAMA_FTYPE id, default GGML type). include/llama.h L118-161.
FTYPES = {
    "f32": (0, "F32"), "f16": (1, "F16"), "bf16": (32, "BF16"), "q4_0": (2, "Q4_0"), "q4_1": (3, "Q4_1"),
    "q8_0": (7, "Q8_0"), "q5_0": (8, "Q5_0"), "q5_1": (9, "Q5_1"), "q2_k": (10, "Q2_K"), "q3_k_s": (11, "Q3_K"),
    "q3_k_m": (12, "Q3_K"), "q3_k_l": (13, "Q3_K"), "q4_k_s": (14, "Q4_K"), "q4_k_m": (15, "Q4_K"),
    "q5_k_s": (16, "Q5_K"), "q5_k_m": (17, "Q5_K"), "q6_k": (18, "Q6_K"), "iq2_xxs": (19, "IQ2_XXS"),
    "iq2_xs": (20, "IQ2_XS"), "q2_k_s": (21, "Q2_K"), "iq3_xs": (22, "IQ3_S"), "iq3_xxs": (23, "IQ3_XXS"),
    "iq1_s": (24, "IQ1_S"), "iq4_nl": (25, "IQ4_NL"), "iq3_s": (26, "IQ3_S"), "iq3_m": (27, "IQ3_S"),
    "iq2_s": (28, "IQ2_XS"), "iq2_m": (29, "IQ2_S"), "iq4_xs": (30, "IQ4_XS"), "iq1_m": (31, "IQ1_M"),
    "tq1_0": (36, "TQ1_0"), "tq2_0": (37, "TQ2_0"), "mxfp4_moe": (38, "MXFP4"), "q1_0": (40, "Q1_0"),
    "q2_0": (41, "Q2_0"),
}
FTYPE_NAMES = {v[0]: k for k, v in FTYPES.items()}
# What `ollama pull` / Hub file names call some of them.
FTYPE_ALIASES = {"mxfp4": "mxfp4_moe", "fp16": "f16", "fp32": "f32", "q4_k": "q4_k_m", "q5_k": "q5_k_m",
                 "q3_k": "q3_k_m"}

# tensor_type_fallback (L388-444): a row that is not a whole number of blocks
_FALLBACK = {"IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL",
             "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ4_XS": "IQ4_NL", "Q2_0": "Q4_0", "Q2_K": "Q4_0",
             "Q3_K": "Q4_0", "TQ1_0": "Q4_0", "TQ2_0": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_IQ12 = ("iq2_xxs", "iq2_xs", "iq1_s", "iq2_s", "iq2_m", "iq1_m")


def ftype_of(name):
    """Canonical ftype name for a --dtype (q4_k_m, Q4_K_M, iq1_s, mxfp4 …); ValueError naming the allowed ones."""
    key = str(name).lower().replace("-", "_")
    key = FTYPE_ALIASES.get(key, key)
    if key not in FTYPES:
        raise ValueError(f"--dtype {name}: not a llama.cpp file type (allowed: {', '.join(sorted(FTYPES))})")
    return key


def _category(name):
    """tensor_get_category (L107-155)."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def allows_quantization(t, quantize_output=True):
    """tensor_allows_quantization (L290-386), for the tensors of the architectures modelled here."""
    if _n_dims(t.shape) < 2:  # quantize only 2-D and 3-D (expert) tensors
        return False
    n = t.name
    if not n.endswith("weight") or "_norm.weight" in n or "ffn_gate_inp.weight" in n:
        return False
    if n == "output.weight" and not quantize_output:
        return False
    return not any(k in n for k in ("altup", "laurel", "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight",
                                    "indexer.k_proj.weight", "indexer.q_proj.weight", "attn_rel_b.weight",
                                    "position_embd", "token_types", "time_mix_"))


def _n_dims(shape):
    """ggml_n_dims: 1 + the last dimension above 1."""
    n = 1
    for i, d in enumerate(shape):
        if d > 1:
            n = i + 1
    return n


def _use_more_bits(i, n):
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


class _State:
    """quantize_state_impl: the counters and the model facts the rules read."""

    def __init__(self, model, hp):
        self.arch = model.arch
        self.n_expert = hp["n_expert"]
        self.n_gqa = hp["n_gqa0"]
        self.is_70b = hp["is_70b"]
        self.n_layer = hp["n_layer_all"]
        names = [t.name for t in model.tensors]
        self.n_attention_wv = sum(1 for n in names if _category(n) in ("attn_v", "attn_qkv", "attn_kv_b"))
        self.tied = "output.weight" not in names
        self.i_attention_wv = self.i_ffn_down = self.i_ffn_gate = self.i_ffn_up = 0

    def layer(self, counter, name):
        if max(1, self.n_expert) > 1:
            return int(name.split(".")[1]), self.n_layer
        return counter, self.n_layer


def _type_impl(qs, new, t, ftype, cat):
    """llama_tensor_get_type_impl (L446-705)."""
    f = ftype
    nx = t.shape[0]
    ne2 = t.shape[2] if len(t.shape) > 2 else 1
    if cat == "output" or (qs.tied and cat == "token_embd"):
        if f == "mxfp4_moe":
            return "Q8_0"
        if qs.arch == "falcon" or nx % block_elements(new):
            return "Q8_0"
        if f in ("iq2_xxs", "iq2_xs", "iq3_xxs", "iq1_s", "iq2_s", "iq2_m", "iq1_m"):
            return "Q5_K"
        return new if new == "Q8_0" else "Q6_K"
    if f == "mxfp4_moe":
        return "MXFP4" if ne2 > 1 else "Q8_0"
    if cat == "token_embd":
        if f in ("iq2_xxs", "iq2_xs", "iq1_s", "iq1_m"):
            return "Q2_K"
        if f in ("iq2_s", "iq2_m", "iq3_xxs"):
            return "IQ3_S"
        if f in ("tq1_0", "tq2_0", "q2_0"):
            return "Q4_K"
        return new
    attn_v_like = cat in ("attn_v", "attn_qkv", "attn_kv_b")
    if f in _IQ12:
        if attn_v_like:
            qs.i_attention_wv += 1
            if qs.n_gqa >= 4 or qs.n_expert >= 4:
                return "Q4_K"
            return "IQ3_S" if f in ("iq2_s", "iq2_m") else "Q2_K"
        if qs.n_expert == 8 and cat == "attn_k":
            return "Q4_K"
        if cat == "ffn_down":
            out = new
            if qs.i_ffn_down < qs.n_layer // 8:
                out = "IQ3_S" if f in ("iq2_s", "iq2_m") else "Q2_K"
            qs.i_ffn_down += 1
            return out
        if cat == "attn_output":
            if qs.n_expert == 8:
                return "Q5_K"
            if f in ("iq1_s", "iq1_m"):
                return "IQ2_XXS"
            if f in ("iq2_s", "iq2_m"):
                return "IQ3_S"
        return new
    if attn_v_like:
        g = qs.n_gqa
        if f == "q2_k":
            new = "Q4_K" if g >= 4 else "Q3_K"
        elif f == "q2_k_s" and g >= 4:
            new = "Q4_K"
        elif f == "iq3_xxs":
            new = "Q4_K" if g >= 4 else "IQ3_S"  # no imatrix
        elif f in ("iq3_xs", "iq3_s") and g >= 4:
            new = "Q4_K"
        elif f == "iq3_m":
            new = "Q4_K"
        elif f == "q3_k_m":
            new = "Q5_K" if qs.i_attention_wv < 2 else "Q4_K"
        elif f == "q3_k_l":
            new = "Q5_K"
        elif f in ("iq4_nl", "iq4_xs") and g >= 4:
            new = "Q5_K"
        elif f in ("q4_k_m", "q5_k_m") and _use_more_bits(qs.i_attention_wv, qs.n_attention_wv):
            new = "Q6_K"
        elif f == "q4_k_s" and qs.i_attention_wv < 4:
            new = "Q5_K"
        if qs.is_70b and new in ("Q3_K", "Q4_K"):
            new = "Q5_K"
        if qs.n_expert == 8:
            new = "Q8_0"
        qs.i_attention_wv += 1
        return new
    if cat == "attn_k":
        if qs.n_expert == 8:
            return "Q8_0"
        if f == "iq3_xs":
            return "IQ3_XXS"
        if f == "iq3_xxs":
            return "IQ2_S"
        return new
    if cat == "attn_q":
        if f == "iq3_xs":
            return "IQ3_XXS"
        if f == "iq3_xxs":
            return "IQ2_S"
        return new
    if cat == "ffn_down":
        i, n = qs.layer(qs.i_ffn_down, t.name)
        falcon = qs.arch == "falcon"
        if f == "q2_k":
            new = "Q3_K"
        elif f == "q2_k_s":
            if i < n // 8:
                new = "Q4_K"
        elif f == "iq3_xxs":
            new = "Q4_K" if i < n // 8 else "Q3_K"
        elif f == "q3_k_m":
            new = "Q5_K" if i < n // 16 else ("Q4_K" if not falcon or _use_more_bits(i, n) else "Q3_K")
        elif f == "iq3_m" and (i < n // 8 or (qs.n_expert == 8 and _use_more_bits(i, n))):
            new = "Q4_K"
        elif f == "q3_k_l":
            new = "Q4_K" if falcon else "Q5_K"
        elif f == "q4_k_m":
            if falcon:
                new = "Q6_K" if i < n // 16 else ("Q5_K" if _use_more_bits(i, n) else "Q4_K")
            elif _use_more_bits(i, n):
                new = "Q6_K"
        elif i < n // 8 and f in ("iq4_nl", "iq4_xs"):
            new = "Q5_K"
        elif f == "q5_k_m" and _use_more_bits(i, n):
            new = "Q6_K"
        elif f == "q4_k_s" and not falcon and i < n // 8:
            new = "Q5_K"
        qs.i_ffn_down += 1
        return new
    if cat == "attn_output":
        if qs.arch != "falcon":
            if qs.n_expert == 8:
                if f in ("q2_k", "iq3_xs", "iq3_xxs", "q3_k_s", "q3_k_m", "iq4_nl", "q4_k_s", "q4_k_m", "iq3_s",
                         "iq3_m", "iq4_xs"):
                    new = "Q5_K"
            else:
                new = {"q2_k": "Q3_K", "iq3_xxs": "IQ3_S", "q3_k_m": "Q4_K", "q3_k_l": "Q5_K",
                       "iq3_m": "Q4_K"}.get(f, new)
        elif f == "q3_k_l":
            new = "Q4_K"
        return new
    if cat == "attn_qkv":  # unreachable: attn_qkv is attn_v-like above (kept for the source's order)
        return new
    if cat in ("ffn_gate", "ffn_up"):
        counter = "i_ffn_gate" if cat == "ffn_gate" else "i_ffn_up"
        i, n = qs.layer(getattr(qs, counter), t.name)
        if f == "iq3_xs" and n // 8 <= i < 7 * n // 8:
            new = "IQ3_XXS"
        setattr(qs, counter, getattr(qs, counter) + 1)
        return new
    return new


def _fallback(t, new):
    """tensor_type_fallback (L388-444)."""
    ncols = t.shape[0]
    if ncols % block_elements(new) == 0:
        return new
    out = _FALLBACK.get(new)
    if out is None:
        out = new  # already a 32-block type: the check below makes it F16
    if ncols % block_elements(out):
        out = "F16"
    return out


def quantize_model(model, ftype, hp, tensor_types=(), output_type=None, embd_type=None, quantize_output=True):
    """The GGUFModel llama_model_quantize writes from `model` (a float GGUF) at `ftype`.

    hp: the quantizer's model facts (llamacpp.quant_facts: n_expert, n_gqa of layer 0, LLM_TYPE_70B, n_layer_all).
    tensor_types: --tensor-type overrides [(regex, GGML type)] in order (first match wins);
    output_type / embd_type: --output-tensor-type / --token-embedding-type."""
    import re

    ftype = ftype_of(ftype)
    default = FTYPES[ftype][1]
    qs = _State(model, hp)
    patterns = [(re.compile(p), typ) for p, typ in tensor_types]
    out = []
    for t in model.ordered():
        cat = _category(t.name)
        new = t.ggml_type
        if allows_quantization(t, quantize_output):
            if embd_type and cat == "token_embd":
                new = embd_type
            elif output_type and cat == "output":
                new = output_type
            else:
                new = default
                if default not in FLOAT_TYPES:
                    manual = next((typ for p, typ in patterns if p.search(t.name)), None)
                    if manual:
                        new = manual
                    else:
                        new = _type_impl(qs, new, t, ftype, cat)
                    new = _fallback(t, new)
        out.append(GGUFTensor(t.name, new, t.shape))
    meta = dict(model.metadata)
    meta["general.file_type"] = FTYPES[ftype][0]
    return GGUFModel(arch=model.arch, metadata=meta, tensors=tuple(out), source=f"{model.source} → {ftype}")
