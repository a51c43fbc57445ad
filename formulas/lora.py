"""LoRA / QLoRA adapters: which modules they attach to and what they add."""

# peft's defaults (peft/utils/constants.py TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING);
# peft has none for the MoE/MLA types, which get their query and value projections here.
DEFAULT_TARGETS = {
    "gpt2": ("c_attn",),
    "gpt_bigcode": ("c_attn",),
    "gpt_neox": ("query_key_value",),
    "deepseek_v2": ("q_proj", "kv_b_proj"),
    "deepseek_v3": ("q_b_proj", "kv_b_proj"),
}


def default_targets(shape):
    """LoRA target modules peft picks for this model type when none are given."""
    if shape.model_type == "deepseek_v2" and shape.q_lora_rank:
        return ("q_b_proj", "kv_b_proj")
    if shape.lora_defaults:  # a general inventory: what peft maps the model type to
        return shape.lora_defaults
    default = DEFAULT_TARGETS.get(shape.model_type, ("q_proj", "v_proj"))
    if (shape.family == "generic" or shape.remote_code) and not set(default) <= set(linear_modules(shape)):
        raise ValueError(f"--lora-targets: peft has no default LoRA targets for {shape.model_type} and it has no "
                         f"q_proj/v_proj; name its modules (one of: {', '.join(sorted(linear_modules(shape))[:12])}) "
                         "or all-linear")
    return default


def _keyed_linears(shape):
    """[(key, tensor)] of the LoRA-targetable linear weights: the key is the leaf module name, or the full name
    where one leaf name has two shapes (gpt2 attn.c_proj vs mlp.c_proj)."""
    shapes, out = {}, []
    for t in shape.tensors:
        if t.kind == "linear" and t.module != "lm_head":
            first = shapes.setdefault(t.module, t.shape)
            out.append((t.module if first == t.shape else t.name.rsplit(".", 1)[0], t))
    return out


def linear_modules(shape):
    """Leaf names of the model's nn.Linear modules (LoRA-targetable), with (in, out, copies)."""
    mods = {}
    for key, t in _keyed_linears(shape):
        out_f, in_f = t.shape
        prev = mods.get(key)
        mods[key] = (in_f, out_f, t.count + (prev[2] if prev else 0))
    return mods


def adapted_roles(shape, targets):
    """{module name the activation rules know: (in, out)} for the adapted modules: a remote-code module by the Llama
    role it plays (Tensor.role: Qwen's fused c_attn adapts like one q_proj), every other module by its own name."""
    return {t.role or key: (t.shape[1], t.shape[0]) for key, t in _keyed_linears(shape) if key in targets}


def resolve_targets(shape, targets):
    """Map target names (or 'all-linear') to {module: (in, out, copies)}; unknown names are an error."""
    mods = linear_modules(shape)
    if not targets:
        targets = default_targets(shape)
    if targets in ("all-linear", ("all-linear",)):
        return dict(mods)
    chosen = {}
    for name in targets:
        hits = {k: v for k, v in mods.items() if k == name or k.endswith("." + name)}
        if not hits:
            raise ValueError(
                f"--lora-targets {name}: {shape.name} has no such linear module; "
                f"available: {', '.join(sorted(mods))} (or all-linear)"
            )
        chosen.update(hits)
    return chosen


def lora_params(targets, rank):
    """Adapter parameters: A (rank × in) and B (out × rank) per adapted module copy."""
    return sum(rank * (i + o) * c for i, o, c in targets.values())


def lora_tensors(targets, rank):
    """Adapter tensors as (numel, shape, count) for optimizer accounting."""
    out = []
    for i, o, c in targets.values():
        out.append((rank * i, (rank, i), c))
        out.append((o * rank, (o, rank), c))
    return out
