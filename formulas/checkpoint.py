"""Weights as a checkpoint stores them: bytes per category and dtype from its safetensors headers.

A checkpoint's headers (read by harness/hub.py) say every stored tensor's name, dtype and shape.
That is exact where a config-based count has to guess: pre-quantized formats (FP8 block scales,
GPTQ/AWQ, MXFP4 blocks), tied or untied heads, extra heads (MTP layers). `stored_weights` sorts the
tensors into the predictor's parts — decoder layers, embeddings, head, the rest, and the
quantization state among them — and `checkpoint_dtype` names the `--dtype` the checkpoint is in,
so a prediction uses the stored bytes only for the precision they are stored at.
Source: https://huggingface.co/docs/safetensors (format: 8-byte length, JSON header, data).
"""

import re
from dataclasses import dataclass, replace

# Bits per element of the safetensors dtypes (safetensors/src/tensor.rs Dtype).
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
              "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
              "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "C64": 64}
_FLOAT_DTYPES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}
# Names of quantization state beside packed weights: FP8 block scales, GPTQ/AWQ scales, zeros and
# g_idx, bitsandbytes' serialized state, MXFP4's per-block scales.
_QUANT_SUFFIXES = (".weight_scale_inv", ".weight_scale", ".input_scale", ".scales", ".qzeros", ".g_idx", ".absmax",
                   ".quant_map", ".nested_absmax", ".nested_quant_map", ".SCB", ".weight_format", "_scales")
_QUANT_MARKERS = (".quant_state.",)
_EMBEDDINGS = ("embed_tokens", "wte", "wpe", "embed_in", "embed_positions",
               "word_embeddings", "tok_embeddings")  # ChatGLM's and InternLM2's remote code (formulas/remote_code.py)
_HEADS = ("lm_head", "embed_out")
_REMOTE_HEADS = ("transformer.output_layer.weight", "output.weight")  # ChatGLM's and InternLM2's remote code
# config.json quant_method → the --dtype of a pre-quantized checkpoint
_QUANT_METHODS = {"fp8": "fp8", "gptq": "gptq-int4", "awq": "awq-int4", "mxfp4": "mxfp4"}


# Tensors checkpoints store that transformers does not load as weights: old causal-mask buffers
# (GPT-2, GPT-NeoX) and rotary tables.
_LEGACY_BUFFERS = (".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias", ".inv_freq")
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


class CheckpointError(ValueError):
    """Headers that are not a checkpoint the predictor can use."""


@dataclass(frozen=True)
class StoredWeights:
    """Bytes a checkpoint stores, split as the predictor splits weights (see predict._static).

    The four parts count what transformers loads as weights; what it does not load (layers past
    num_hidden_layers such as MTP heads, an lm_head tied to the embedding, old mask buffers) and
    the persistent buffers the formula counts as buffers are in `unused`."""

    layer_bytes: int  # decoder-layer tensors, quantization state included
    layer_quant_bytes: int  # of which quantization state
    embed_bytes: int  # token (and position) embeddings
    head_bytes: int  # an untied lm_head
    other_bytes: int  # final norm and anything else, quantization state included
    other_quant_bytes: int  # of which quantization state
    by_dtype: tuple  # ((safetensors dtype, bytes), ...) of every stored tensor, largest first
    unused: tuple  # ((why, bytes, tensors), ...) stored but not counted as weights
    n_tensors: int  # every stored tensor
    dtype: object = None  # the --dtype the checkpoint is stored at (checkpoint_dtype), None when unknown
    quant_method: str = ""  # config.json's quantization_config.quant_method, when it has one

    @property
    def total_bytes(self):
        """Weights and quantization state as loaded."""
        return self.layer_bytes + self.embed_bytes + self.head_bytes + self.other_bytes

    @property
    def quant_bytes(self):
        return self.layer_quant_bytes + self.other_quant_bytes

    @property
    def stored_bytes(self):
        """Every tensor in the files."""
        return sum(n for _, n in self.by_dtype)


def tensor_bytes(dtype, shape):
    """Stored bytes of one tensor."""
    if dtype not in DTYPE_BITS:
        raise CheckpointError(f"safetensors dtype {dtype!r} is not one this reader knows")
    n = 1
    for d in shape:
        n *= d
    return -(-n * DTYPE_BITS[dtype] // 8)


def _is_quant(name):
    return name.endswith(_QUANT_SUFFIXES) or any(m in name for m in _QUANT_MARKERS)


def _part(name):
    """layers | embed | head | other, from a tensor's name in a transformers checkpoint."""
    parts = name.split(".")
    if "layers" in parts or "h" in parts or "blocks" in parts:
        return "layers"
    if parts[0] in _HEADS or name in _REMOTE_HEADS:
        return "head"
    if any(p in _EMBEDDINGS for p in parts):
        return "embed"
    return "other"


def _buffer_suffixes(shape):
    """Layer-index-free dotted names of the persistent buffers the formula counts (DeepSeek's gate bias)."""
    return tuple("." + b.name for b in shape.buffers if "." in b.name) if shape is not None else ()


def _unused(name, shape, buffers):
    """Why transformers does not load this stored tensor as a weight, or None."""
    if name.endswith(_LEGACY_BUFFERS):
        return "mask and rotary buffers transformers rebuilds"
    if shape is None:
        return None
    m = _LAYER_INDEX.search(name)
    if m and int(m.group(1)) >= shape.n_layers:
        return f"layers past num_hidden_layers={shape.n_layers} (e.g. MTP), not loaded by transformers"
    if buffers and ("." + _LAYER_INDEX.sub(lambda m: m.group(0).replace("." + m.group(1), ""), name)).endswith(buffers):
        return "persistent buffers (counted as buffers)"
    if shape.tie_embeddings and _part(name) == "head":
        return "lm_head tied to the token embedding (one tensor once loaded)"
    return None


# A checkpoint whose loaded weights are outside this factor of what the config gives at the same --dtype is another
# model's, or part of one: stored extras (MTP layers, untied heads, scales) move the total by tens of percent at most.
SIZE_FACTOR = 2.0


def check_layers(tensors, shape):
    """CheckpointError unless the checkpoint stores every decoder layer the config has (0 … n_layers − 1)."""
    found = set()
    for name, _, _ in tensors:
        m = _LAYER_INDEX.search(name)
        if m and _part(name) == "layers":
            found.add(int(m.group(1)))
    missing = sorted(set(range(shape.n_layers)) - found)
    if missing:
        shown = ", ".join(map(str, missing[:6])) + (" …" if len(missing) > 6 else "")
        raise CheckpointError(f"the checkpoint stores {shape.n_layers - len(missing)} of the config's {shape.n_layers} "
                              f"decoder layers (missing layers {shown}): it is not this config's checkpoint, or only "
                              "part of it")


def check_checkpoint_size(stored, formula_bytes):
    """CheckpointError where a checkpoint at the spec's own --dtype holds far more or less than the config's formula."""
    if stored.dtype is None or not formula_bytes:
        return  # a quantization the formula does not model: the stored bytes are the only count there is
    ratio = stored.total_bytes / formula_bytes
    if not 1 / SIZE_FACTOR <= ratio <= SIZE_FACTOR:
        raise CheckpointError(f"the checkpoint's weights are {ratio:.2f}× what the config gives at --dtype "
                              f"{stored.dtype} ({stored.total_bytes:,} against {formula_bytes:,} bytes): it is not this "
                              "config's checkpoint, or only part of it")


def stored_weights(tensors, shape=None, config=None):
    """StoredWeights from [(name, safetensors dtype, shape)].

    `shape` (a formulas.shapes.ModelShape) sorts out what transformers does not load, and every decoder layer
    it has must be stored (check_layers); `config` (the config.json dict) names the checkpoint's --dtype."""
    if not tensors:
        raise CheckpointError("the checkpoint stores no tensors")
    sums = {"layers": 0, "embed": 0, "head": 0, "other": 0}
    quant = {"layers": 0, "other": 0}
    dtypes, unused = {}, {}
    buffers = _buffer_suffixes(shape)
    for name, dtype, dims in tensors:
        n = tensor_bytes(dtype, dims)
        dtypes[dtype] = dtypes.get(dtype, 0) + n
        why = _unused(name, shape, buffers)
        if why:
            b, k = unused.get(why, (0, 0))
            unused[why] = (b + n, k + 1)
            continue
        part = _part(name)
        sums[part] += n
        if _is_quant(name):
            quant["layers" if part == "layers" else "other"] += n
    if shape is not None:
        check_layers(tensors, shape)
    sw = StoredWeights(layer_bytes=sums["layers"], layer_quant_bytes=quant["layers"], embed_bytes=sums["embed"],
                       head_bytes=sums["head"], other_bytes=sums["other"], other_quant_bytes=quant["other"],
                       by_dtype=tuple(sorted(dtypes.items(), key=lambda kv: -kv[1])),
                       unused=tuple((why, b, k) for why, (b, k) in unused.items()), n_tensors=len(tensors))
    qc = (config or {}).get("quantization_config")
    method = str(qc.get("quant_method", "")).lower() if isinstance(qc, dict) else ""
    return replace(sw, dtype=checkpoint_dtype(config or {}, sw), quant_method=method)


def checkpoint_dtype(config, stored):
    """The --dtype a checkpoint is stored at: its quantization method, else its float dtype by most bytes.

    None for a quantization the predictor does not model (compressed-tensors, GPTQ at other
    than 4 bits, …): its stored bytes are then the only count there is."""
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if isinstance(qc, dict):
        method = str(qc.get("quant_method", "")).lower()
        if method == "bitsandbytes":
            return "nf4" if qc.get("load_in_4bit") and qc.get("bnb_4bit_quant_type", "fp4") == "nf4" else \
                "fp4" if qc.get("load_in_4bit") else "int8"
        if method in ("gptq", "awq") and qc.get("bits", 4) != 4:
            return None
        return _QUANT_METHODS.get(method)
    for dtype, _ in stored.by_dtype:
        if dtype in _FLOAT_DTYPES:
            return _FLOAT_DTYPES[dtype]
    return None
