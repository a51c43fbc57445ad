"""Models whose config.json needs remote code, read without running it: each mapped to the family it is.

A Hub repo whose `config.json` has an `auto_map` ships its own modelling file, which
transformers runs only with `trust_remote_code=True`. vramlab runs none of it: for the popular
ones, the module tree below mirrors the modelling file (read once, cited per builder) — every
parameter and buffer by its own module name, so LoRA targets, quantization and the weight bytes
follow the remote code — and each module says the Llama role it plays (`Tensor.role`), so the
activation, KV-cache and logits rules of the Llama family apply. What the remote code does beyond
that family (ChatGLM's K/V copies to every head, Baichuan-13B's ALiBi mask, Qwen's logn scaling)
is named where it costs memory and otherwise left to a note (formulas/predict.py).

A remote-code config outside this table is refused in one line that names what is missing.
Sources (GitHub mirrors of the Hub repos' files; commit : file, class):
  qwen       Qwen/Qwen-7B       zhangningboo/Qwen-7B@ffe04dd5 : modeling_qwen.py QWenAttention (l. 247-294),
             QWenMLP (558-568), QWenBlock (578), QWenModel (693-722), QWenLMHeadModel (980), RotaryEmbedding (1278)
  chatglm    THUDM/chatglm3-6b  czk1997/chatglm3-copy@456aa875 : modeling_chatglm.py RotaryEmbedding (125),
             SelfAttention (313-345), MLP (459-488), GLMBlock (522), GLMTransformer (600), Embedding (713),
             ChatGLMModel (754-757). GLM-4's remote configs (THUDM/glm-4-9b-chat) carry the same fields plus
             rope_ratio (a scale of RoPE's base); their modelling file was not read: the ChatGLM3 tree is assumed
  internlm2  internlm/internlm2-chat-7b  NanSang2000/S1mpleAgent@4275caa2 : modeling_internlm2.py
             InternLM2RotaryEmbedding (140-155), InternLM2MLP (241-243), InternLM2Attention (286-313),
             InternLM2DecoderLayer (601), InternLM2Model (794), InternLM2ForCausalLM (976); the fused wqkv's
             layout: InternLM/InternLM tools/convert2llama.py
  baichuan   baichuan-inc/Baichuan2-13B-Chat  jrd77/Baichuan2-13B-Chat@d022d726 : modeling_baichuan.py MLP (101-103),
             BaichuanAttention (123-126, ALiBi, no rotary), BaichuanModel (296-354, the future_mask buffer),
             NormHead (504); the 7B's RotaryEmbedding keeps cos/sin caches as plain fp32 attributes per layer
"""

from .shapes import ModelShape, Tensor, UnsupportedModelError, _config_dtype, _get, _norm


def _lin(t, name, module, out_f, in_f, count, bias, role=""):
    """A linear's weight (and bias) under the remote code's module name, with its Llama role."""
    t.append(Tensor(f"{name}.weight", "linear", (out_f, in_f), count, module, role=role))
    if bias:
        t.append(Tensor(f"{name}.bias", "bias", (out_f,), count, module, role=role))


def _need(cfg, name, mt, *keys):
    """cfg[key] for each key; a missing one is the one line naming it."""
    out = []
    for k in keys:
        names = k if isinstance(k, tuple) else (k,)
        v = _get(cfg, *names)
        if v is None:
            raise UnsupportedModelError(f"{name}: config.json for the remote-code model_type {mt!r} lacks the field "
                                        f"{names[0]!r}")
        out.append(v)
    return out


def _flag_dtype(cfg):
    """Qwen 1.0 takes its precision from bf16/fp16/fp32 flags, bf16 where the GPU has it (modeling_qwen.py l. 936-947)."""
    if cfg.get("torch_dtype") or cfg.get("dtype"):
        return _config_dtype(cfg)
    return "fp16" if cfg.get("fp16") else "fp32" if cfg.get("fp32") else "bf16"


def _qwen(cfg, name):
    """Qwen 1.0: QWenLMHeadModel's tree (modeling_qwen.py, see the module docstring)."""
    H, nH, L, I, V = _need(cfg, name, "qwen", "hidden_size", "num_attention_heads", "num_hidden_layers",
                           "intermediate_size", "vocab_size")
    hd = _get(cfg, "kv_channels", default=H // nH)
    P = hd * nH  # projection_size
    ff = I // 2  # QWenMLP: w1 and w2 are intermediate_size // 2 wide
    bias = not _get(cfg, "no_bias", default=True)
    rot = hd if _get(cfg, "rotary_pct", default=1.0) == 1.0 else int(hd * cfg["rotary_pct"])
    t = []
    _lin(t, "h.attn.c_attn", "c_attn", 3 * P, H, L, True, role="q_proj")  # always biased; q, k, v in one
    _lin(t, "h.attn.c_proj", "c_proj", P, H, L, bias, role="o_proj")  # nn.Linear(hidden_size, projection_size)
    _lin(t, "h.mlp.w1", "w1", ff, H, L, bias, role="up_proj")  # a1 * silu(a2): w1 is the up projection
    _lin(t, "h.mlp.w2", "w2", ff, H, L, bias, role="gate_proj")
    _lin(t, "h.mlp.c_proj", "c_proj", H, ff, L, bias, role="down_proj")
    _norm(t, "h.ln_1", H, L, False)
    _norm(t, "h.ln_2", H, L, False)
    t.append(Tensor("wte.weight", "embedding", (V, H), 1, "wte"))
    _norm(t, "ln_f", H, 1, False)
    t.append(Tensor("lm_head.weight", "linear", (V, H), 1, "lm_head"))  # never tied
    buffers = (
        # QWenAttention: logn scaling factors for positions 1..32767 and masked_bias, non-persistent, per layer,
        # in the model dtype (the model is cast to it, l. 982-987)
        Tensor("h.attn.logn_tensor", "buffer", (1, 32767, 1, 1), L),
        Tensor("h.attn.masked_bias", "buffer", (), L),
        Tensor("rotary_emb.inv_freq", "buffer", (rot // 2,), 1),
    )
    return dict(family="llama", hidden=H, n_layers=L, n_heads=nH, n_kv_heads=nH, head_dim=hd, v_head_dim=hd,
                intermediate=ff, vocab=V, tie_embeddings=False, rotary_dim=rot,
                max_positions=int(_get(cfg, "seq_length", "max_position_embeddings", default=0)),
                attn_dropout=float(_get(cfg, "attn_dropout_prob", default=0.0)),
                embd_dropout=float(_get(cfg, "emb_dropout_prob", default=0.0)),
                config_dtype=_flag_dtype(cfg), tensors=t, buffers=buffers,
                remote_code="modeling_qwen.py, Qwen 1.0", lora_defaults=())


def _chatglm(cfg, name):
    """ChatGLM2/3 and GLM-4: ChatGLMForConditionalGeneration's tree (modeling_chatglm.py)."""
    if "ffn_hidden_size" not in cfg and ("inner_hidden_size" in cfg or "position_encoding_2d" in cfg):
        raise UnsupportedModelError(f"{name}: a ChatGLM-6B (first generation) config (inner_hidden_size, 2-D position "
                                    "encoding, GeLU) is not mapped: vramlab maps ChatGLM2/3 and GLM-4's remote code "
                                    "(ffn_hidden_size, multi_query_group_num, padded_vocab_size)")
    if _get(cfg, "pre_seq_len"):
        raise UnsupportedModelError(f"{name}: config.json pre_seq_len {cfg['pre_seq_len']}: ChatGLM's P-tuning v2 "
                                    "prefix encoder is not modelled; predict the config without it")
    H, nH, L, I, V = _need(cfg, name, "chatglm", "hidden_size", "num_attention_heads", ("num_layers", "num_hidden_layers"),
                           "ffn_hidden_size", ("padded_vocab_size", "vocab_size"))
    hd = _get(cfg, "kv_channels", default=H // nH)
    P = hd * nH
    groups = _get(cfg, "multi_query_group_num", default=nH) if _get(cfg, "multi_query_attention") else nH
    qkv = P + 2 * hd * groups
    bias = bool(_get(cfg, "add_bias_linear", default=False))
    rms = bool(_get(cfg, "rmsnorm", default=True))
    t = []
    _lin(t, "layers.self_attention.query_key_value", "query_key_value", qkv, H, L,
         bias or bool(_get(cfg, "add_qkv_bias", default=False)), role="q_proj")
    _lin(t, "layers.self_attention.dense", "dense", H, P, L, bias, role="o_proj")
    _lin(t, "layers.mlp.dense_h_to_4h", "dense_h_to_4h", 2 * I, H, L, bias, role="gate_proj")  # gate and up in one
    _lin(t, "layers.mlp.dense_4h_to_h", "dense_4h_to_h", H, I, L, bias, role="down_proj")
    _norm(t, "layers.input_layernorm", H, L, not rms)
    _norm(t, "layers.post_attention_layernorm", H, L, not rms)
    t.append(Tensor("embedding.word_embeddings.weight", "embedding", (V, H), 1, "embed_tokens"))
    if _get(cfg, "post_layer_norm", default=True):
        _norm(t, "final_layernorm", H, 1, not rms)
    t.append(Tensor("output_layer.weight", "linear", (V, H), 1, "lm_head"))  # never tied
    rot = hd // 2  # RotaryEmbedding(rotary_dim // 2): half of every head is rotated
    buffers = (Tensor("rotary_pos_emb.inv_freq", "buffer", (rot // 2,), 1),)  # persistent, in the model dtype
    return dict(family="llama", hidden=H, n_layers=L, n_heads=nH, n_kv_heads=groups, head_dim=hd, v_head_dim=hd,
                intermediate=I, vocab=V, tie_embeddings=False, rotary_dim=rot, norm="rms" if rms else "layer",
                max_positions=int(_get(cfg, "seq_length", default=0)),
                attn_dropout=float(_get(cfg, "attention_dropout", default=0.0)),
                resid_dropout=float(_get(cfg, "hidden_dropout", default=0.0)),
                config_dtype=_config_dtype(cfg) if _get(cfg, "torch_dtype", "dtype") else "bf16",
                tensors=t, buffers=buffers, remote_code="modeling_chatglm.py, ChatGLM2/3 and GLM-4",
                lora_defaults=("query_key_value",))  # peft's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING


def _internlm2(cfg, name):
    """InternLM2: InternLM2ForCausalLM's tree (modeling_internlm2.py)."""
    H, nH, L, I, V = _need(cfg, name, "internlm2", "hidden_size", "num_attention_heads", "num_hidden_layers",
                           "intermediate_size", "vocab_size")
    nKV = _get(cfg, "num_key_value_heads", default=nH)
    hd = H // nH
    bias = bool(_get(cfg, "bias", default=False))
    P = int(_get(cfg, "max_position_embeddings", default=2048))
    t = []
    _lin(t, "layers.attention.wqkv", "wqkv", (nH + 2 * nKV) * hd, H, L, bias, role="q_proj")
    _lin(t, "layers.attention.wo", "wo", H, nH * hd, L, bias, role="o_proj")
    _lin(t, "layers.feed_forward.w1", "w1", I, H, L, False, role="gate_proj")  # convert2llama.py: w1 → gate_proj
    _lin(t, "layers.feed_forward.w3", "w3", I, H, L, False, role="up_proj")
    _lin(t, "layers.feed_forward.w2", "w2", H, I, L, False, role="down_proj")
    _norm(t, "layers.attention_norm", H, L, False)
    _norm(t, "layers.ffn_norm", H, L, False)
    t.append(Tensor("tok_embeddings.weight", "embedding", (V, H), 1, "embed_tokens"))
    _norm(t, "norm", H, 1, False)
    tie = bool(_get(cfg, "tie_word_embeddings", default=False))
    if not tie:
        t.append(Tensor("output.weight", "linear", (V, H), 1, "lm_head"))
    buffers = (
        # every attention layer builds its own rotary cache of max_position_embeddings positions (non-persistent,
        # in the dtype the model is built in) and inv_freq (fp32)
        Tensor("layers.attention.rotary_emb.cos_cached", "buffer", (P, hd), L),
        Tensor("layers.attention.rotary_emb.sin_cached", "buffer", (P, hd), L),
        Tensor("layers.attention.rotary_emb.inv_freq", "buffer", (hd // 2,), L, dtype="fp32"),
    )
    return dict(family="llama", hidden=H, n_layers=L, n_heads=nH, n_kv_heads=nKV, head_dim=hd, v_head_dim=hd,
                intermediate=I, vocab=V, tie_embeddings=tie, rotary_dim=hd, max_positions=P,
                attn_dropout=float(_get(cfg, "attention_dropout", default=0.0)), config_dtype=_config_dtype(cfg),
                tensors=t, buffers=buffers, remote_code="modeling_internlm2.py", lora_defaults=())


def _baichuan(cfg, name):
    """Baichuan 2: BaichuanForCausalLM's tree; 13B-style configs (no max_position_embeddings) use ALiBi."""
    H, nH, L, I, V = _need(cfg, name, "baichuan", "hidden_size", "num_attention_heads", "num_hidden_layers",
                           "intermediate_size", "vocab_size")
    hd = H // nH
    alibi = "max_position_embeddings" not in cfg  # the 13B configs: ALiBi, no rotary (model_max_length only)
    t = []
    _lin(t, "layers.self_attn.W_pack", "W_pack", 3 * H, H, L, False, role="q_proj")
    _lin(t, "layers.self_attn.o_proj", "o_proj", H, H, L, False)
    _lin(t, "layers.mlp.gate_proj", "gate_proj", I, H, L, False)
    _lin(t, "layers.mlp.up_proj", "up_proj", I, H, L, False)
    _lin(t, "layers.mlp.down_proj", "down_proj", H, I, L, False)
    _norm(t, "layers.input_layernorm", H, L, False)
    _norm(t, "layers.post_attention_layernorm", H, L, False)
    t.append(Tensor("embed_tokens.weight", "embedding", (V, H), 1, "embed_tokens"))
    _norm(t, "norm", H, 1, False)
    t.append(Tensor("lm_head.weight", "linear", (V, H), 1, "lm_head"))  # NormHead: a (vocab, hidden) Parameter
    if alibi:
        P = int(_get(cfg, "model_max_length", default=4096))
        # BaichuanModel.get_alibi_mask, eval mode: a (heads, P, P) future_mask in the model dtype, built on the
        # first forward and kept (rebuilt larger past P)
        buffers = (Tensor("future_mask", "buffer", (nH, P, P), 1),)
        rot = 0
    else:
        P = int(cfg["max_position_embeddings"])
        # RotaryEmbedding keeps inv_freq and cos/sin caches as plain fp32 attributes, one set per layer, moved to
        # the GPU on the first forward
        buffers = (
            Tensor("layers.self_attn.rotary_emb.cos_cached", "buffer", (1, 1, P, hd), L, dtype="fp32"),
            Tensor("layers.self_attn.rotary_emb.sin_cached", "buffer", (1, 1, P, hd), L, dtype="fp32"),
            Tensor("layers.self_attn.rotary_emb.inv_freq", "buffer", (hd // 2,), L, dtype="fp32"),
        )
        rot = hd
    return dict(family="llama", hidden=H, n_layers=L, n_heads=nH, n_kv_heads=nH, head_dim=hd, v_head_dim=hd,
                intermediate=I, vocab=V, tie_embeddings=False, rotary_dim=rot, max_positions=P,
                config_dtype=_config_dtype(cfg), tensors=t, buffers=buffers,
                remote_code="modeling_baichuan.py, Baichuan 13B (ALiBi)" if alibi else "modeling_baichuan.py, Baichuan 7B",
                lora_defaults=())


# model_type → builder. Each builds the module tree of the remote modelling file named above.
REMOTE_CODE = {
    "qwen": _qwen,
    "chatglm": _chatglm,
    "internlm2": _internlm2,
    "baichuan": _baichuan,
}


def needs_remote_code(cfg):
    """Whether config.json names modelling code of its own (an `auto_map`)."""
    return isinstance(cfg, dict) and isinstance(cfg.get("auto_map"), dict) and bool(cfg["auto_map"])


def _remote_class(cfg):
    am = cfg.get("auto_map") or {}
    return am.get("AutoModelForCausalLM") or am.get("AutoModel") or next(iter(am.values()), "?")


def unmapped_message(cfg, name):
    """The one line for a remote-code config vramlab does not map: what runs it, and what is missing."""
    mt = cfg.get("model_type")
    return (f"{name}: model_type {mt!r} needs the repo's remote code ({_remote_class(cfg)}), which vramlab does not run, "
            f"and is not one it maps to a family ({', '.join(sorted(REMOTE_CODE))}); its module tree (which tensors, "
            "how attention splits into query and KV heads) is defined only in that code. Pass the config of a "
            "transformers-native port of the model if one exists")


def shape_from_remote_config(cfg, name="config"):
    """A ModelShape for a remote-code config of a mapped model_type (REMOTE_CODE), without running its code."""
    mt = cfg.get("model_type")
    if mt not in REMOTE_CODE:
        raise UnsupportedModelError(unmapped_message(cfg, name))
    cfg = {k: v for k, v in cfg.items() if v is not None}
    for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "num_layers", "intermediate_size",
              "ffn_hidden_size", "vocab_size", "padded_vocab_size", "kv_channels", "multi_query_group_num",
              "num_key_value_heads", "max_position_embeddings", "model_max_length", "seq_length"):
        v = cfg.get(k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise UnsupportedModelError(f"{name}: config.json field {k}: {v!r} must be an integer ≥ 1")
    fields = REMOTE_CODE[mt](cfg, name)
    heads, kv = fields["n_heads"], fields["n_kv_heads"]
    if heads % kv:
        raise UnsupportedModelError(f"{name}: config.json has {heads} attention heads, not a multiple of its {kv} "
                                    "key/value heads")
    fields["tensors"] = tuple(fields["tensors"])
    return ModelShape(name=name, model_type=mt, **fields)


def check_spec(spec, shape):
    """SpecError for a workload whose memory the mapped remote code decides in a way vramlab does not model."""
    from .spec import SpecError

    if shape.model_type == "baichuan" and not shape.rotary_dim and spec.mode == "train":
        raise SpecError(f"--mode train: {shape.name} is Baichuan's 13B remote code, which builds a (heads, seq, seq) "
                        "ALiBi mask in every training forward (modeling_baichuan.py BaichuanModel.get_alibi_mask) that "
                        "vramlab does not model; --mode inference is predicted")


def notes(spec, shape):
    """What a prediction of a remote-code model assumes, one line each."""
    out = [f"{shape.model_type}: the modules of its remote code ({shape.remote_code}), read without running it; "
           "activations, KV cache and logits by the Llama-family rule on its sizes"]
    if shape.model_type == "chatglm" and shape.n_kv_heads < shape.n_heads:
        out.append("ChatGLM caches its multi-query groups but copies K and V to every query head before attention "
                   "(a per-layer temporary the Llama rule does not count)")
    if shape.model_type == "qwen" and spec.mode == "inference" and spec.seq + spec.gen > shape.max_positions:
        out.append(f"past seq_length {shape.max_positions:,} Qwen scales each layer's queries by log-n and stretches "
                   "RoPE (dynamic NTK) where the config enables them: query-sized temporaries not counted")
    if shape.model_type == "baichuan" and not shape.rotary_dim:
        out.append(f"buffers hold the ALiBi future_mask ({shape.n_heads} heads × {shape.max_positions:,}² positions) "
                   "Baichuan builds on the first forward and keeps")
    if shape.model_type in ("internlm2", "baichuan") and shape.rotary_dim:
        out.append(f"buffers hold a rotary cos/sin cache of {shape.max_positions:,} positions in every layer, as "
                   f"{shape.remote_code} builds them")
    return out
