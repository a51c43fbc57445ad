"""The software stack a prediction assumes: library versions → the behaviours that change memory.

How much a step takes depends on transformers, peft, torch and bitsandbytes, not only on the model.
Every behaviour that changed across the versions vramlab models sits in BEHAVIOURS, once, with the
first version that has the new behaviour and the PR or source line that changed it. A Stack is four
versions; `behaviour(stack, key)` reads the table. `Spec.stack` carries the versions asked for as
((package, version), ...); () means the newest modelled versions (NEWEST). The CLI fills it with what
is installed (harness/env.py reads importlib.metadata, without importing torch) unless
--transformers / --peft / --torch / --bitsandbytes say otherwise.

Pure Python: no torch, no I/O.
"""

from dataclasses import dataclass, replace
from functools import lru_cache

from .versions import parse_version  # noqa: F401  (the one version parser; re-exported)

PACKAGES = ("transformers", "peft", "torch", "bitsandbytes")
# The versions modelled: about the last two and a half years (mid-2023, the QLoRA paper's stack, to now).
OLDEST = {"transformers": "4.30.0", "peft": "0.4.0", "torch": "2.0.0", "bitsandbytes": "0.39.0"}
NEWEST = {"transformers": "5.24.0", "peft": "0.21.2", "torch": "2.14.1", "bitsandbytes": "0.50.2"}


@dataclass(frozen=True)
class Behaviour:
    """One behaviour that changed: `old` below `since`, `new` from it on."""

    key: str  # what the predictor reads (behaviour(stack, key))
    package: str
    since: str  # first release with `new`
    old: object
    new: object
    what: str  # what changed, and what it does to memory
    source: str  # the PR / commit and the source line


BEHAVIOURS = (
    Behaviour(
        "experts", "transformers", "5.0.0", "linear", "fused",
        "MoE experts: an nn.ModuleList of nn.Linear per expert (Mixtral block_sparse_moe.experts.{i}.w1/w2/w3) "
        "became fused 3-D nn.Parameters (mlp.experts.gate_up_proj [E, 2I, H] / down_proj [E, H, I]). bitsandbytes "
        "via transformers replaces nn.Linear only, so 4.x quantizes every expert and 5.x (to 5.24 at least) keeps "
        "them in the load dtype — fp32 after peft's kbit prep; LoRA all-linear adapts every expert's w1/w2/w3 in "
        "4.x, and on 5.x what peft decides (peft_moe_targets)",
        "PR #41580 'Refactor weight loading' (5.0.0): models/mixtral/modeling_mixtral.py MixtralExperts; 4.57 "
        "MixtralSparseMoeBlock.experts = nn.ModuleList of MixtralBlockSparseTop2MLP (w1/w2/w3 nn.Linear); "
        "integrations/bitsandbytes.py replace_with_bnb_linear replaces nn.Linear only (5.24: `type(module) is "
        "nn.Linear`); bitsandbytes' replace_parameter_4bit (0.48) is not called by transformers"),
    Behaviour(
        "logits_upcast", "transformers", "4.46.0", "forward", "loss",
        "where the logits become fp32: up to 4.45 the model's forward upcast them (`logits = logits.float()`) on "
        "every position, in training and in generate's prefill alike; since 4.46 only the loss upcasts, and "
        "generate computes the last position's logits only",
        "4.44.2 models/llama/modeling_llama.py LlamaForCausalLM.forward `logits = logits.float()`; 4.45.2 "
        "`self.lm_head(...).float()`; removed in 4.46.0 (PR #34191 loss_utils.ForCausalLMLoss, PR #31292 "
        "num_logits_to_keep, PR #34147)"),
    Behaviour(
        "shift_copy", "transformers", "4.49.0", True, False,
        "the causal-LM loss shifted the logits with a copy, `shift_logits = logits[..., :-1, :].contiguous()` "
        "(T×V×4 bytes more at the loss); since 4.49 it pads the labels, `nn.functional.pad(labels, (0, 1), "
        "value=ignore_index)`, and shifts those",
        "loss/loss_utils.py ForCausalLMLoss line 39 in 4.48.x (shift_logits … .contiguous()) and 4.49.0 "
        "(labels padded); inline in modeling_llama.py before 4.46"),
    Behaviour(
        "legacy_cache", "transformers", "4.42.0", True, False,
        "generate's KV cache between steps: tuples of tensors up to 4.41 (4.36–4.41 converted them to a "
        "DynamicCache inside each forward and back), so every decode step concatenated a whole new cache while "
        "the previous step's tuples stayed referenced by generate until the step returned — two caches at the "
        "step's peak; since 4.42 generate keeps one DynamicCache and each layer's old K/V is freed as its "
        "concatenation replaces it",
        "4.35.2 models/llama/modeling_llama.py LlamaAttention.forward `key_states = torch.cat([past_key_value[0], "
        "key_states], dim=2)` … `past_key_value = (key_states, value_states)`; 4.42.0 generation/utils.py lines "
        "1775-1783 ('Use DynamicCache() instance by default. This will avoid back and forth from legacy format "
        "that keeps copying the cache thus using much more memory')"),
    Behaviour(
        "rope_cache_llama", "transformers", "4.41.0", True, False,
        "Llama's rotary embedding, one per attention layer, registered cos and sin caches for every position "
        "(`_cos_cached`/`_sin_cached`: max_position_embeddings × head_dim each, in the default dtype — the "
        "model's at load) up to 4.40: buffers of 2 · positions · head_dim per layer",
        "4.40.2 models/llama/modeling_llama.py LlamaRotaryEmbedding.__init__ lines 112-113 ('For BC we register "
        "cos and sin cached'); gone in 4.41.2"),
    Behaviour(
        "rope_cache_mixtral", "transformers", "4.48.0", True, False,
        "Mixtral's rotary embedding kept the same per-layer cos/sin caches (`_set_cos_sin_cache`) up to 4.47",
        "4.47.0 models/mixtral/modeling_mixtral.py MixtralRotaryEmbedding._set_cos_sin_cache "
        "(`register_buffer(\"cos_cached\", …)`); gone in 4.48.0"),
    Behaviour(
        "sdpa_gqa", "transformers", "4.54.0", "repeat", "native",
        "grouped-query attention under SDPA: up to 4.53 the K/V heads were copied to every query head "
        "(`repeat_kv`) before the kernel, which then kept those copies for backward; since 4.54 SDPA runs on the "
        "KV heads (`enable_gqa=True`) when torch ≥ 2.5 and no mask is passed (training without padding, generate "
        "without it), else it still repeats",
        "4.54.0 integrations/sdpa_attention.py use_gqa_in_sdpa (torch ≥ 2.5, attention_mask is None) and "
        "sdpa_attention_forward lines 53-55; 4.53 and earlier call repeat_kv unconditionally"),
    Behaviour(
        "default_attn", "transformers", "4.36.0", "eager", "sdpa",
        "attention implementation when none is asked for: eager (keeps the T×T probabilities per head) before "
        "4.36, SDPA since (with torch ≥ 2.1.1), still the default in 5.24",
        "4.36.2 modeling_utils.py _check_and_enable_sdpa / _autoset_attn_implementation (lines 1309-1313); "
        "4.35.2 Llama has no _supports_sdpa"),
    Behaviour(
        "reentrant", "transformers", "5.0.0", True, False,
        "gradient_checkpointing_enable() without kwargs: reentrant checkpointing up to 4.57 (torch's own default "
        "before 4.38, `{\"use_reentrant\": True}` from 4.38), non-reentrant since 5.0. A reentrant checkpoint "
        "runs the layer's forward under no_grad, so bitsandbytes layers that keep their input on ctx (int8's "
        "MatMul8bitLt, 4-bit MatMul4Bit before bitsandbytes 0.43.2) keep it only in the layer being recomputed",
        "PR #28538 (4.38.0 modeling_utils.py gradient_checkpointing_enable `{\"use_reentrant\": True}`); PR #43203 "
        "(5.0.0, `{\"use_reentrant\": False}`; 5.24 modeling_utils.py line 3158); torch.utils.checkpoint "
        "defaults to reentrant through 2.13 when not told"),
    Behaviour(
        "mla_cache", "transformers", "5.15.0", "expanded", "compressed",
        "DeepSeek-V2/V3 (MLA) KV cache: expanded per-head K [B, H, S, 192] and V [B, H, S, 128] from their "
        "ports (V3 4.51, V2 4.54) to 5.14; the compressed latent (kv_nope [B, 1, S, 512] + k_rot [B, 1, S, 64]), "
        "expanded after the cache read, since 5.15",
        "PRs #47460 and #47761 (5.15.0 models/deepseek_v3/modeling_deepseek_v3.py lines 459-465, expand_kv)"),
    Behaviour(
        "adapter_dtype", "peft", "0.12.0", "base", "fp32",
        "LoRA adapter dtype: the base layer's float dtype (LoraLayer.update_layer `self.to(weight.device, "
        "dtype=weight.dtype)`; over a quantized base they stay fp32) up to 0.11; since 0.12 get_peft_model("
        "autocast_adapter_dtype=True) upcasts bf16/fp16 adapters to fp32",
        "peft PR #1706 (v0.12.0 tuners/tuners_utils.py _cast_adapter_dtype, lines 316-356)"),
    Behaviour(
        "peft_moe_targets", "peft", "0.20.0", False, True,
        "LoRA `all-linear` over transformers 5's fused MoE experts: peft up to 0.18 adapts no expert (they are not "
        "nn.Linear); since 0.20 it also adapts the 3-D expert parameters and the router through target_parameters "
        "(gate_up_proj at rank 2r: A (E·2r, H), B (2I, E·2r); down_proj at rank r; the router's weight at rank r)",
        "peft PR #3232 (tuners/lora/model.py _convert_peft_config_moe, 0.20.0); traced with peft 0.18.1, 0.20.0 "
        "and 0.21.2 on transformers 5.24 (scripts/stack_check.py; 0.19.0 refuses all-linear on these models)"),
    Behaviour(
        "bnb4_keeps_input", "bitsandbytes", "0.43.2", True, False,
        "4-bit matmul (MatMul4Bit) kept its input A for backward as a plain ctx attribute (`ctx.tensors = (A, "
        "B)`), in the compute dtype: one more activation per 4-bit linear (a copy per linear where the stream "
        "is not in the compute dtype, as after kbit prep), outside checkpointing's hooks; since 0.43.2 it keeps "
        "only the weight",
        "bitsandbytes commit 9e753741 (PR #1270), autograd/_functions.py MatMul4Bit.forward `ctx.tensors = "
        "(None, B)`"),
    Behaviour(
        "kbit_prep_empty_cache", "peft", "0.20.0", False, True,
        "prepare_model_for_kbit_training casts every fp16/bf16 parameter that is not a packed 4-bit weight to "
        "fp32 in every modelled version (0.10 also skips bf16-stored Params4bit); since 0.20 it then empties "
        "the allocator cache, so the freed low-precision copies no longer stay reserved (allocated memory is the "
        "same)",
        "peft utils/other.py prepare_model_for_kbit_training (v0.4.0 lines 79-81; 0.21.2 lines 204-209); PR #1550 "
        "(0.10.0), PR #3293 (0.20.0); TRL's SFTTrainer calls it up to 0.25.1 (PR #4577 removed it in 0.26.0)"),
    Behaviour(
        "adamw_impl", "torch", "2.0.0", "forloop", "foreach",
        "torch.optim.AdamW's implementation when none is asked for, on CUDA: foreach since 2.0 (a step "
        "temporary per tensor group), never fused by default through 2.13",
        "PR #92306; torch/optim/adam.py lines 933-947 (use_fused=False unless asked), "
        "optimizer.py _default_to_fused_or_foreach"),
    Behaviour(
        "cublaslt_unified", "torch", "2.11.0", False, True,
        "cuBLASLt GEMMs (addmm with a bias in fp16/bf16, gemm_and_bias) used a workspace of their own, 1 MiB "
        "(CUBLASLT_WORKSPACE_SIZE) per thread and stream beside cuBLAS's; since 2.11 they share the cuBLAS "
        "workspace (TORCH_CUBLASLT_UNIFIED_WORKSPACE, on by default outside fbcode)",
        "PR #168175 (2026-01) 'Actually enable unified cuBLASLt workspace by default'; aten/src/ATen/cuda/"
        "CublasHandlePool.cpp unified_cublas_and_lt_workspaces, getCUDABlasLtWorkspace"),
    Behaviour(
        "cublas_32mib_blackwell", "torch", "2.11.0", False, True,
        "the default cuBLAS workspace on Blackwell (sm100, sm120): ':4096:2:16:8' (8 MiB + 128 KiB) per thread and "
        "stream before 2.11, ':4096:8' (32 MiB) as on Hopper since",
        "PR #175344 (2026-02); CublasHandlePool.cpp parseChosenWorkspaceSize `use32mb` (major 9, 10, 12)"),
    Behaviour(
        "sdpa_efficient_gqa", "torch", "2.14.0", False, True,
        "SDPA's memory-efficient kernel on grouped K/V heads (enable_gqa): refused before 2.14, so fp32 attention "
        "of a GQA model (where flash does not run: fp32 models, and LoRA over a kbit-prepared base, whose stream "
        "is fp32) falls to the math kernel, which holds the score matrix and its softmax (2 · B · H · S² · 4 bytes "
        "per layer) and saves the softmax for backward; accepted since",
        "PR #191085 (2026-07) '[SDPA] Add memory-efficient GQA'; aten/src/ATen/native/transformers/cuda/"
        "sdp_utils.cpp can_use_mem_efficient_attention check_batch_size_and_num_heads_dense<supports_gqa>; torch "
        "2.13's own docstring (nn/functional.py scaled_dot_product_attention: 'GQA … works only for "
        "Flash_attention and math kernel') and its meta backward of the efficient kernel (key gradients with the "
        "query's heads) say 2.13 has not got it; measured: the fp32 batch-8 prefills of "
        "results/runs/reference/nvidia-h200-580.159.04 (torch 2.11)"),
    Behaviour(
        "trainer_adamw", "transformers", "4.54.0", "foreach", "fused",
        "the HF Trainer's default optim: adamw_torch (foreach) up to 4.53, adamw_torch_fused since 4.54 with "
        "torch ≥ 2.8. vramlab's own workload builds torch's AdamW (adamw_impl); give --optimizer-impl fused for "
        "a Trainer run on such a stack",
        "PR #37358 (training_args.py default optim)"),
    Behaviour(
        "bnb_load_dtype", "transformers", "5.0.0", "fp16", "auto",
        "from_pretrained with a bitsandbytes config and no dtype: 4.x loaded the unquantized parts in fp16, 5.x "
        "in the checkpoint's dtype ('auto'); bnb_4bit_compute_dtype stays fp32 by default in both. vramlab takes "
        "--compute-dtype as given",
        "4.36.2 modeling_utils.py lines 2905-2912, 4.57.1 quantizers/quantizer_bnb_4bit.py lines 245-254; PR "
        "#42805 (5.0.0 dtype='auto'); quantization_config.py lines 468-469"),
)
_BY_KEY = {b.key: b for b in BEHAVIOURS}
FLAGS = {p: f"--{p}" for p in PACKAGES}

def _norm(text):
    return ".".join(map(str, parse_version(text)))


@dataclass(frozen=True)
class Stack:
    """Four versions, each with where it came from ('asked', 'installed', 'newest modelled')."""

    versions: tuple  # ((package, "x.y.z"), ...) in PACKAGES order
    origins: tuple = ()  # ((package, origin), ...)

    def version(self, package):
        return dict(self.versions)[package]

    def origin(self, package):
        return dict(self.origins).get(package, "asked")

    def label(self):
        """'transformers 4.40.2 (asked) · peft 0.21.2 (installed) · …'"""
        return " · ".join(f"{p} {v} ({self.origin(p)})" for p, v in self.versions)

    def to_dict(self):
        return {p: {"version": v, "origin": self.origin(p)} for p, v in self.versions}


class StackError(ValueError):
    """A version that is not one, or older than the table; the message names the flag (validate re-raises it as a
    SpecError)."""


def check_version(package, text, flag=None):
    """The version normalised ('4.40' → '4.40.0'); StackError naming the flag (or `flag`, e.g. a file's field) if it
    is not one or is older than OLDEST."""
    if package not in PACKAGES:
        raise StackError(f"{flag or 'stack'}: {package!r} is not a package the stack table models "
                         f"({', '.join(PACKAGES)})")
    flag = flag or FLAGS[package]
    try:
        v = parse_version(text)
    except ValueError:
        shown = repr(text) if not isinstance(text, str) or not text.strip() or text != text.strip() else text
        why = " (a number: give versions as text, in quotes)" if isinstance(text, (int, float)) else ""
        raise StackError(f"{flag} {shown}: not a version{why}; give one like {NEWEST[package]}") from None
    if v < parse_version(OLDEST[package]):
        raise StackError(f"{flag} {text}: older than the oldest {package} vramlab models ({OLDEST[package]}); "
                        f"the stack table (formulas/stack.py) covers {OLDEST[package]} to {NEWEST[package]}")
    return ".".join(map(str, v))


def make_stack(asked=None, installed=None):
    """The Stack for versions asked for (flags) over those installed, else the newest modelled.

    asked / installed: {package: version string or None}. Raises StackError for a bad asked version; an
    installed version outside the modelled range counts as the nearest modelled one, said in its origin."""
    asked, installed = asked or {}, installed or {}
    versions, origins = [], []
    for p in PACKAGES:
        if asked.get(p) is not None:  # '' is asked for too, and is no version
            versions.append((p, check_version(p, asked[p])))
            origins.append((p, "asked"))
            continue
        v = installed.get(p)
        try:
            ok = v and parse_version(v) >= parse_version(OLDEST[p])
        except ValueError:
            ok = False
        if ok:
            versions.append((p, _norm(v)))
            origins.append((p, "installed"))
        else:
            versions.append((p, NEWEST[p]))
            origins.append((p, "newest modelled" + (f"; {v} installed is older than the table" if v else "")))
    return Stack(tuple(versions), tuple(origins))


def stack_pairs(mapping, where="stack"):
    """((package, "x.y.z"), ...) in PACKAGES order from a file's {package: version} mapping (a sweep's or a measurement
    set's `stack:`); StackError naming `where` and the package for anything else: not a mapping, a package the table
    does not model, a version that is not text (YAML reads 4.40 as the number 4.4) or not a version."""
    if mapping is None:
        return ()
    if not isinstance(mapping, dict):
        raise StackError(f"{where}: {mapping!r} is not a mapping of package to version, e.g. "
                         f"{{transformers: '{NEWEST['transformers']}'}}")
    for p in mapping:
        if p not in PACKAGES:
            raise StackError(f"{where}: {p!r} is not a package the stack table models ({', '.join(PACKAGES)})")
    return tuple((p, check_version(p, mapping[p], f"{where}.{p}")) for p in PACKAGES if p in mapping)


@lru_cache(maxsize=256)
def stack_of(pairs):
    """The Stack of a Spec's `stack` field (((package, version), ...); missing packages: NEWEST)."""
    d = dict(pairs)
    return Stack(tuple((p, _norm(d.get(p) or NEWEST[p])) for p in PACKAGES),
                 tuple((p, "asked" if d.get(p) else "newest modelled") for p in PACKAGES))


@lru_cache(maxsize=1024)
def _behaviour(pairs, key):
    b = _BY_KEY[key]
    version = parse_version(dict(stack_of(pairs).versions)[b.package])
    return b.new if version >= parse_version(b.since) else b.old


def behaviour(spec_or_pairs, key):
    """The value of behaviour `key` under a spec's stack (or a stack's ((package, version), ...) pairs)."""
    pairs = getattr(spec_or_pairs, "stack", spec_or_pairs)
    if isinstance(pairs, Stack):
        pairs = pairs.versions
    return _behaviour(tuple(pairs), key)


def sdpa_repeats_kv(spec):
    """Whether SDPA runs on K/V copied to every query head under the spec's stack: transformers < 4.54, or torch
    < 2.5 (which has no enable_gqa)."""
    return behaviour(spec, "sdpa_gqa") == "repeat" or parse_version(dict(stack_of(tuple(spec.stack)).versions)["torch"]) < (2, 5, 0)


def differs_from_newest(spec, shape=None):
    """Behaviours under the spec's stack that differ from the newest modelled stack: [(Behaviour, value)].

    With the model's `shape`, only those that bear on this (validated) spec."""
    out = []
    for b in BEHAVIOURS:
        v = behaviour(spec, b.key)
        if v != b.new and (shape is None or _bears_on(b.key, spec, shape)):
            out.append((b, v))
    return out


def _bears_on(key, spec, shape):
    train = spec.mode == "train"
    lora = train and spec.method in ("lora", "qlora")
    return {
        "experts": shape.is_moe and (spec.dtype in ("int8", "nf4", "fp4") or lora),
        "logits_upcast": True,
        "rope_cache_llama": shape.model_type == "llama",
        "rope_cache_mixtral": shape.model_type == "mixtral",
        "legacy_cache": not train and spec.gen > 0,
        "shift_copy": train,
        "default_attn": spec.attn == "eager",
        "sdpa_gqa": spec.attn == "sdpa" and shape.n_kv_heads < shape.n_heads,
        "reentrant": spec.grad_ckpt and (spec.dtype == "int8" or (spec.dtype in ("nf4", "fp4") and train
                                                                  and behaviour(spec, "bnb4_keeps_input"))),
        "mla_cache": shape.is_mla and not train,
        "adapter_dtype": lora,
        "peft_moe_targets": lora and shape.is_moe and "all-linear" in spec.lora_targets
        and behaviour(spec, "experts") == "fused",
        "bnb4_keeps_input": train and spec.dtype in ("nf4", "fp4"),
        "kbit_prep_empty_cache": False,
        "trainer_adamw": False,
        "bnb_load_dtype": False,
        "adamw_impl": train and spec.optimizer == "adamw",
        "cublaslt_unified": False,
        "cublas_32mib_blackwell": False,
        "sdpa_efficient_gqa": spec.attn == "sdpa" and shape.n_kv_heads < shape.n_heads and (
            spec.compute_dtype == "fp32" or (train and spec.kbit_prep and spec.dtype in ("nf4", "fp4", "int8"))),
    }.get(key, True)


def stack_notes(spec, shape):
    """One note per behaviour of the spec's stack that differs from the newest and bears on the spec."""
    return [f"{b.package} {dict(stack_of(spec.stack).versions)[b.package]}: {b.key} = {v} (since {b.package} "
            f"{b.since}: {b.new}; `vramlab stack` cites the change)" for b, v in differs_from_newest(spec, shape)]


# ------------------------------------------------------------------ MoE experts as 4.x built them

_EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2")}  # gate, up, down; others: gate_proj / up_proj / down_proj


def linear_experts(shape):
    """`shape` as transformers 4.x built it: each expert's matrices an nn.Linear (count × experts copies),
    the router an nn.Linear. Fused gate_up (E, 2I, H) splits into gate (I, H) and up (I, H)."""
    from .shapes import Tensor

    if not any(t.kind == "experts" for t in shape.tensors):
        return shape
    gate, up, down = _EXPERT_NAMES.get(shape.model_type, ("gate_proj", "up_proj", "down_proj"))
    out = []
    for t in shape.tensors:
        if t.kind == "router" and len(t.shape) == 2:
            out.append(replace(t, kind="linear"))
        elif t.kind == "experts" and len(t.shape) == 3:
            e, rows, cols = t.shape
            prefix = t.name.rsplit(".", 1)[0]
            if t.module == "gate_up_proj":
                for leaf in (gate, up):
                    out.append(Tensor(f"{prefix}.{leaf}.weight", "linear", (rows // 2, cols), t.count * e, leaf, t.dtype))
            else:
                leaf = down if t.module == "down_proj" else t.module
                out.append(Tensor(f"{prefix}.{leaf}.weight", "linear", (rows, cols), t.count * e, leaf, t.dtype))
        else:
            out.append(t)
    return replace(shape, tensors=tuple(out))
