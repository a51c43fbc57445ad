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

import contextlib
import json
import logging
import os

from formulas.catalog import config_sha256, inventory_cache_dir, inventory_file_name
from formulas.dtypes import DTYPE_BYTES
from formulas.remote_code import REMOTE_CODE, needs_remote_code, unmapped_message
from formulas.shapes import FAMILIES, INVENTORY_SCHEMA, UnsupportedModelError

PROBE_TOKENS = 2  # prefill length of the cache probe (a sliding window keeps min(tokens, window - 1))
_BUILD_DTYPE = "bfloat16"


def _why(e, limit=160):
    """'Type: first line of the message' (cut to `limit` characters) — a failure said in one line."""
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first[:limit] if limit else first}"


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
        if needs_remote_code(cfg):
            raise UnsupportedModelError(unmapped_message(cfg, name))
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
            # other float tensors the layer keeps per token (DeepSeek-V3.2's indexer keys, (batch, tokens, 128))
            extra = 0
            for name, t in vars(layer).items():
                if name in ("keys", "values") or not isinstance(t, torch.Tensor) or not t.is_floating_point():
                    continue
                if t.dim() >= 2 and t.numel() and held in tuple(t.shape)[1:]:
                    extra += t.numel() // held
            if extra:
                row["other_per_token"] = extra
        states = []
        for attr in ("conv_states", "recurrent_states"):
            for t in (getattr(layer, attr, None) or {}).values():
                if isinstance(t, torch.Tensor):
                    states.append({"kind": attr[:-1], "shape": list(t.shape), "dtype": _dtype_name(t.dtype)})
        if states:
            row["states"] = states
        layers.append(row)
    return layers


# (batch, tokens) of the state-layer probe: tokens a multiple of the 64-token chunks of chunked scans; two
# lengths give the per-token slope, two batches what is per sequence and what is per layer
PROBE_SHAPES = ((1, 128), (1, 256), (2, 128))


class _ProbeDone(Exception):
    """Raised by the last probed layer's hook: the rest of the forward is not needed."""


def _live_counter():
    """A dispatch mode that counts the bytes of live storages (fake ones included) and their peak."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.weak import WeakIdKeyDictionary

    import torch

    class Live(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live = self.peak = 0
            self._seen = WeakIdKeyDictionary()

        def _free(self, n):
            self.live -= n

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # storages that existed before (parameters, inputs) are not new when an op returns a view of them
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, torch.Tensor) and t.untyped_storage() not in self._seen:
                    self._seen[t.untyped_storage()] = False
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    if st not in self._seen:
                        self._seen[st] = True
                        n = st.nbytes()
                        self.live += n
                        weakref.finalize(st, self._free, n)
            self.peak = max(self.peak, self.live)
            return out

    return Live()


def _state_probe_shapes(config):
    """PROBE_SHAPES, or at the model's scan chunk (Mamba-2's `chunk_size` / `mamba_chunk_size`) where it is
    longer: a chunked scan pads every sequence to whole chunks, so shorter probes would all cost one chunk."""
    text = config.get_text_config(decoder=True)
    chunk = max((v for k, v in text.to_dict().items() if k in ("chunk_size", "mamba_chunk_size") and isinstance(v, int)),
                default=0)
    (_, tokens), _, _ = PROBE_SHAPES
    if chunk > tokens:
        return ((1, chunk), (1, 2 * chunk), (2, chunk)), chunk
    return PROBE_SHAPES, chunk


def _probe_layers(model, config, layer_indices, state_bytes, shapes=None, submodule=None):
    """Per probed decoder layer and PROBE_SHAPES (batch, tokens), at bf16:
    `working_set` — the most bytes alive above those at the layer's start during a no-grad prefill, less
    the cache state the layer allocates; `saved` / `saved_frozen` — the bytes a training forward leaves
    alive after the layer (what autograd keeps for backward), less its output, with the weights
    trainable / frozen (a LoRA base). transformers' own code runs: its PyTorch reference path where
    the fused kernels (flash-linear-attention, mamba-ssm, causal-conv1d) are not installed."""
    _, layers = _layers_module(model)
    targets = {i: (submodule(layers[i]) if submodule else layers[i]) for i in layer_indices}
    result = {i: {"working_set": [], "saved": [], "saved_frozen": []} for i in layer_indices}
    last = max(layer_indices)
    # the layers before the first probed one pass their input on unchanged (nothing of theirs is measured);
    # their forward is replaced on the instance, so attributes the model's loop reads (block_type …) stay
    skipped = [layers[j] for j in range(min(layer_indices))]
    for layer in skipped:
        layer.forward = _pass_through
    try:
        _run_probes(model, config, layers, targets, result, last, state_bytes, shapes)
    finally:
        for layer in skipped:
            del layer.forward
    return result


def _pass_through(hidden_states, *args, **kwargs):
    """A decoder layer's forward that returns its input."""
    return hidden_states


def _run_probes(model, config, layers, targets, result, last, state_bytes, shapes):
    import torch
    from transformers import cache_utils

    from .workload.steps import cache_keyword

    layer_indices = sorted(targets)
    for batch, tokens in shapes or PROBE_SHAPES:
        for mode in ("working_set", "saved", "saved_frozen"):
            counter = _live_counter()
            state = {}

            def pre(module, args, kwargs, _i=None):
                state["base"] = counter.live
                counter.peak = counter.live

            def post(module, args, kwargs, output, _i=None):
                out = output[0] if isinstance(output, tuple) else output
                if mode == "working_set":  # less the cache state the layer allocates on its first forward
                    result[_i][mode].append(counter.peak - state["base"] - state_bytes.get(_i, 0))
                else:
                    result[_i][mode].append(counter.live - state["base"] - out.untyped_storage().nbytes())
                if _i == last:
                    raise _ProbeDone  # the layers after the last probed one are not needed

            handles = [targets[i].register_forward_pre_hook(lambda m, a, k, _i=i: pre(m, a, k, _i), with_kwargs=True)
                       for i in layer_indices]
            handles += [targets[i].register_forward_hook(lambda m, a, k, o, _i=i: post(m, a, k, o, _i), with_kwargs=True)
                        for i in layer_indices]
            ids = torch.zeros((batch, tokens), dtype=torch.long)
            try:
                if mode == "working_set":
                    cache = cache_utils.DynamicCache(config=config)
                    with torch.no_grad(), counter, contextlib.suppress(_ProbeDone):
                        model(ids, use_cache=True, logits_to_keep=1, **{cache_keyword(model): cache})
                    del cache
                else:
                    model.requires_grad_(mode == "saved")
                    emb = model.get_input_embeddings()
                    hook = emb.register_forward_hook(lambda m, a, o: o.requires_grad_() if not o.requires_grad else o)
                    try:
                        with counter, contextlib.suppress(_ProbeDone):
                            model(ids, use_cache=False, logits_to_keep=1)
                    finally:
                        hook.remove()
                        model.requires_grad_(False)
            finally:
                for h in handles:
                    h.remove()


NORM_PROBE_TOKENS = 64
# three lengths, long enough that the score matrices outgrow the projections: they grow with the square
EAGER_PROBE_SHAPES = ((1, 2048), (1, 4096), (1, 8192))


def _attention_module(layer):
    """The attention block of a decoder layer (self_attn, attention, attn …)."""
    for name, child in layer.named_children():
        if "attention" in type(child).__name__.lower() or "attn" in name or "attention" in name:
            return child
    raise ValueError(f"{type(layer).__name__}: no attention block among {[n for n, _ in layer.named_children()]}")


def _probe_eager(model, config, cache_layers, heads, max_positions=0, impl="eager"):
    """Bytes per attention score (per head, query and key) that the first full-attention layer needs under
    `impl` attention at bf16 — no-grad working set, and saved for backward with trainable / frozen weights:
    the square term of a quadratic through three lengths. Eager: sinks (gpt-oss), soft-capping (Gemma 2)
    and a softmax kept in bf16 change it, so it is read off the model rather than assumed. SDPA: 0 where
    CUDA would run flash or memory-efficient attention (the tracer's kernel choice runs here too), the
    score matrix where a mask or unequal heads leave only the math kernel (Falcon's multi-query)."""
    layer = next((r["layer"] for r in cache_layers if "k_per_token" in r and "window" not in r), None)
    if layer is None or not heads:
        return None
    shapes = EAGER_PROBE_SHAPES
    if max_positions and max_positions < shapes[-1][1]:  # within the positions the model has (learned, ALiBi)
        shapes = tuple((1, max_positions // d) for d in (4, 2, 1))
    before = model.config._attn_implementation
    if before != impl:
        model.set_attn_implementation(impl)
    try:
        probed = _probe_layers(model, config, [layer], {}, shapes, _attention_module)[layer]
    finally:
        if before != impl:
            model.set_attn_implementation(before)
    (_, s1), (_, s2), (_, s3) = shapes
    out = {"layer": layer}
    for key, v in probed.items():
        # v = c + a s + q s² at s1, s2 = 2 s1, s3 = 4 s1 (second differences)
        d1, d2 = (v[1] - v[0]) / (s2 - s1), (v[2] - v[1]) / (s3 - s2)
        q = (d2 - d1) / (s3 - s1)
        out[key] = q / heads
    return out


def _probe_norm(model, hidden):
    """Bytes the first hidden-size norm of the first decoder layer saves for backward on NORM_PROBE_TOKENS
    bf16 tokens, with its weight trainable and frozen (its input and output not counted)."""
    import torch

    _, layers = _layers_module(model)
    norm = None
    for module in layers[0].modules():
        w = getattr(module, "weight", None)
        if "norm" in type(module).__name__.lower() and isinstance(w, torch.nn.Parameter) and tuple(w.shape) == (hidden,):
            norm = module
            break
    if norm is None:
        return None
    out = {}
    for key, trainable in (("saved", True), ("saved_frozen", False)):
        norm.requires_grad_(trainable)
        x = torch.zeros((1, NORM_PROBE_TOKENS, hidden), dtype=torch.bfloat16, requires_grad=True)
        counter = _live_counter()
        with counter:
            y = norm(x)
        out[key] = counter.live - y.untyped_storage().nbytes()
        del y
    norm.requires_grad_(False)
    return {"class": type(norm).__name__, "tokens": NORM_PROBE_TOKENS, **out}


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
        "n_kv_heads": get("num_key_value_heads", "num_kv_heads") or (1 if getattr(text, "multi_query", False) else heads),
        "head_dim": head_dim,
        "intermediate": get("intermediate_size", "ffn_dim", "n_inner"), "vocab": get("vocab_size"),
        "max_positions": get("max_position_embeddings", "n_positions") or 0,
        "experts_per_token": get("num_experts_per_tok", "experts_per_token", "moe_topk", "top_k"),
        "sliding_window": get("sliding_window"), "attention_chunk_size": get("attention_chunk_size"),
        "layer_types": list(layer_types) if isinstance(layer_types, (list, tuple)) else None,
        "attn_dropout": get("attention_dropout"), "final_logit_softcapping": get("final_logit_softcapping"),
        "attn_logit_softcapping": get("attn_logit_softcapping"),
    }


def _peft_default_targets(model_type):
    """peft's default LoRA target modules for the model type (None without peft or without an entry)."""
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as targets
    except Exception:  # noqa: BLE001 — peft is optional here
        return None
    found = targets.get(model_type)
    return list(found) if found else None


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
    except Exception as e:  # noqa: BLE001 — transformers' config validation raises several kinds
        raise UnsupportedModelError(f"{name}: transformers {transformers.__version__} cannot read this "
                                    f"{cfg.get('model_type')!r} config: {e}") from None
    config.use_cache = True
    transformers.logging.set_verbosity_error()  # kernel fall-back notices are not the user's concern here
    # a probe that fails is a note in the inventory; torch would also log its traceback
    logging.getLogger("torch._subclasses.fake_tensor").setLevel(logging.CRITICAL)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    notes = []
    with fake, _fake_module_conversions(fake), _cuda_like_kernels([]):
        try:
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, _BUILD_DTYPE))
        except Exception as e:  # noqa: BLE001 — any build failure is the model's, said in one line
            raise UnsupportedModelError(f"{name}: transformers {transformers.__version__} cannot build model_type "
                                        f"{cfg.get('model_type')!r}: {_why(e, None)}") from None
        model.eval()
        fields = _config_fields(model.config)
        tensors, buffers, tied = _tensor_rows(model)
        model.requires_grad_(False)
        try:
            cache_layers = _probe_cache(model, model.config)
        except Exception as e:  # noqa: BLE001 — the weights stand; the cache falls back to the config
            cache_layers = None
            notes.append(f"cache not probed ({_why(e)}); "
                         "KV cache taken as full attention in every layer")
        try:
            norm_probe = _probe_norm(model, fields["hidden"])
        except Exception as e:  # noqa: BLE001 — the Llama-style norm rule stands in
            norm_probe = None
            notes.append(f"norm not probed ({type(e).__name__})")
        eager_probe = sdpa_probe = None
        if cache_layers:
            try:
                eager_probe = _probe_eager(model, model.config, cache_layers, fields["n_heads"], fields["max_positions"])
            except Exception as e:  # noqa: BLE001 — the eager rule stands in
                notes.append(f"eager attention not probed ({_why(e, 120)})")
            if getattr(model, "_supports_sdpa", True):
                try:
                    sdpa_probe = _probe_eager(model, model.config, cache_layers, fields["n_heads"], fields["max_positions"],
                                              "sdpa")
                except Exception as e:  # noqa: BLE001 — the rule's linear SDPA stands in
                    notes.append(f"sdpa attention not probed ({_why(e, 120)})")
        state_probe = None
        if cache_layers:
            # one layer of each kind with a fixed state: the first of each decoder-layer class
            first = {}
            for row in cache_layers:
                # layers the per-op rule does not cover: a linear-attention / SSM state (alone or beside
                # attention, as Falcon-H1's hybrid layers), or no cache at all (Nemotron-H's MLP-only blocks)
                if row.get("states") or "k_per_token" not in row:
                    kind = ("states" if row.get("states") else "none") + ("+kv" if "k_per_token" in row else "")
                    first.setdefault((type(_layers_module(model)[1][row["layer"]]).__name__, kind), row["layer"])
            if first:
                try:
                    state_bytes = {}
                    for row in cache_layers:
                        n = 0
                        for st in row.get("states", ()):
                            k = DTYPE_BYTES.get(st["dtype"], 2)
                            for d in st["shape"]:
                                k *= d
                            n += k
                        state_bytes[row["layer"]] = n
                    shapes, chunk = _state_probe_shapes(model.config)
                    probed = _probe_layers(model, model.config, sorted(first.values()), state_bytes, shapes)
                    state_probe = {"shapes": [list(s) for s in shapes], "dtype": "bf16",
                                   "chunk": chunk,
                                   "layers": {str(i): v for i, v in probed.items()}}
                except Exception as e:  # noqa: BLE001 — the prediction then says it has no rule for them
                    notes.append(f"state layers not probed ({_why(e)})")
    return {
        "schema": INVENTORY_SCHEMA, "model_type": cfg.get("model_type"), "name": name,
        "config_sha256": config_sha256(cfg), "transformers": transformers.__version__,
        "torch": torch.__version__.split("+")[0], "architecture": type(model).__name__,
        "build_dtype": "bf16", "tie_embeddings": tied,
        "attn_implementations": ["sdpa", "eager"] if getattr(model, "_supports_sdpa", True) else ["eager"],
        "lora_targets": _peft_default_targets(cfg.get("model_type")), "n_params": sum(p.numel() for p in model.parameters()),
        "fields": fields, "tensors": tensors, "buffers": buffers, "cache_layers": cache_layers,
        "state_probe": state_probe, "norm_probe": norm_probe, "eager_probe": eager_probe,
        "sdpa_probe": sdpa_probe, "notes": notes,
    }


def inventory_path(cfg, folder=None, version=None):
    """Where the inventory of `cfg` built by this (or `version` of) transformers lives (default: the user cache)."""
    import importlib.metadata

    version = version or importlib.metadata.version("transformers")
    return os.path.join(folder or inventory_cache_dir(), inventory_file_name(cfg, config_sha256(cfg), version))


def ensure_inventory(cfg, name="config", rebuild=False, folder=None):
    """Path of the inventory of `cfg` for the installed transformers, built and written to `folder` (default:
    the user cache) if missing. Hand-modelled model types need none (returns None)."""
    if cfg.get("model_type") in FAMILIES or cfg.get("model_type") in REMOTE_CODE:
        return None
    path = inventory_path(cfg, folder)
    if os.path.isfile(path) and not rebuild:
        return path
    inv = build_inventory(cfg, name)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(inv, f, indent=1, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as e:
        raise UnsupportedModelError(f"{name}: cannot write its inventory to {os.path.dirname(path)} ({e.strerror or e}); "
                                    "set VRAMLAB_CACHE to a writable folder") from None
    return path


def ensure_for_model(model_name):
    """`ensure_inventory` for a --model value (catalog name, path or Hub folder); None for hand-modelled types."""
    from formulas.catalog import get_shape, load_config, resolve_config_path

    cfg = load_config(model_name)
    if cfg.get("model_type") in FAMILIES or cfg.get("model_type") in REMOTE_CODE:
        return None
    try:
        get_shape(model_name)  # a shipped or cached inventory already answers
        return None
    except UnsupportedModelError:
        pass  # none, or a damaged or older one: built (again) below
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        mt = cfg.get("model_type")
        remote = (" (if transformers knows the model type: its config also names remote code, which vramlab does not "
                  "run)" if needs_remote_code(cfg) else "")
        raise UnsupportedModelError(
            f"--model {model_name}: model_type {mt!r} is not hand-modelled and has no inventory yet; its inventory is "
            f"built once from transformers: pip install torch transformers{remote}") from None
    import sys
    import time

    check_causal_lm(cfg, model_name)  # refused in one line before any building
    t0 = time.perf_counter()
    print(f"vramlab: model_type {cfg.get('model_type')!r} is not hand-modelled: reading its inventory off the model "
          "transformers builds (once; cached)…", file=sys.stderr, flush=True)
    path = ensure_inventory(cfg, resolve_config_path(model_name), rebuild=True)
    print(f"vramlab: inventory built in {time.perf_counter() - t0:.1f} s: {path}", file=sys.stderr, flush=True)
    get_shape.cache_clear()
    return path
