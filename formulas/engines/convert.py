"""A Hugging Face config → the GGUF header llama.cpp's convert_hf_to_gguf.py would write for it.

No weights are read: the header (metadata + every tensor's name, shape and type) follows from config.json,
per architecture, the way the converter's model classes write it and the way llama.cpp's loader expects it.
The tensor names are gguf-py's (`MODEL_TENSORS` of each `MODEL_ARCH`, `TensorNameMap`); the shapes are
llama.cpp's `load_arch_tensors`, in GGML order (ne0 = the input width of a weight).

Sources (ggml-org/llama.cpp@0c1e57098, vendored by llama-cpp-python 0.3.36): the writers
conversion/{base,llama,qwen,deepseek,gpt_oss,gemma,glm,phi,gpt2,starcoder,gptneox,nemotron}.py; the loaders
src/models/{llama,qwen2,qwen3,qwen2moe,qwen3moe,deepseek2,openai-moe,gemma2,gemma3,glm4,phi3,gpt2,starcoder,
gptneox,smollm3,nemotron-h,qwen3next,qwen35,qwen35moe}.cpp (`load_arch_hparams`, `load_arch_tensors`); the
F32 rule conversion/base.py L1083-1121 (1-D tensors, `_norm.weight`, routers, positions, conv1d and every
non-`.weight` tensor are F32; the rest at the file type — BF16 for a bf16 checkpoint, F16, or F32).
Multi-token-prediction layers are not written (llama.cpp skips them unless asked to load them).
"""

from .gguf import GGUFModel, GGUFTensor

# Hugging Face model_type → llama.cpp architecture (conversion/*.py `@ModelBase.register` + `model_arch`).
HF_TO_GGUF_ARCH = {
    "llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
    "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "deepseek_v2": "deepseek2", "deepseek_v3": "deepseek2",
    "gpt_oss": "gpt-oss", "gemma2": "gemma2", "gemma3": "gemma3", "gemma3_text": "gemma3", "glm4": "glm4",
    "phi3": "phi3", "gpt2": "gpt2", "gpt_bigcode": "starcoder", "gpt_neox": "gptneox", "smollm3": "smollm3",
    "nemotron_h": "nemotron_h", "qwen3_next": "qwen3next", "qwen3_5_text": "qwen35",
    "qwen3_5_moe_text": "qwen35moe",
}
# Model types llama.cpp has no architecture for, or that this file does not convert yet: why, in one line.
NOT_CONVERTED = {
    "opt": "llama.cpp has no OPT architecture (src/llama-arch.cpp lists none; convert_hf_to_gguf.py has no "
           "OPTForCausalLM)",
    "deepseek_v32": "llama.cpp's deepseek32 (DSA lightning indexer, its own indexer key cache in "
                    "src/llama-kv-cache-dsa.cpp) is not modelled here",
}
# transformers' default of tie_word_embeddings where a config leaves it out (the config classes, 5.25)
_TIED_BY_DEFAULT = ("gemma2", "gemma3", "gemma3_text", "smollm3", "gpt2", "gpt_bigcode")
_SRC_TYPES = {"bf16": "BF16", "fp16": "F16", "f16": "F16", "fp32": "F32", "f32": "F32"}


class _Writer:
    """Collects metadata and tensors as convert_hf_to_gguf's GGUFWriter would."""

    def __init__(self, arch, wtype):
        self.arch, self.wtype, self.meta, self.tensors = arch, wtype, {}, []

    def kv(self, key, value):
        self.meta[f"{self.arch}.{key}"] = value

    def add(self, name, *shape, ftype=None):
        """A tensor at the file type, or F32 where convert_hf_to_gguf forces it (base.py L1083-1121)."""
        forced = (len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight")
                  or any(k in name for k in ("ffn_gate_inp", "position_embd", "ssm_conv1d")))
        self.tensors.append(GGUFTensor(name, ftype or ("F32" if forced else self.wtype), tuple(shape)))


def _get(cfg, *names, default=None):
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    return default


def _rope(cfg):
    """rope_parameters (transformers ≥ 5) or the older rope_scaling + rope_theta."""
    rp = dict(cfg.get("rope_parameters") or {})
    rs = cfg.get("rope_scaling") or {}
    for k, v in rs.items():
        rp.setdefault(k, v)
    return rp


def _common(w, cfg, n_layer, H, n_head, n_kv, hd, ff, ctx):
    w.kv("context_length", ctx)
    w.kv("embedding_length", H)
    w.kv("block_count", n_layer)
    if ff is not None:
        w.kv("feed_forward_length", ff)
    w.kv("attention.head_count", n_head)
    w.kv("attention.head_count_kv", n_kv)
    if hd and hd != H // max(n_head if isinstance(n_head, int) else max(n_head), 1):
        w.kv("attention.key_length", hd)
        w.kv("attention.value_length", hd)


def _embed_out(w, H, V, tied, output=True):
    w.add("token_embd.weight", H, V)
    w.add("output_norm.weight", H)
    if output and not tied:
        w.add("output.weight", H, V)


def _attn(w, i, H, nq, nk, nv, no, bias_qkv=False, bias_o=False, qk_norm=0, fused=False):
    p = f"blk.{i}."
    if fused:
        w.add(p + "attn_qkv.weight", H, nq + nk + nv)
        if bias_qkv:
            w.add(p + "attn_qkv.bias", nq + nk + nv)
    else:
        w.add(p + "attn_q.weight", H, nq)
        w.add(p + "attn_k.weight", H, nk)
        w.add(p + "attn_v.weight", H, nv)
        if bias_qkv:
            w.add(p + "attn_q.bias", nq)
            w.add(p + "attn_k.bias", nk)
            w.add(p + "attn_v.bias", nv)
    w.add(p + "attn_output.weight", no, H)
    if bias_o:
        w.add(p + "attn_output.bias", H)
    if qk_norm:
        w.add(p + "attn_q_norm.weight", qk_norm)
        w.add(p + "attn_k_norm.weight", qk_norm)


def _ffn(w, i, H, ff, bias=False, gated=True, fused_up=False):
    p = f"blk.{i}."
    if gated and not fused_up:
        w.add(p + "ffn_gate.weight", H, ff)
    w.add(p + "ffn_up.weight", H, 2 * ff if fused_up else ff)
    w.add(p + "ffn_down.weight", ff, H)
    if bias:
        if gated and not fused_up:
            w.add(p + "ffn_gate.bias", ff)
        w.add(p + "ffn_up.bias", ff)
        w.add(p + "ffn_down.bias", H)


def _experts(w, i, H, ff_exp, n_exp, shexp=0, shexp_gate=False, probs_bias=False):
    p = f"blk.{i}."
    w.add(p + "ffn_gate_inp.weight", H, n_exp)
    w.add(p + "ffn_gate_exps.weight", H, ff_exp, n_exp)
    w.add(p + "ffn_up_exps.weight", H, ff_exp, n_exp)
    w.add(p + "ffn_down_exps.weight", ff_exp, H, n_exp)
    if probs_bias:
        w.add(p + "exp_probs_b.bias", n_exp)
    if shexp:
        if shexp_gate:
            w.add(p + "ffn_gate_inp_shexp.weight", H)
        w.add(p + "ffn_gate_shexp.weight", H, shexp)
        w.add(p + "ffn_up_shexp.weight", H, shexp)
        w.add(p + "ffn_down_shexp.weight", shexp, H)


def _dims(cfg):
    H = cfg["hidden_size"]
    nh = cfg["num_attention_heads"]
    tied = _get(cfg, "tie_word_embeddings", default=cfg.get("model_type") in _TIED_BY_DEFAULT)
    return (H, nh, _get(cfg, "num_key_value_heads", default=nh), _get(cfg, "head_dim", default=H // nh),
            cfg["num_hidden_layers"], cfg["vocab_size"], bool(tied),
            int(_get(cfg, "max_position_embeddings", default=4096)))


# ------------------------------------------------------------------ per architecture

def _llama_like(w, cfg, mt):
    """llama / mistral / mixtral / qwen2 / qwen3 / smollm3 / qwen2moe / qwen3moe."""
    H, nh, nkv, hd, L, V, tied, ctx = _dims(cfg)
    I = _get(cfg, "intermediate_size", default=0)
    moe = mt in ("mixtral", "qwen2_moe", "qwen3_moe")
    _common(w, cfg, L, H, nh, nkv, hd, I, ctx)
    w.kv("attention.layer_norm_rms_epsilon", float(_get(cfg, "rms_norm_eps", default=1e-6)))
    w.kv("rope.dimension_count", hd)
    w.kv("vocab_size", V)
    E = k = ff_exp = shexp = 0
    if moe:
        E = _get(cfg, "num_local_experts", "num_experts")
        k = cfg["num_experts_per_tok"]
        ff_exp = I if mt == "mixtral" else cfg["moe_intermediate_size"]
        w.kv("expert_count", E)
        w.kv("expert_used_count", k)
        if mt != "mixtral":
            w.kv("expert_feed_forward_length", ff_exp)
        if mt == "qwen2_moe":
            shexp = _get(cfg, "shared_expert_intermediate_size", default=0)
            w.kv("expert_shared_feed_forward_length", shexp)
    _embed_out(w, H, V, tied)
    if mt == "llama":
        qkv_bias = o_bias = bool(_get(cfg, "attention_bias", default=False))
    elif mt == "qwen2":
        qkv_bias, o_bias = True, False
    elif mt == "qwen2_moe":  # Qwen2MoeConfig.qkv_bias defaults to True; o_proj has none
        qkv_bias, o_bias = bool(_get(cfg, "qkv_bias", default=True)), False
    else:
        qkv_bias = o_bias = bool(_get(cfg, "attention_bias", default=False)) and mt not in ("mistral", "mixtral")
    qk = hd if mt in ("qwen3", "qwen3_moe") else 0
    for i in range(L):
        w.add(f"blk.{i}.attn_norm.weight", H)
        _attn(w, i, H, nh * hd, nkv * hd, nkv * hd, nh * hd, qkv_bias, o_bias, qk)
        w.add(f"blk.{i}.ffn_norm.weight", H)
        if moe:
            _experts(w, i, H, ff_exp, E, shexp, shexp_gate=bool(shexp))
        else:
            _ffn(w, i, H, I, bias=mt == "llama" and bool(_get(cfg, "mlp_bias", default=False)))
    if mt == "llama" and str(_rope(cfg).get("rope_type", "")).lower() == "llama3":
        w.add("rope_freqs.weight", hd // 2)  # conversion/llama.py generate_extra_tensors (Llama 3 rope scaling)


def _deepseek2(w, cfg, mt):
    H, nh, _, _, L, V, tied, ctx = _dims(cfg)
    I = cfg["intermediate_size"]
    q_rank = _get(cfg, "q_lora_rank", default=0) or 0
    kv_rank = _get(cfg, "kv_lora_rank", default=512)
    rope, nope, vd = cfg["qk_rope_head_dim"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    E = _get(cfg, "n_routed_experts", default=None)
    first_dense = _get(cfg, "first_k_dense_replace", default=L if E is None else 0)
    ff_exp = _get(cfg, "moe_intermediate_size", "intermediate_size")
    n_shared = _get(cfg, "n_shared_experts", default=0) or 0
    # conversion/deepseek.py set_gguf_parameters: MLA stored as MQA with one KV head of kv_lora_rank + rope
    _common(w, cfg, L, H, nh, 1, 0, I, ctx)
    w.kv("attention.key_length", kv_rank + rope)
    w.kv("attention.value_length", kv_rank)
    w.kv("attention.key_length_mla", nope + rope)
    w.kv("attention.value_length_mla", vd)
    w.kv("attention.kv_lora_rank", kv_rank)
    if q_rank:
        w.kv("attention.q_lora_rank", q_rank)
    w.kv("attention.layer_norm_rms_epsilon", float(_get(cfg, "rms_norm_eps", default=1e-6)))
    w.kv("leading_dense_block_count", first_dense)
    w.kv("vocab_size", V)
    w.kv("expert_feed_forward_length", ff_exp)
    if E:
        w.kv("expert_count", E)
        w.kv("expert_used_count", cfg["num_experts_per_tok"])
    w.kv("expert_shared_count", n_shared)
    w.kv("rope.dimension_count", rope)
    _embed_out(w, H, V, tied)
    probs_b = mt == "deepseek_v3"  # e_score_correction_bias → exp_probs_b
    for i in range(L):
        p = f"blk.{i}."
        w.add(p + "attn_norm.weight", H)
        if q_rank:
            w.add(p + "attn_q_a_norm.weight", q_rank)
            w.add(p + "attn_q_a.weight", H, q_rank)
            w.add(p + "attn_q_b.weight", q_rank, nh * (nope + rope))
        else:
            w.add(p + "attn_q.weight", H, nh * (nope + rope))
        w.add(p + "attn_kv_a_norm.weight", kv_rank)
        w.add(p + "attn_kv_a_mqa.weight", H, kv_rank + rope)
        # kv_b split for the absorption optimisation (deepseek.py modify_tensors): k_b transposed, v_b
        w.add(p + "attn_k_b.weight", nope, kv_rank, nh)
        w.add(p + "attn_v_b.weight", kv_rank, vd, nh)
        w.add(p + "attn_output.weight", nh * vd, H)
        w.add(p + "ffn_norm.weight", H)
        if i < first_dense:
            _ffn(w, i, H, I)
        else:
            _experts(w, i, H, ff_exp, E, ff_exp * n_shared, probs_bias=probs_b)


def _gpt_oss(w, cfg, mt):
    H, nh, nkv, hd, L, V, tied, ctx = _dims(cfg)
    E, ff = cfg["num_local_experts"], cfg["intermediate_size"]
    _common(w, cfg, L, H, nh, nkv, hd, ff, ctx)
    w.kv("attention.layer_norm_rms_epsilon", float(_get(cfg, "rms_norm_eps", default=1e-5)))
    w.kv("rope.dimension_count", hd)
    w.kv("expert_count", E)
    w.kv("expert_used_count", _get(cfg, "num_experts_per_tok", "experts_per_token"))
    w.kv("expert_feed_forward_length", ff)
    w.kv("attention.sliding_window", cfg["sliding_window"])
    w.kv("vocab_size", V)
    _embed_out(w, H, V, False)
    exp_type = "MXFP4" if (cfg.get("quantization_config") or {}).get("quant_method") == "mxfp4" else None
    for i in range(L):
        p = f"blk.{i}."
        w.add(p + "attn_norm.weight", H)
        w.add(p + "post_attention_norm.weight", H)
        _attn(w, i, H, nh * hd, nkv * hd, nkv * hd, nh * hd, True, True)
        w.add(p + "attn_sinks.weight", nh)
        w.add(p + "ffn_gate_inp.weight", H, E)
        w.add(p + "ffn_gate_inp.bias", E)
        for name, shape in (("ffn_gate_exps", (H, ff, E)), ("ffn_up_exps", (H, ff, E)), ("ffn_down_exps", (ff, H, E))):
            w.add(p + name + ".weight", *shape, ftype=exp_type)  # gpt_oss.py repack_mxfp4: experts kept MXFP4
        w.add(p + "ffn_gate_exps.bias", ff, E)
        w.add(p + "ffn_up_exps.bias", ff, E)
        w.add(p + "ffn_down_exps.bias", H, E)


def _gemma(w, cfg, mt):
    H, nh, nkv, hd, L, V, _, ctx = _dims(cfg)
    I = cfg["intermediate_size"]
    _common(w, cfg, L, H, nh, nkv, 0, I, ctx)
    w.kv("attention.key_length", hd)
    w.kv("attention.value_length", hd)
    w.kv("attention.layer_norm_rms_epsilon", float(_get(cfg, "rms_norm_eps", default=1e-6)))
    w.kv("vocab_size", V)
    if _get(cfg, "sliding_window"):
        w.kv("attention.sliding_window", cfg["sliding_window"])
    lt = cfg.get("layer_types")
    if lt and mt != "gemma2":  # gemma.py writes the pattern from layer_types where the config has them
        w.kv("attention.sliding_window_pattern", [t == "sliding_attention" for t in lt[:L]])
    _embed_out(w, H, V, True)  # Gemma ties the output to token_embd (no output.weight in the file)
    for i in range(L):
        p = f"blk.{i}."
        w.add(p + "attn_norm.weight", H)
        _attn(w, i, H, nh * hd, nkv * hd, nkv * hd, nh * hd, qk_norm=hd if mt != "gemma2" else 0)
        w.add(p + "post_attention_norm.weight", H)
        w.add(p + "ffn_norm.weight", H)
        _ffn(w, i, H, I)
        w.add(p + "post_ffw_norm.weight", H)


def _glm4(w, cfg, mt):
    H, nh, nkv, hd, L, V, tied, ctx = _dims(cfg)
    I = cfg["intermediate_size"]
    _common(w, cfg, L, H, nh, nkv, hd, I, ctx)
    w.kv("attention.layer_norm_rms_epsilon", float(_get(cfg, "rms_norm_eps", default=1e-5)))
    w.kv("rope.dimension_count", int(hd * _rope(cfg).get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.5))))
    w.kv("vocab_size", V)
    _embed_out(w, H, V, tied)
    bias = bool(_get(cfg, "attention_bias", default=True))
    for i in range(L):
        p = f"blk.{i}."
        w.add(p + "attn_norm.weight", H)
        _attn(w, i, H, nh * hd, nkv * hd, nkv * hd, nh * hd, bias_qkv=bias)
        w.add(p + "post_attention_norm.weight", H)
        w.add(p + "ffn_norm.weight", H)
        _ffn(w, i, H, I, fused_up=True)  # gate_up_proj stays fused: ffn_up {n_embd, 2 n_ff} (src/models/glm4.cpp)
        w.add(p + "post_ffw_norm.weight", H)


def _phi3(w, cfg, mt):
    H, nh, nkv, hd, L, V, tied, ctx = _dims(cfg)
    I = cfg["intermediate_size"]
    _common(w, cfg, L, H, nh, nkv, 0, I, ctx)
    w.kv("attention.layer_norm_rms_epsilon", float(_get(cfg, "rms_norm_eps", default=1e-5)))
    rot = int(hd * float(_get(cfg, "partial_rotary_factor", default=1.0)))
    w.kv("rope.dimension_count", rot)
    w.kv("attention.sliding_window", _get(cfg, "sliding_window", default=0))
    w.kv("vocab_size", V)
    _embed_out(w, H, V, tied)
    for i in range(L):
        p = f"blk.{i}."
        w.add(p + "attn_norm.weight", H)
        _attn(w, i, H, nh * hd, nkv * hd, nkv * hd, nh * hd, fused=True)
        w.add(p + "ffn_norm.weight", H)
        _ffn(w, i, H, I, fused_up=True)
    if str(_rope(cfg).get("type", _rope(cfg).get("rope_type", ""))).lower() in ("longrope", "su"):
        w.add("rope_factors_long.weight", rot // 2)  # phi.py generate_extra_tensors
        w.add("rope_factors_short.weight", rot // 2)


def _gpt2(w, cfg, mt):
    H = _get(cfg, "n_embd", "hidden_size")
    L = _get(cfg, "n_layer", "num_hidden_layers")
    nh = _get(cfg, "n_head", "num_attention_heads")
    V = cfg["vocab_size"]
    P = _get(cfg, "n_positions", "n_ctx", "max_position_embeddings")
    I = _get(cfg, "n_inner", default=None) or 4 * H
    kv = 1 if mt == "gpt_bigcode" and _get(cfg, "multi_query", default=True) else nh
    _common(w, cfg, L, H, nh, kv, 0, I, P)
    w.kv("attention.layer_norm_epsilon", float(_get(cfg, "layer_norm_epsilon", default=1e-5)))
    w.kv("vocab_size", V)
    w.add("token_embd.weight", H, V)
    w.add("position_embd.weight", H, P)
    w.add("output_norm.weight", H)
    w.add("output_norm.bias", H)
    hd = H // nh
    for i in range(L):
        p = f"blk.{i}."
        w.add(p + "attn_norm.weight", H)
        w.add(p + "attn_norm.bias", H)
        _attn(w, i, H, H, kv * hd, kv * hd, H, True, True, fused=True)
        w.add(p + "ffn_norm.weight", H)
        w.add(p + "ffn_norm.bias", H)
        _ffn(w, i, H, I, bias=True, gated=False)


def _gptneox(w, cfg, mt):
    H, nh, _, _, L, V, tied, ctx = _dims(cfg)
    I = cfg["intermediate_size"]
    _common(w, cfg, L, H, nh, nh, 0, I, ctx)
    w.kv("rope.dimension_count", int(H // nh * float(_get(cfg, "rotary_pct", "partial_rotary_factor", default=0.25))))
    w.kv("use_parallel_residual", bool(_get(cfg, "use_parallel_residual", default=True)))
    w.kv("attention.layer_norm_epsilon", float(_get(cfg, "layer_norm_eps", default=1e-5)))
    w.kv("vocab_size", V)
    w.add("token_embd.weight", H, V)
    w.add("output_norm.weight", H)
    w.add("output_norm.bias", H)
    w.add("output.weight", H, V)
    for i in range(L):
        p = f"blk.{i}."
        w.add(p + "attn_norm.weight", H)
        w.add(p + "attn_norm.bias", H)
        _attn(w, i, H, H, H, H, H, True, True, fused=True)
        w.add(p + "ffn_norm.weight", H)
        w.add(p + "ffn_norm.bias", H)
        _ffn(w, i, H, I, bias=True, gated=False)


def _nemotron_h(w, cfg, mt):
    H, nh, nkv, _, L, V, tied, ctx = _dims(cfg)
    hd = _get(cfg, "attention_head_dim", "head_dim", default=H // nh)
    pattern = cfg["hybrid_override_pattern"][:L]
    I = cfg["intermediate_size"]
    d_inner = cfg["mamba_num_heads"] * cfg["mamba_head_dim"]
    d_state, n_group, n_ssm_head = cfg["ssm_state_size"], cfg["n_groups"], cfg["mamba_num_heads"]
    d_conv = cfg["conv_kernel"]
    # conversion/nemotron.py: per-layer head counts (0 off attention layers) and n_ff (0 off MLP layers)
    w.kv("context_length", ctx)
    w.kv("embedding_length", H)
    w.kv("block_count", L)
    w.kv("feed_forward_length", [I if c == "-" else 0 for c in pattern])
    w.kv("attention.head_count", nh)
    w.kv("attention.head_count_kv", [nkv if c == "*" else 0 for c in pattern])
    w.kv("attention.key_length", hd)
    w.kv("attention.value_length", hd)
    w.kv("attention.layer_norm_rms_epsilon", float(_get(cfg, "rms_norm_eps", "layer_norm_epsilon", default=1e-5)))
    w.kv("attention.layer_norm_epsilon", float(_get(cfg, "layer_norm_epsilon", default=1e-5)))
    w.kv("ssm.conv_kernel", d_conv)
    w.kv("ssm.inner_size", d_inner)
    w.kv("ssm.state_size", d_state)
    w.kv("ssm.time_step_rank", n_ssm_head)
    w.kv("ssm.group_count", n_group)
    w.kv("rope.dimension_count", hd)
    w.kv("vocab_size", V)
    _embed_out(w, H, V, tied)
    conv_bias = bool(_get(cfg, "use_conv_bias", default=True))
    for i, c in enumerate(pattern):
        p = f"blk.{i}."
        w.add(p + "attn_norm.weight", H)
        if c == "M":
            w.add(p + "ssm_in.weight", H, 2 * d_inner + 2 * n_group * d_state + n_ssm_head)
            w.add(p + "ssm_conv1d.weight", d_conv, d_inner + 2 * n_group * d_state)
            if conv_bias:
                w.add(p + "ssm_conv1d.bias", d_inner + 2 * n_group * d_state)
            w.add(p + "ssm_dt.bias", n_ssm_head)
            w.add(p + "ssm_a", 1, n_ssm_head)
            w.add(p + "ssm_d", 1, n_ssm_head)
            w.add(p + "ssm_norm.weight", d_inner // n_group, n_group)
            w.add(p + "ssm_out.weight", d_inner, H)
        elif c == "*":
            _attn(w, i, H, nh * hd, nkv * hd, nkv * hd, nh * hd, bias_o=bool(_get(cfg, "attention_bias", default=False)))
        else:
            _ffn(w, i, H, I, bias=bool(_get(cfg, "mlp_bias", default=False)), gated=False)


def _qwen_hybrid(w, cfg, mt):
    """qwen3next / qwen35 / qwen35moe: gated-delta-net layers and gated full attention every few layers."""
    H, nh, nkv, hd, L, V, tied, ctx = _dims(cfg)
    moe = mt in ("qwen3_next", "qwen3_5_moe_text")
    I = _get(cfg, "intermediate_size", default=0)
    interval = _get(cfg, "full_attention_interval", default=4)
    lt = cfg.get("layer_types")
    recr = [t == "linear_attention" for t in lt[:L]] if lt else [(i + 1) % interval != 0 for i in range(L)]
    k_heads, v_heads = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    head_k, head_v = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"]
    d_conv = cfg["linear_conv_kernel_dim"]
    _common(w, cfg, L, H, nh, nkv, hd, I, ctx)
    w.kv("attention.layer_norm_rms_epsilon", float(_get(cfg, "rms_norm_eps", default=1e-6)))
    w.kv("rope.dimension_count", int(hd * float(_rope(cfg).get("partial_rotary_factor",
                                                                cfg.get("partial_rotary_factor", 0.25)))))
    w.kv("ssm.conv_kernel", d_conv)
    w.kv("ssm.state_size", head_k)
    w.kv("ssm.group_count", k_heads)
    w.kv("ssm.time_step_rank", v_heads)
    w.kv("ssm.inner_size", head_v * v_heads)
    w.kv("full_attention_interval", interval)
    if lt:
        w.kv("attention.recurrent_layers", recr)
    if mt != "qwen3_next":  # Qwen3.5: interleaved M-RoPE; its sections are required (conversion/qwen.py L636-649)
        sections = list(_rope(cfg).get("mrope_section") or [11, 11, 10])
        w.kv("rope.dimension_sections", sections + [0] * (4 - len(sections)))
    w.kv("vocab_size", V)
    E = ff_exp = shexp = 0
    if moe:
        E, ff_exp = cfg["num_experts"], cfg["moe_intermediate_size"]
        shexp = _get(cfg, "shared_expert_intermediate_size", default=0)
        w.kv("expert_count", E)
        w.kv("expert_used_count", cfg["num_experts_per_tok"])
        w.kv("expert_feed_forward_length", ff_exp)
        w.kv("expert_shared_feed_forward_length", shexp)
    _embed_out(w, H, V, tied)
    key_dim, value_dim = head_k * k_heads, head_v * v_heads
    for i in range(L):
        p = f"blk.{i}."
        w.add(p + "attn_norm.weight", H)
        w.add(p + "post_attention_norm.weight", H)
        if not recr[i]:
            _attn(w, i, H, 2 * nh * hd, nkv * hd, nkv * hd, nh * hd, qk_norm=hd)  # q carries the output gate
        else:
            w.add(p + "attn_qkv.weight", H, 2 * key_dim + value_dim)
            w.add(p + "attn_gate.weight", H, value_dim)
            w.add(p + "ssm_conv1d.weight", d_conv, 2 * key_dim + value_dim)
            w.add(p + "ssm_dt.bias", v_heads)
            w.add(p + "ssm_a", v_heads)
            if mt == "qwen3_next":
                w.add(p + "ssm_ba.weight", H, 2 * v_heads)
            else:
                w.add(p + "ssm_beta.weight", H, v_heads)
                w.add(p + "ssm_alpha.weight", H, v_heads)
            w.add(p + "ssm_norm.weight", head_v)
            w.add(p + "ssm_out.weight", value_dim, H)
        if moe:
            _experts(w, i, H, ff_exp, E, shexp, shexp_gate=True)
        else:
            _ffn(w, i, H, I)


_CONVERTERS = {
    "llama": _llama_like, "mistral": _llama_like, "mixtral": _llama_like, "qwen2": _llama_like,
    "qwen3": _llama_like, "smollm3": _llama_like, "qwen2_moe": _llama_like, "qwen3_moe": _llama_like,
    "deepseek_v2": _deepseek2, "deepseek_v3": _deepseek2, "gpt_oss": _gpt_oss, "gemma2": _gemma,
    "gemma3": _gemma, "gemma3_text": _gemma, "glm4": _glm4, "phi3": _phi3, "gpt2": _gpt2, "gpt_bigcode": _gpt2,
    "gpt_neox": _gptneox, "nemotron_h": _nemotron_h, "qwen3_next": _qwen_hybrid, "qwen3_5_text": _qwen_hybrid,
    "qwen3_5_moe_text": _qwen_hybrid,
}
CONVERTED_MODEL_TYPES = tuple(sorted(_CONVERTERS))


def text_config(cfg):
    """The language model's config of a multimodal wrapper (Gemma 3's text_config), else cfg itself."""
    tc = cfg.get("text_config")
    if isinstance(tc, dict) and tc.get("model_type") and cfg.get("model_type") not in _CONVERTERS:
        out = dict(tc)
        out.setdefault("torch_dtype", cfg.get("torch_dtype") or cfg.get("dtype"))
        return out
    return cfg


def convert_config(cfg, source_dtype=None, name="config"):
    """The GGUFModel llama.cpp's converter would write for a config.json (F16/BF16/F32 per `source_dtype`)."""
    cfg = text_config({k: v for k, v in cfg.items() if v is not None})
    mt = cfg.get("model_type")
    if mt in NOT_CONVERTED:
        raise ValueError(f"engine llama.cpp: model_type {mt!r}: {NOT_CONVERTED[mt]}")
    if mt not in _CONVERTERS:
        raise ValueError(f"engine llama.cpp: model_type {mt!r} has no GGUF conversion here (converted: "
                         f"{', '.join(CONVERTED_MODEL_TYPES)}); give a GGUF file with --model path.gguf")
    dt = str(source_dtype or _get(cfg, "torch_dtype", "dtype", default="bfloat16")).replace("torch.", "")
    wtype = _SRC_TYPES.get({"bfloat16": "bf16", "float16": "f16", "float32": "f32"}.get(dt, dt), "BF16")
    arch = HF_TO_GGUF_ARCH[mt]
    w = _Writer(arch, wtype)
    try:
        _CONVERTERS[mt](w, cfg, mt)
    except KeyError as e:
        raise ValueError(f"engine llama.cpp: {name}: config.json for model_type {mt!r} lacks {e.args[0]!r}") from None
    meta = {"general.architecture": arch, "general.file_type": {"F32": 0, "F16": 1, "BF16": 32}[wtype],
            "general.name": name}
    meta.update(w.meta)
    return GGUFModel(arch=arch, metadata=meta, tensors=tuple(w.tensors), source=f"convert: {name}")
