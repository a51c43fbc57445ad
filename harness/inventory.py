"""The general inventory: any causal LM transformers can build, read off the model itself.

vramlab hand-models 13 families (formulas/shapes.py). For every other `model_type`, the
inventory is taken from the model transformers builds from the config — on fake tensors,
so a 235B model costs nothing — and written to disk as JSON, keyed by the config's hash,
so the next `predict` of the same config reads the JSON and needs no torch
(`formulas.shapes.shape_from_inventory` turns it into a ModelShape).

What is read off the built model:
- every parameter and buffer (tied weights once, as `model.parameters()` gives them), with
  its module class deciding its kind: nn.Linear / Conv1D → linear (what bitsandbytes
  quantizes), nn.Embedding → embedding, 3-D parameters → fused experts, a module whose class
  or name says norm → norm, a 2-D parameter in a router/gate module → router, the rest
  "other" (Mamba's A_log and D, convolution kernels, attention sinks); the dtype transformers
  pins (fp32 routers, `_keep_in_fp32_modules`) when it differs from the dtype built;
- per decoder layer, the cache transformers itself keeps: one prefill of two tokens through
  `DynamicCache(config=...)` on fake tensors, and each cache layer's class and tensors —
  keys and values per token (full, sliding-window or chunked attention), conv and recurrent
  state per sequence (linear attention, SSM). The formulas scale these with batch and tokens.

Bad input is one line: a model type this transformers does not know (naming the version), an
encoder-only or encoder-decoder config ("not a causal LM").
"""

import hashlib
import json
import os

from formulas.catalog import inventory_cache_dir, inventory_file_name
from formulas.shapes import FAMILIES, UnsupportedModelError

INVENTORY_SCHEMA = 1
PROBE_TOKENS = 2  # prefill length of the cache probe (a sliding window keeps min(tokens, window - 1))
_BUILD_DTYPE = "bfloat16"


def config_hash(cfg):
    """sha256 of the config.json dict, keys sorted (what an inventory is keyed by)."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _dtype_name(dtype):
    import torch

    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "int64",
            torch.int32: "int32", torch.bool: "bool", torch.uint8: "uint8", torch.int8: "int8",
            torch.float8_e4m3fn: "fp8"}.get(dtype, str(dtype).replace("torch.", ""))


def check_causal_lm(cfg, name="config"):
    """Raise UnsupportedModelError (one line) unless transformers can build `cfg` as a causal LM."""
    import transformers
    from transformers.models.auto import modeling_auto

    mt = cfg.get("model_type")
    version = transformers.__version__
    if cfg.get("is_encoder_decoder"):
        raise UnsupportedModelError(f"{name}: model_type {mt!r} is an encoder-decoder model, not a causal LM")
    if mt not in transformers.models.auto.configuration_auto.CONFIG_MAPPING_NAMES:
        raise UnsupportedModelError(f"{name}: model_type {mt!r} is not known to transformers {version} "
                                    "(a newer transformers may know it; remote code is not run)")
    causal = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    masked = modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    if mt in masked and not cfg.get("is_decoder"):
        raise UnsupportedModelError(f"{name}: model_type {mt!r} is an encoder-only model, not a causal LM")
    if mt not in causal:
        raise UnsupportedModelError(f"{name}: model_type {mt!r} has no causal-LM head in transformers {version} "
                                    "(encoder-only, encoder-decoder or not a language model), not a causal LM")


def _kind(module, pname, param, is_head):
    import torch
    from transformers.pytorch_utils import Conv1D

    cls = type(module).__name__.lower()
    if is_head:
        return "linear"
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    if isinstance(module, (torch.nn.Linear, Conv1D)):
        return "linear" if pname == "weight" else "bias"
    if param.dim() == 3 and "conv" not in cls:
        return "experts"
    if "norm" in cls:
        return "norm"
    if param.dim() == 2 and ("router" in cls or "gate" in cls):
        return "router"
    return "other"


def _layers_module(model):
    """(prefix, ModuleList) of the decoder layers: the ModuleList as long as num_hidden_layers."""
    import torch

    n = model.config.get_text_config(decoder=True).num_hidden_layers
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return path, module
    return None, None


def _generic_name(full, layers_prefix, base_prefixes):
    """'model.layers.7.self_attn.q_proj.weight' → ('layers.self_attn.q_proj.weight', 7)."""
    if layers_prefix and full.startswith(layers_prefix + "."):
        idx, _, rest = full[len(layers_prefix) + 1:].partition(".")
        return "layers." + rest, int(idx)
    for p in base_prefixes:
        if full.startswith(p):
            return full[len(p):], None
    return full, None


def _tensor_rows(model):
    import torch

    build = getattr(torch, _BUILD_DTYPE)
    layers_prefix, _ = _layers_module(model)
    base = model.base_model_prefix
    base_prefixes = tuple(p for p in (f"{base}.", "model.", "transformer.", "backbone.") if p)
    head = model.get_output_embeddings()
    head_weight = head.weight if head is not None else None
    in_emb = model.get_input_embeddings()
    tied = head_weight is not None and in_emb is not None and head_weight is in_emb.weight
    modules = dict(model.named_modules())
    rows = {}
    layer_sets = {}

    def add(full, t, kind, module_name, is_buffer, shape=None):
        generic, layer = _generic_name(full, layers_prefix, base_prefixes)
        dtype = _dtype_name(t.dtype)
        pinned = "" if (t.dtype == build and not is_buffer) else dtype
        if is_buffer and t.dtype == build:
            pinned = ""
        shape = tuple(t.shape) if shape is None else shape
        key = (generic, shape, pinned, is_buffer)
        if key not in rows:
            rows[key] = {"name": generic, "kind": kind, "shape": list(shape), "count": 0,
                         "module": module_name, "dtype": pinned}
            layer_sets[key] = []
        rows[key]["count"] += 1
        if layer is not None:
            layer_sets[key].append(layer)

    seen = set()
    for full, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        mod_path, _, pname = full.rpartition(".")
        module = modules[mod_path]
        is_head = head_weight is not None and p is head_weight and not tied
        leaf = "lm_head" if is_head else mod_path.rpartition(".")[2]
        # Conv1D (GPT-2) stores (in, out); listed (out, in) like nn.Linear, as bitsandbytes converts it
        flipped = tuple(reversed(p.shape)) if type(module).__name__ == "Conv1D" and pname == "weight" else None
        add(full, p, _kind(module, pname, p, is_head), leaf, False, flipped)
    for full, b in model.named_buffers():
        mod_path = full.rpartition(".")[0]
        add(full, b, "buffer", mod_path.rpartition(".")[2], True)
    tensors, buffers = [], []
    for key, row in rows.items():
        layers = sorted(set(layer_sets[key]))
        if layers and len(layers) != row["count"]:
            row["per_layer"] = row["count"] // len(layers)
        if layers:
            row["layers"] = layers
        (buffers if key[3] else tensors).append(row)
    return tensors, buffers, tied


def _probe_cache(model, config):
    """Per decoder layer, what the cache transformers picks keeps after a PROBE_TOKENS prefill of one sequence."""
    import torch
    from transformers import cache_utils

    from .workload.steps import cache_keyword

    cache = cache_utils.DynamicCache(config=config)
    ids = torch.zeros((1, PROBE_TOKENS), dtype=torch.long)
    with torch.no_grad():
        model(ids, use_cache=True, logits_to_keep=1, **{cache_keyword(model): cache})
    layers = []
    for i, layer in enumerate(cache.layers):
        row = {"layer": i, "cache_class": type(layer).__name__}
        window = getattr(layer, "sliding_window", None)
        if isinstance(window, int):
            row["window"] = window
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if isinstance(keys, torch.Tensor) and keys.numel():
            held = keys.shape[-2]
            row["tokens_held"] = int(held)
            row["k_per_token"] = keys.numel() // held
            row["v_per_token"] = values.numel() // values.shape[-2]
            row["kv_dtype"] = _dtype_name(keys.dtype)
        states = []
        for attr in ("conv_states", "recurrent_states"):
            for t in (getattr(layer, attr, None) or {}).values():
                if isinstance(t, torch.Tensor):
                    states.append({"kind": attr[:-1], "shape": list(t.shape), "dtype": _dtype_name(t.dtype)})
        if states:
            row["states"] = states
        layers.append(row)
    return layers


def _config_fields(config):
    """The structural numbers the formulas read (None where the config has no such field)."""
    text = config.get_text_config(decoder=True)

    def get(*names):
        for n in names:
            v = getattr(text, n, None)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return v
        return None

    hidden = get("hidden_size", "d_model", "n_embd")
    heads = get("num_attention_heads", "n_head")
    head_dim = get("head_dim")
    if not head_dim and hidden and heads:
        head_dim = hidden // heads
    layer_types = getattr(text, "layer_types", None)
    return {
        "hidden": hidden, "n_layers": get("num_hidden_layers", "n_layer"), "n_heads": heads,
        "n_kv_heads": get("num_key_value_heads") or heads, "head_dim": head_dim,
        "intermediate": get("intermediate_size", "ffn_dim", "n_inner"), "vocab": get("vocab_size"),
        "max_positions": get("max_position_embeddings", "n_positions") or 0,
        "experts_per_token": get("num_experts_per_tok", "experts_per_token", "moe_topk", "top_k"),
        "sliding_window": get("sliding_window"), "attention_chunk_size": get("attention_chunk_size"),
        "layer_types": list(layer_types) if isinstance(layer_types, (list, tuple)) else None,
        "attn_dropout": get("attention_dropout"), "final_logit_softcapping": get("final_logit_softcapping"),
        "attn_logit_softcapping": get("attn_logit_softcapping"),
    }


def build_inventory(cfg, name="config"):
    """The inventory dict of a config.json dict (needs torch and transformers; a few seconds)."""
    import torch
    import transformers
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .tracing.tracer import _cuda_like_kernels, _fake_module_conversions
    from .workload.models import transformers_config

    check_causal_lm(cfg, name)
    try:
        config = transformers_config(cfg)
    except (TypeError, ValueError, KeyError) as e:
        raise UnsupportedModelError(f"{name}: transformers {transformers.__version__} cannot read this "
                                    f"{cfg.get('model_type')!r} config: {e}") from None
    config.use_cache = True
    transformers.logging.set_verbosity_error()  # kernel fall-back notices are not the user's concern here
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    notes = []
    with fake, _fake_module_conversions(fake), _cuda_like_kernels([]):
        try:
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, _BUILD_DTYPE))
        except Exception as e:  # noqa: BLE001 — any build failure is the model's, said in one line
            raise UnsupportedModelError(f"{name}: transformers {transformers.__version__} cannot build model_type "
                                        f"{cfg.get('model_type')!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        model.eval()
        tensors, buffers, tied = _tensor_rows(model)
        try:
            cache_layers = _probe_cache(model, model.config)
        except Exception as e:  # noqa: BLE001 — the weights stand; the cache falls back to the config
            cache_layers = None
            notes.append(f"cache not probed ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); "
                         "KV cache taken as full attention in every layer")
    fields = _config_fields(model.config)
    return {
        "schema": INVENTORY_SCHEMA, "model_type": cfg.get("model_type"), "name": name,
        "config_sha256": config_hash(cfg), "transformers": transformers.__version__,
        "torch": torch.__version__.split("+")[0], "architecture": type(model).__name__,
        "build_dtype": "bf16", "tie_embeddings": tied,
        "attn_implementations": ["sdpa", "eager"] if getattr(model, "_supports_sdpa", True) else ["eager"], "n_params": sum(p.numel() for p in model.parameters()),
        "fields": fields, "tensors": tensors, "buffers": buffers, "cache_layers": cache_layers, "notes": notes,
    }


def inventory_path(cfg, folder=None, version=None):
    """Where the inventory of `cfg` built by this (or `version` of) transformers lives (default: the user cache)."""
    import importlib.metadata

    version = version or importlib.metadata.version("transformers")
    return os.path.join(folder or inventory_cache_dir(), inventory_file_name(cfg, config_hash(cfg), version))


def ensure_inventory(cfg, name="config", rebuild=False, folder=None):
    """Path of the inventory of `cfg` for the installed transformers, built and written to `folder` (default:
    the user cache) if missing. Hand-modelled model types need none (returns None)."""
    if cfg.get("model_type") in FAMILIES:
        return None
    path = inventory_path(cfg, folder)
    if os.path.isfile(path) and not rebuild:
        return path
    inv = build_inventory(cfg, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(inv, f, indent=1, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def ensure_for_model(model_name, rebuild=False):
    """`ensure_inventory` for a --model value (catalog name, path or Hub folder); None for hand-modelled types."""
    from formulas.catalog import get_shape, load_config, resolve_config_path

    cfg = load_config(model_name)
    if cfg.get("model_type") in FAMILIES:
        return None
    if not rebuild:
        try:
            get_shape(model_name)  # a shipped or cached inventory already answers
            return None
        except UnsupportedModelError:
            pass
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        mt = cfg.get("model_type")
        raise UnsupportedModelError(
            f"--model {model_name}: model_type {mt!r} is not hand-modelled and has no inventory yet; its inventory is "
            "built once from transformers: pip install torch transformers") from None
    path = ensure_inventory(cfg, resolve_config_path(model_name), rebuild=rebuild)
    get_shape.cache_clear()
    return path
