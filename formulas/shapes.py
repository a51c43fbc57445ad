"""ModelShape: a model's architecture read from a Hugging Face config.json, down to every tensor.

The predictor needs more than a parameter count: quantization keeps some modules in
high precision, LoRA targets modules by name, tensor parallelism splits some tensors
and replicates others. So a shape carries an inventory of parameter tensors (name,
kind, shape, how many copies) built to mirror the transformers module tree of each
family exactly; the parameter count is the inventory's sum, and a test checks it
against transformers on the meta device for every shipped config.

Source: transformers/models/{llama,mistral,qwen2,qwen3,mixtral,qwen2_moe,qwen3_moe,
deepseek_v2,deepseek_v3,gpt2,opt,gpt_neox,gpt_bigcode}/modeling_*.py (v5.x).
"""

from dataclasses import dataclass, field

# model_type → family. A family decides the module tree and the activation terms.
FAMILIES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "mixtral": "moe",
    "qwen2_moe": "moe",
    "qwen3_moe": "moe",
    "deepseek_v2": "mla",
    "deepseek_v3": "mla",
    "gpt2": "gpt2",
    "opt": "opt",
    "gpt_neox": "gpt_neox",
    "gpt_bigcode": "gpt_bigcode",
}
SUPPORTED_MODEL_TYPES = tuple(sorted(FAMILIES))


INVENTORY_SCHEMA = 1  # version of the general inventory's JSON (harness/inventory.py writes it)


class UnsupportedModelError(ValueError):
    """A config whose architecture vramlab does not model."""


@dataclass(frozen=True)
class Tensor:
    """One parameter (or buffer) tensor of the model, repeated `count` times."""

    name: str  # generic path, e.g. "layers.self_attn.q_proj.weight"
    kind: str  # linear | bias | embedding | norm | router | experts | buffer
    shape: tuple  # one copy's shape; linear weights are (out_features, in_features)
    count: int = 1  # copies in the whole model (layers × experts …)
    module: str = ""  # leaf module name used by LoRA / quantization targeting, e.g. "q_proj"
    dtype: str = ""  # storage dtype forced by the model (e.g. "fp32" router); "" = model dtype
    role: str = ""  # a remote-code module's Llama counterpart (q_proj … down_proj) for the activation rules; "" = module

    @property
    def numel(self):
        """Elements in one copy."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def total_numel(self):
        """Elements over all copies."""
        return self.numel * self.count


@dataclass(frozen=True)
class CacheGroup:
    """Layers whose cache grows (or stays) alike: `count` layers of one cache kind.

    kind: full (every token kept) | sliding (transformers' DynamicSlidingWindowLayer; chunked attention
    uses the same class) | state (a fixed conv / recurrent state per sequence: linear attention, SSM) |
    hybrid (attention and a state in one layer: Falcon-H1) | none (the layer keeps nothing)."""

    kind: str
    count: int
    kv_per_token: int = 0  # key + value elements one token adds to one layer
    window: int = 0  # sliding / chunked: the window the layer attends to
    state_elems: int = 0  # conv + recurrent state elements per sequence per layer, in the compute dtype
    state_fp32_elems: int = 0  # state elements transformers keeps in fp32 whatever the compute dtype
    # state layers: what one such decoder layer (mixer and feed-forward) needs, read off the model at bf16
    # (harness/inventory.py `_probe_layers`): bytes per token and per sequence — the no-grad
    # working set, and the bytes saved for backward with trainable / frozen weights; () = not probed
    probe: tuple = ()  # (per token, per sequence, per layer) × (ws, saved, saved frozen), then the scan chunk
    # (0: none) to whose multiple a chunked scan pads each sequence
    moe_count: int = 0  # of `count`, layers whose feed-forward is a mixture of experts


@dataclass(frozen=True)
class ModelShape:
    """What the formulas need to know about a model; built by `shape_from_config`."""

    name: str  # catalog name or path it came from
    model_type: str  # config.json model_type
    family: str  # llama | moe | mla | gpt2 | opt | gpt_neox | gpt_bigcode
    hidden: int  # hidden_size (d_model)
    n_layers: int  # decoder layers
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (GQA: < n_heads; MQA: 1)
    head_dim: int  # per-head dimension of q and k (explicit head_dim wins over hidden/heads)
    intermediate: int  # dense MLP width
    vocab: int  # vocabulary size (logits width)
    tie_embeddings: bool  # lm_head shares the input embedding
    max_positions: int  # max_position_embeddings
    config_dtype: str  # torch_dtype / dtype of the published checkpoint
    mlp_gated: bool = True  # SwiGLU-style gate/up/down (3 matrices) vs plain fc1/fc2
    norm: str = "rms"  # rms (weight only) | layer (weight + bias)
    v_head_dim: int = 0  # value head dim (differs from head_dim under MLA)
    rotary_dim: int = 0  # dims rotated by RoPE per head (0 = no RoPE)
    sliding_window: int = 0  # tokens kept per layer in the KV cache when > 0
    qk_norm: bool = False  # Qwen3 q_norm/k_norm
    parallel_residual: bool = False  # GPT-NeoX
    # mixture of experts
    n_experts: int = 0  # routed experts per MoE layer
    experts_per_token: int = 0  # top-k
    moe_intermediate: int = 0  # width of one routed expert
    shared_intermediate: int = 0  # total width of the shared expert(s), 0 if none
    n_moe_layers: int = 0  # layers with a routed MoE block
    # multi-head latent attention (DeepSeek-V2/V3)
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    # dropout active in training mode
    attn_dropout: float = 0.0
    resid_dropout: float = 0.0
    embd_dropout: float = 0.0
    word_embed_proj_dim: int = 0  # OPT-350m projects embeddings of this width
    # general inventory (model types outside the hand-modelled families): per-layer cache groups
    cache_groups: tuple = field(default=(), repr=False)  # CacheGroup per kind of layer cache; () = from the fields
    n_state_layers: int = 0  # layers with a linear-attention / SSM state instead of (or beside) attention
    n_state_moe_layers: int = 0  # of those, layers with a mixture-of-experts feed-forward
    norms_per_layer: int = 2  # hidden-size norms per decoder layer (Gemma 2/3: four)
    eager_per_score: tuple = ()  # general inventory: bytes per attention score under eager attention at bf16 —
    # no-grad working set, saved with trainable / frozen weights (read off the model); () = the rule
    sdpa_per_score: tuple = ()  # the same under SDPA where only the math kernel runs (a mask, unequal heads); () = none
    norm_saved: tuple = ()  # general inventory: bytes a hidden-size norm saves per element at bf16, with its
    # weight trainable and frozen (read off the model's norm module); () = the Llama rule
    inventory_source: str = ""  # "transformers X.Y" for shapes read off a built model, "" for hand-modelled ones
    attn_implementations: tuple = ()  # of sdpa / eager, what the model class runs; () = both
    lora_defaults: tuple = ()  # general inventory: peft's default LoRA targets for the model type, if it has them
    stored_quant: str = ""  # the --dtype the checkpoint ships in when its config names a quantization (mxfp4, fp8)
    remote_code: str = ""  # the modelling file of a remote-code model this shape mirrors (formulas/remote_code.py)
    tensors: tuple = field(default=(), repr=False)  # parameter inventory
    buffers: tuple = field(default=(), repr=False)  # buffer inventory

    @property
    def n_params(self):
        """Parameter count as transformers' model.parameters() gives it (tied weights once)."""
        return sum(t.total_numel for t in self.tensors)

    @property
    def n_dense_layers(self):
        """Layers whose MLP is dense."""
        return self.n_layers - self.n_moe_layers

    @property
    def is_moe(self):
        return self.n_experts > 0

    @property
    def is_mla(self):
        return self.family == "mla"

    def n_active_params(self):
        """Parameters touched per token (all but the unrouted experts); equals n_params for dense models."""
        inactive = 0
        for t in self.tensors:
            if t.kind == "experts":
                inactive += t.total_numel * (self.n_experts - self.experts_per_token) // self.n_experts
        return self.n_params - inactive


def _get(cfg, *names, default=None):
    for n in names:
        if n in cfg and cfg[n] is not None:
            return cfg[n]
    return default


def _lin(tensors, name, module, out_f, in_f, count, bias):
    tensors.append(Tensor(f"{name}.weight", "linear", (out_f, in_f), count, module))
    if bias:
        tensors.append(Tensor(f"{name}.bias", "bias", (out_f,), count, module))


def _norm(tensors, name, dim, count, with_bias):
    tensors.append(Tensor(f"{name}.weight", "norm", (dim,), count))
    if with_bias:
        tensors.append(Tensor(f"{name}.bias", "norm", (dim,), count))


def _gated_mlp(tensors, prefix, hidden, inter, count, bias=False):
    _lin(tensors, f"{prefix}.gate_proj", "gate_proj", inter, hidden, count, bias)
    _lin(tensors, f"{prefix}.up_proj", "up_proj", inter, hidden, count, bias)
    _lin(tensors, f"{prefix}.down_proj", "down_proj", hidden, inter, count, bias)


def _rope_buffers(rotary_dim):
    # inv_freq and original_inv_freq, fp32, persistent=False (modeling_*.py RotaryEmbedding).
    return (
        Tensor("rotary_emb.inv_freq", "buffer", (rotary_dim // 2,), 1, dtype="fp32"),
        Tensor("rotary_emb.original_inv_freq", "buffer", (rotary_dim // 2,), 1, dtype="fp32"),
    )


def _config_dtype(cfg):
    d = str(_get(cfg, "torch_dtype", "dtype", default="float32"))
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(d.replace("torch.", ""), "fp32")


def _llama_attention(t, cfg, H, nH, nKV, hd, L, model_type):
    if model_type == "qwen2":
        qkv_bias, o_bias = True, False
    elif model_type == "mistral" or model_type == "mixtral":
        qkv_bias = o_bias = False
    elif model_type == "qwen2_moe":  # Qwen2MoeConfig.qkv_bias defaults to True; o_proj has none
        qkv_bias, o_bias = bool(_get(cfg, "qkv_bias", default=True)), False
    else:  # llama, qwen3, qwen3_moe: attention_bias covers all four
        qkv_bias = o_bias = bool(_get(cfg, "attention_bias", default=False))
    _lin(t, "layers.self_attn.q_proj", "q_proj", nH * hd, H, L, qkv_bias)
    _lin(t, "layers.self_attn.k_proj", "k_proj", nKV * hd, H, L, qkv_bias)
    _lin(t, "layers.self_attn.v_proj", "v_proj", nKV * hd, H, L, qkv_bias)
    _lin(t, "layers.self_attn.o_proj", "o_proj", H, nH * hd, L, o_bias)
    if model_type in ("qwen3", "qwen3_moe"):
        _norm(t, "layers.self_attn.q_norm", hd, L, False)
        _norm(t, "layers.self_attn.k_norm", hd, L, False)


def _embed_and_head(t, V, H, tie, with_final_norm=True, norm_bias=False, names=("embed_tokens", "norm", "lm_head")):
    t.append(Tensor(f"{names[0]}.weight", "embedding", (V, H), 1, names[0]))
    if with_final_norm:
        _norm(t, names[1], H, 1, norm_bias)
    if not tie:
        t.append(Tensor(f"{names[2]}.weight", "linear", (V, H), 1, "lm_head"))


def _llama_dims(cfg):
    """hidden, heads, KV heads, head dim (explicit head_dim wins), layers, vocab, tied — shared by Llama-style and MoE."""
    H = cfg["hidden_size"]
    nH = cfg["num_attention_heads"]
    return (H, nH, _get(cfg, "num_key_value_heads", default=nH), _get(cfg, "head_dim", default=H // nH),
            cfg["num_hidden_layers"], cfg["vocab_size"], bool(_get(cfg, "tie_word_embeddings", default=False)))


def _build_llama(cfg, name, mt):
    H, nH, nKV, hd, L, V, tie = _llama_dims(cfg)
    I = cfg["intermediate_size"]
    t = []
    _llama_attention(t, cfg, H, nH, nKV, hd, L, mt)
    _gated_mlp(t, "layers.mlp", H, I, L, bias=bool(_get(cfg, "mlp_bias", default=False)) and mt == "llama")
    _norm(t, "layers.input_layernorm", H, L, False)
    _norm(t, "layers.post_attention_layernorm", H, L, False)
    _embed_and_head(t, V, H, tie)
    window = 0
    if mt == "mistral" and _get(cfg, "sliding_window"):
        window = cfg["sliding_window"]
    if mt in ("qwen2", "qwen3") and _get(cfg, "use_sliding_window", default=False) and _get(cfg, "sliding_window"):
        window = cfg["sliding_window"]  # Qwen applies it only above max_window_layers; treated as all layers
    rot = int(hd * _get(cfg, "partial_rotary_factor", default=1.0))
    return dict(
        family="llama", hidden=H, n_layers=L, n_heads=nH, n_kv_heads=nKV, head_dim=hd, v_head_dim=hd,
        intermediate=I, vocab=V, tie_embeddings=tie, rotary_dim=rot, sliding_window=window,
        qk_norm=mt == "qwen3", attn_dropout=float(_get(cfg, "attention_dropout", default=0.0)),
        tensors=t, buffers=_rope_buffers(rot),
    )


def _build_moe(cfg, name, mt):
    H, nH, nKV, hd, L, V, tie = _llama_dims(cfg)
    I = _get(cfg, "intermediate_size", default=0)
    t = []
    _llama_attention(t, cfg, H, nH, nKV, hd, L, mt)
    if mt == "mixtral":
        E = cfg["num_local_experts"]
        k = cfg["num_experts_per_tok"]
        moe_I = I
        n_moe = L
        shared = 0
    else:
        # transformers ≥ 5.2x saves Qwen3-MoE's num_experts under its attribute-map name num_local_experts
        E = _get(cfg, "num_experts", "num_local_experts")
        if E is None:
            raise KeyError("num_experts")
        k = cfg["num_experts_per_tok"]
        moe_I = cfg["moe_intermediate_size"]
        step = _get(cfg, "decoder_sparse_step", default=1)
        only = set(_get(cfg, "mlp_only_layers", default=[]) or [])
        n_moe = sum(1 for i in range(L) if i not in only and E > 0 and (i + 1) % step == 0)
        shared = _get(cfg, "shared_expert_intermediate_size", default=0) if mt == "qwen2_moe" else 0
    n_dense = L - n_moe
    if n_dense:
        _gated_mlp(t, "layers.mlp", H, I, n_dense)
    t.append(Tensor("layers.mlp.gate.weight", "router", (E, H), n_moe, "gate"))
    t.append(Tensor("layers.mlp.experts.gate_up_proj", "experts", (E, 2 * moe_I, H), n_moe, "gate_up_proj"))
    t.append(Tensor("layers.mlp.experts.down_proj", "experts", (E, H, moe_I), n_moe, "down_proj"))
    if shared:
        _gated_mlp(t, "layers.mlp.shared_expert", H, shared, n_moe)
        _lin(t, "layers.mlp.shared_expert_gate", "shared_expert_gate", 1, H, n_moe, False)
    _norm(t, "layers.input_layernorm", H, L, False)
    _norm(t, "layers.post_attention_layernorm", H, L, False)
    _embed_and_head(t, V, H, tie)
    window = cfg["sliding_window"] if mt == "mixtral" and _get(cfg, "sliding_window") else 0
    return dict(
        family="moe", hidden=H, n_layers=L, n_heads=nH, n_kv_heads=nKV, head_dim=hd, v_head_dim=hd,
        intermediate=I, vocab=V, tie_embeddings=tie, rotary_dim=hd, sliding_window=window,
        qk_norm=mt == "qwen3_moe", n_experts=E, experts_per_token=k, moe_intermediate=moe_I,
        shared_intermediate=shared, n_moe_layers=n_moe,
        attn_dropout=float(_get(cfg, "attention_dropout", default=0.0)), tensors=t, buffers=_rope_buffers(hd),
    )


def _build_mla(cfg, name, mt):
    H = cfg["hidden_size"]
    nH = cfg["num_attention_heads"]
    L = cfg["num_hidden_layers"]
    V = cfg["vocab_size"]
    I = cfg["intermediate_size"]
    tie = bool(_get(cfg, "tie_word_embeddings", default=False))
    q_rank = _get(cfg, "q_lora_rank", default=0) or 0
    kv_rank = cfg["kv_lora_rank"]
    rope = cfg["qk_rope_head_dim"]
    nope = cfg["qk_nope_head_dim"]
    vd = cfg["v_head_dim"]
    qk = rope + nope
    bias = bool(_get(cfg, "attention_bias", default=False))
    E = _get(cfg, "n_routed_experts", "num_experts", default=0)
    k = _get(cfg, "num_experts_per_tok", default=0)
    moe_I = _get(cfg, "moe_intermediate_size", default=0)
    n_shared = _get(cfg, "n_shared_experts", default=0) or 0
    first_dense = _get(cfg, "first_k_dense_replace", default=0)
    n_moe = max(0, L - first_dense) if E else 0
    t = []
    if q_rank:
        _lin(t, "layers.self_attn.q_a_proj", "q_a_proj", q_rank, H, L, bias)
        _norm(t, "layers.self_attn.q_a_layernorm", q_rank, L, False)
        _lin(t, "layers.self_attn.q_b_proj", "q_b_proj", nH * qk, q_rank, L, False)
    else:
        _lin(t, "layers.self_attn.q_proj", "q_proj", nH * qk, H, L, False)
    _lin(t, "layers.self_attn.kv_a_proj_with_mqa", "kv_a_proj_with_mqa", kv_rank + rope, H, L, bias)
    _norm(t, "layers.self_attn.kv_a_layernorm", kv_rank, L, False)
    _lin(t, "layers.self_attn.kv_b_proj", "kv_b_proj", nH * (nope + vd), kv_rank, L, False)
    _lin(t, "layers.self_attn.o_proj", "o_proj", H, nH * vd, L, bias)
    n_dense = L - n_moe
    if n_dense:
        _gated_mlp(t, "layers.mlp", H, I, n_dense, bias=bool(_get(cfg, "mlp_bias", default=False)) and mt == "deepseek_v2")
    buffers = list(_rope_buffers(rope))
    if n_moe:
        # Router weight kept in fp32 (_keep_in_fp32_modules_strict = ["gate.weight", …]).
        t.append(Tensor("layers.mlp.gate.weight", "router", (E, H), n_moe, "gate", dtype="fp32"))
        t.append(Tensor("layers.mlp.experts.gate_up_proj", "experts", (E, 2 * moe_I, H), n_moe, "gate_up_proj"))
        t.append(Tensor("layers.mlp.experts.down_proj", "experts", (E, H, moe_I), n_moe, "down_proj"))
        if n_shared:
            _gated_mlp(t, "layers.mlp.shared_experts", H, moe_I * n_shared, n_moe)
        if mt == "deepseek_v3":
            buffers.append(Tensor("layers.mlp.gate.e_score_correction_bias", "buffer", (E,), n_moe, dtype="fp32"))
    _norm(t, "layers.input_layernorm", H, L, False)
    _norm(t, "layers.post_attention_layernorm", H, L, False)
    _embed_and_head(t, V, H, tie)
    return dict(
        family="mla", hidden=H, n_layers=L, n_heads=nH, n_kv_heads=nH, head_dim=qk, v_head_dim=vd,
        intermediate=I, vocab=V, tie_embeddings=tie, rotary_dim=rope, n_experts=E, experts_per_token=k,
        moe_intermediate=moe_I, shared_intermediate=moe_I * n_shared if n_moe else 0, n_moe_layers=n_moe,
        q_lora_rank=q_rank, kv_lora_rank=kv_rank, qk_rope_head_dim=rope, qk_nope_head_dim=nope,
        attn_dropout=float(_get(cfg, "attention_dropout", default=0.0)), tensors=t, buffers=tuple(buffers),
    )


def _build_gpt2(cfg, name, mt):
    """GPT-2 and GPTBigCode: the same block; GPTBigCode's c_attn is narrower under multi-query."""
    H = _get(cfg, "n_embd", "hidden_size")
    L = _get(cfg, "n_layer", "num_hidden_layers")
    nH = _get(cfg, "n_head", "num_attention_heads")
    V = cfg["vocab_size"]
    P = _get(cfg, "n_positions", "max_position_embeddings")
    I = _get(cfg, "n_inner", default=None) or 4 * H
    hd = H // nH
    mq = mt == "gpt_bigcode" and bool(_get(cfg, "multi_query", default=True))
    kv_dim = hd if mq else H
    t = []
    # Conv1D (gpt2) keeps weights as (in, out); listed here as (out, in) like nn.Linear, same numel.
    _lin(t, "h.attn.c_attn", "c_attn", H + 2 * kv_dim, H, L, True)
    _lin(t, "h.attn.c_proj", "c_proj", H, H, L, True)
    _lin(t, "h.mlp.c_fc", "c_fc", I, H, L, True)
    _lin(t, "h.mlp.c_proj", "c_proj", H, I, L, True)
    _norm(t, "h.ln_1", H, L, True)
    _norm(t, "h.ln_2", H, L, True)
    t.append(Tensor("wpe.weight", "embedding", (P, H), 1, "wpe"))
    tie = bool(_get(cfg, "tie_word_embeddings", default=True))
    _embed_and_head(t, V, H, tie, norm_bias=True, names=("wte", "ln_f", "lm_head"))
    buffers = ()
    if mt == "gpt_bigcode":
        # Causal mask buffer: bool (P, P), persistent=False (modeling_gpt_bigcode.py GPTBigCodeModel).
        buffers = (Tensor("bias", "buffer", (P, P), 1, dtype="bool"),)
    return dict(
        family=mt, hidden=H, n_layers=L, n_heads=nH, n_kv_heads=1 if mq else nH, head_dim=hd, v_head_dim=hd,
        intermediate=I, vocab=V, tie_embeddings=tie, mlp_gated=False, norm="layer", max_positions=P,
        attn_dropout=float(_get(cfg, "attn_pdrop", default=0.1)), resid_dropout=float(_get(cfg, "resid_pdrop", default=0.1)),
        embd_dropout=float(_get(cfg, "embd_pdrop", default=0.1)), tensors=t, buffers=buffers,
    )


def _build_opt(cfg, name, mt):
    H = cfg["hidden_size"]
    L = cfg["num_hidden_layers"]
    nH = cfg["num_attention_heads"]
    V = cfg["vocab_size"]
    I = cfg["ffn_dim"]
    P = cfg["max_position_embeddings"]
    E = _get(cfg, "word_embed_proj_dim", default=H)
    bias = bool(_get(cfg, "enable_bias", default=True))
    affine = bool(_get(cfg, "layer_norm_elementwise_affine", default=True))
    pre_ln = bool(_get(cfg, "do_layer_norm_before", default=True))
    t = []
    for m in ("k_proj", "v_proj", "q_proj", "out_proj"):
        _lin(t, f"layers.self_attn.{m}", m, H, H, L, bias)
    _lin(t, "layers.fc1", "fc1", I, H, L, bias)
    _lin(t, "layers.fc2", "fc2", H, I, L, bias)
    if affine:
        _norm(t, "layers.self_attn_layer_norm", H, L, True)
        _norm(t, "layers.final_layer_norm", H, L, True)
    t.append(Tensor("embed_tokens.weight", "embedding", (V, E), 1, "embed_tokens"))
    t.append(Tensor("embed_positions.weight", "embedding", (P + 2, H), 1, "embed_positions"))  # offset 2
    if E != H:
        _lin(t, "project_out", "project_out", E, H, 1, False)
        _lin(t, "project_in", "project_in", H, E, 1, False)
    if pre_ln and not _get(cfg, "_remove_final_layer_norm", default=False) and affine:
        _norm(t, "final_layer_norm", H, 1, True)
    tie = bool(_get(cfg, "tie_word_embeddings", default=True))
    if not tie:
        t.append(Tensor("lm_head.weight", "linear", (V, E), 1, "lm_head"))
    drop = float(_get(cfg, "dropout", default=0.1))
    return dict(
        family="opt", hidden=H, n_layers=L, n_heads=nH, n_kv_heads=nH, head_dim=H // nH, v_head_dim=H // nH,
        intermediate=I, vocab=V, tie_embeddings=tie, mlp_gated=False, norm="layer", max_positions=P,
        attn_dropout=float(_get(cfg, "attention_dropout", default=0.0)), resid_dropout=drop, embd_dropout=drop,
        word_embed_proj_dim=E, tensors=t, buffers=(),
    )


def _build_gpt_neox(cfg, name, mt):
    H = cfg["hidden_size"]
    L = cfg["num_hidden_layers"]
    nH = cfg["num_attention_heads"]
    V = cfg["vocab_size"]
    I = cfg["intermediate_size"]
    bias = bool(_get(cfg, "attention_bias", default=True))
    t = []
    _lin(t, "layers.attention.query_key_value", "query_key_value", 3 * H, H, L, bias)
    _lin(t, "layers.attention.dense", "dense", H, H, L, bias)
    _lin(t, "layers.mlp.dense_h_to_4h", "dense_h_to_4h", I, H, L, True)
    _lin(t, "layers.mlp.dense_4h_to_h", "dense_4h_to_h", H, I, L, True)
    _norm(t, "layers.input_layernorm", H, L, True)
    _norm(t, "layers.post_attention_layernorm", H, L, True)
    tie = bool(_get(cfg, "tie_word_embeddings", default=False))
    _embed_and_head(t, V, H, tie, norm_bias=True, names=("embed_in", "final_layer_norm", "embed_out"))
    hd = H // nH
    rot = int(hd * _get(cfg, "rotary_pct", "partial_rotary_factor", default=0.25))
    return dict(
        family="gpt_neox", hidden=H, n_layers=L, n_heads=nH, n_kv_heads=nH, head_dim=hd, v_head_dim=hd,
        intermediate=I, vocab=V, tie_embeddings=tie, mlp_gated=False, norm="layer", rotary_dim=rot,
        parallel_residual=bool(_get(cfg, "use_parallel_residual", default=True)),
        attn_dropout=float(_get(cfg, "attention_dropout", default=0.0)), resid_dropout=float(_get(cfg, "hidden_dropout", default=0.0)),
        embd_dropout=float(_get(cfg, "hidden_dropout", default=0.0)), tensors=t, buffers=_rope_buffers(rot),
    )


_BUILDERS = {
    "llama": _build_llama,
    "moe": _build_moe,
    "mla": _build_mla,
    "gpt2": _build_gpt2,
    "opt": _build_opt,
    "gpt_neox": _build_gpt_neox,
    "gpt_bigcode": _build_gpt2,
}


# Dimension fields of the supported configs: where present (and not null) each must be an integer
# ≥ its minimum. Anything else (a string, a fraction, a negative number) would give a wrong answer.
_DIMENSIONS = {
    1: ("hidden_size", "n_embd", "num_hidden_layers", "n_layer", "num_attention_heads", "n_head",
        "num_key_value_heads", "head_dim", "intermediate_size", "n_inner", "ffn_dim", "vocab_size",
        "max_position_embeddings", "n_positions", "moe_intermediate_size", "num_local_experts", "num_experts",
        "num_experts_per_tok", "n_routed_experts", "shared_expert_intermediate_size", "kv_lora_rank",
        "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "decoder_sparse_step",
        "word_embed_proj_dim", "n_group", "topk_group"),
    # 0 means none: transformers itself writes sliding_window 0 for a Qwen2-MoE without one
    0: ("first_k_dense_replace", "n_shared_experts", "sliding_window"),
}


def _check_dimensions(cfg, name):
    for minimum, keys in _DIMENSIONS.items():
        for k in keys:
            v = cfg.get(k)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < minimum):
                raise UnsupportedModelError(f"{name}: config.json field {k}: {v!r} must be an integer ≥ {minimum}")
    heads, kv = _get(cfg, "num_attention_heads", "n_head"), cfg.get("num_key_value_heads")
    if heads and kv and heads % kv:
        raise UnsupportedModelError(f"{name}: config.json num_attention_heads {heads} is not a multiple of "
                                    f"num_key_value_heads {kv}")
    hidden = _get(cfg, "hidden_size", "n_embd")
    if hidden and heads and not cfg.get("head_dim") and hidden % heads:
        raise UnsupportedModelError(f"{name}: config.json hidden size {hidden} is not a multiple of the {heads} "
                                    "attention heads (and no head_dim is given)")


def shape_from_config(cfg, name="config"):
    """Build a ModelShape from a config.json dict; unknown architectures and impossible values are a clear error."""
    if not isinstance(cfg, dict):
        raise UnsupportedModelError(f"{name}: config.json must be a JSON object, not {type(cfg).__name__}")
    mt = cfg.get("model_type")
    if mt not in FAMILIES:
        arch = ", ".join(cfg.get("architectures") or []) or "?"
        raise UnsupportedModelError(
            f"{name}: model_type {mt!r} (architectures: {arch}) is not supported; "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    _check_dimensions(cfg, name)
    cfg = {k: v for k, v in cfg.items() if v is not None}  # a null field is a missing one
    try:
        fields = _BUILDERS[FAMILIES[mt]](cfg, name, mt)
    except KeyError as e:
        raise UnsupportedModelError(f"{name}: config.json for model_type {mt!r} lacks the field {e.args[0]!r}") from None
    fields.setdefault("max_positions", int(_get(cfg, "max_position_embeddings", "n_positions", default=0)))
    fields["tensors"] = tuple(fields["tensors"])
    return ModelShape(name=name, model_type=mt, config_dtype=_config_dtype(cfg), **fields)


# ------------------------------------------------------------------ the general inventory

def _line(values, shapes):
    """(per token, per sequence, per layer) bytes through probes at (1, t), (1, 2t), (2, t) (batch, tokens)."""
    (_, t1), (_, t2), _ = shapes
    v1, v2, v3 = values
    per_token = (v2 - v1) // (t2 - t1)
    per_seq = v3 - v1 - per_token * t1
    return per_token, per_seq, v1 - per_token * t1 - per_seq


def _state_probes(inv):
    """layer index → the six-number probe of CacheGroup.probe."""
    sp = inv.get("state_probe") or {}
    out = {}
    for layer, v in (sp.get("layers") or {}).items():
        line = []
        for key in ("working_set", "saved", "saved_frozen"):
            line += list(_line(v[key], sp["shapes"]))
        out[int(layer)] = tuple(line) + (int(sp.get("chunk") or 0),)
    return out


def _cache_groups(inv, fields, n_layers, moe_layers=frozenset()):
    """CacheGroups from the inventory's cache probe (harness/inventory.py `_probe_cache`)."""
    probe = inv.get("cache_layers")
    if not probe:
        kv = (fields.get("n_kv_heads") or 0) * (fields.get("head_dim") or 0) * 2
        return (CacheGroup("full", n_layers, kv_per_token=kv),) if kv else ()
    probes = _state_probes(inv)
    groups = {}
    moe = {}
    layer_probe = {}
    for row in probe:
        kv = row.get("k_per_token", 0) + row.get("v_per_token", 0) + row.get("other_per_token", 0)
        window = row.get("window", 0) if row.get("cache_class", "").find("Sliding") >= 0 else 0
        state = state32 = 0
        for st in row.get("states", ()):
            n = 1
            for d in st["shape"][1:]:  # per sequence: the probe ran one
                n *= d
            if st["dtype"] == "fp32" and inv.get("build_dtype", "bf16") != "fp32":
                state32 += n
            else:
                state += n
        if kv and (state or state32):
            kind = "hybrid"
        elif kv and window:
            kind = "sliding"
        elif kv:
            kind = "full"
        elif state or state32:
            kind = "state"
        else:
            kind = "none"
        key = (kind, kv, window, state, state32)
        groups[key] = groups.get(key, 0) + 1
        moe[key] = moe.get(key, 0) + (row["layer"] in moe_layers)
        if row["layer"] in probes:
            layer_probe.setdefault(key, probes[row["layer"]])
    return tuple(CacheGroup(k[0], c, kv_per_token=k[1], window=k[2], state_elems=k[3], state_fp32_elems=k[4],
                            probe=layer_probe.get(k, ()), moe_count=moe[k])
                 for k, c in groups.items())


def shape_from_inventory(inv, name="config", config_dtype="bf16"):
    """A ModelShape from a general inventory (harness/inventory.py): family "generic".

    Weights, quantization and LoRA targeting read the tensors as they are for any family; the KV
    cache reads the cache groups; activations use the Llama-style per-layer rule on the attention
    and MLP sizes (formulas/activations.py says where that is an approximation)."""
    if not isinstance(inv, dict) or inv.get("schema") != INVENTORY_SCHEMA or not isinstance(inv.get("fields"), dict) \
            or not isinstance(inv.get("tensors"), list) or not isinstance(inv.get("buffers"), list):
        raise UnsupportedModelError(f"{name}: its inventory is not one this vramlab reads (schema "
                                    f"{inv.get('schema') if isinstance(inv, dict) else '?'}, expected {INVENTORY_SCHEMA})")
    f = inv["fields"]
    tensors = tuple(Tensor(r["name"], r["kind"], tuple(r["shape"]), r["count"], r.get("module", ""), r.get("dtype", ""))
                    for r in inv["tensors"])
    buffers = tuple(Tensor(r["name"], "buffer", tuple(r["shape"]), r["count"], r.get("module", ""), r.get("dtype", ""))
                    for r in inv["buffers"])
    L = int(f.get("n_layers") or 0)
    H = int(f.get("hidden") or 0)
    if not L or not H:
        raise UnsupportedModelError(f"{name}: the inventory names no hidden size or layer count")
    experts = [t for t in tensors if t.kind == "experts"]
    E = max((t.shape[0] for t in experts), default=0)
    n_moe = max((t.count for t in experts), default=0)
    moe_I = 0
    for t in experts:
        if t.module in ("down_proj", "w2") and len(t.shape) == 3:
            moe_I = min(t.shape[1:]) if t.shape[1] != H else t.shape[2]
    if E and not moe_I:
        t = experts[0]
        moe_I = min(t.shape[1:])
    shared = sum(t.shape[0] for t in tensors if t.kind == "linear" and "shared_expert" in t.name
                 and t.module in ("up_proj", "w3", "fc1")) if E else 0
    moe_layers = frozenset(i for t in inv["tensors"] if t["kind"] == "experts" for i in t.get("layers", ()))
    groups = _cache_groups(inv, f, L, moe_layers)
    # layers whose activations the per-op rule does not cover: states (alone or beside attention), and
    # layers without a cache when probed (Nemotron-H's MLP-only blocks)
    n_state = sum(g.count for g in groups if g.kind in ("state", "hybrid") or (g.kind == "none" and g.probe))
    n_state_moe = sum(g.moe_count for g in groups if g.kind in ("state", "hybrid") or (g.kind == "none" and g.probe))
    heads = int(f.get("n_heads") or 0)
    hd = int(f.get("head_dim") or 0)
    hidden_norms = sum(t.count for t in tensors if t.kind == "norm" and t.shape == (H,) and t.name.startswith("layers.")
                       and t.name.endswith("weight"))
    qk_norm = any(t.kind == "norm" and t.shape == (hd,) and t.module in ("q_norm", "k_norm") for t in tensors)
    norm_probe = inv.get("norm_probe")
    norm_saved = ()
    if norm_probe:
        elems = norm_probe["tokens"] * H
        norm_saved = (norm_probe["saved"] / elems, norm_probe["saved_frozen"] / elems)
    ep = inv.get("eager_probe")
    eager = (ep["working_set"], ep["saved"], ep["saved_frozen"]) if ep else ()
    sp = inv.get("sdpa_probe")
    # below a byte per score is the fit's noise: flash and memory-efficient kernels hold no score matrix
    sdpa = (sp["working_set"], sp["saved"], sp["saved_frozen"]) if sp and max(sp["working_set"], sp["saved"]) >= 1 else ()
    window = max((g.window for g in groups if g.kind == "sliding"), default=0)
    return ModelShape(
        name=name, model_type=inv["model_type"], family="generic", hidden=H, n_layers=L, n_heads=heads,
        n_kv_heads=int(f.get("n_kv_heads") or heads), head_dim=int(f.get("head_dim") or 0),
        intermediate=int(f.get("intermediate") or 0), vocab=int(f.get("vocab") or 0),
        tie_embeddings=bool(inv.get("tie_embeddings")), max_positions=int(f.get("max_positions") or 0),
        config_dtype=config_dtype, v_head_dim=int(f.get("head_dim") or 0), rotary_dim=int(f.get("head_dim") or 0),
        sliding_window=window, n_experts=E, experts_per_token=int(f.get("experts_per_token") or 0) if E else 0,
        moe_intermediate=moe_I, shared_intermediate=shared, n_moe_layers=n_moe,
        attn_dropout=float(f.get("attn_dropout") or 0.0), cache_groups=groups, n_state_layers=n_state,
        n_state_moe_layers=n_state_moe, norms_per_layer=max(1, round(hidden_norms / L)) if hidden_norms else 2,
        norm_saved=norm_saved, qk_norm=qk_norm, eager_per_score=eager, sdpa_per_score=sdpa,
        inventory_source=f"transformers {inv.get('transformers', '?')}", tensors=tensors, buffers=buffers,
        attn_implementations=tuple(inv.get("attn_implementations") or ()),
        lora_defaults=tuple(inv.get("lora_targets") or ()),
    )
