"""Fine-tuning recipes: what Unsloth, Liger, TRL and axolotl change about a training step's memory.

vramlab's own workload (`--recipe hf`, the default) is a plain PyTorch loop over a transformers
model: `loss = model(ids, labels=ids).loss` (the full-vocabulary logits and their fp32 upcast),
transformers' modules, peft's LoRA, checkpointing only when asked. Most LoRA/QLoRA runs on
consumer GPUs go through a recipe that changes that step:

- **loss** — `full` (transformers' ForCausalLMLoss), `chunked` (TRL's `chunked_nll`: 256-token
  chunks, each under its own checkpoint), `fused` (the lm_head matmul and the cross-entropy in
  one pass that writes the gradient during the forward: Liger's fused linear cross-entropy, or
  Unsloth's compiled chunked loss), `cut` (Apple's Cut Cross-Entropy: only the log-sum-exp is
  kept; axolotl's plugin). Old Unsloth versions kept the whole bf16 logits and wrote their
  gradient in place (`inplace`, not a --loss choice);
- **checkpointing** — `full` (every decoder layer keeps its input), `offload` (Unsloth's
  "unsloth" mode: layer inputs copied to pinned host RAM through one or two GPU staging
  buffers), `selective` (axolotl's `selective_checkpointing`: the attention kernel's outputs
  are saved as well, not recomputed);
- **kbit preparation** — peft's prepare_model_for_kbit_training (every unquantized weight to
  fp32) or not (TRL ≥ 0.26, Unsloth's own preparation), and the adapters' dtype;
- **kernels** — Liger's RMSNorm and SwiGLU, Unsloth's RMSNorm and fused LoRA autograd
  functions, each saving other tensors for backward than transformers' modules (RoPE kernels
  save cos and sin only, as transformers' rotation does: nothing changes there);
- **trainer defaults** — gradient checkpointing on, LoRA targets and rank, the optimizer
  implementation (the HF Trainer's `adamw_torch_fused`).

Every behaviour names the source file, line and the version it was read at (RECIPE_SOURCES)
and, where it changed, the first version with the new behaviour (VERSIONED). Packing and
padding: every recipe is predicted at batch × seq tokens with no padding and no attention
mask — what packing (axolotl's `sample_packing`, TRL's `packing`/`padding_free`) gives; a
padded batch is predicted at its padded length.

Pure Python: no torch, no I/O.
"""

from dataclasses import dataclass

from .elementwise import pick, vmax
from .stack import parse_version

RECIPES = ("hf", "trl", "unsloth", "liger", "axolotl")
LOSSES = ("full", "chunked", "fused", "cut")
CKPT_MODES = ("full", "offload", "selective")
PACKAGE = {"trl": "trl", "unsloth": "unsloth", "liger": "liger-kernel", "axolotl": "axolotl"}
# The versions modelled: NEWEST is what the sources were read at; OLDEST the oldest whose behaviours were
# checked (older ones are refused, as formulas/stack.py refuses library versions older than its table).
NEWEST = {"trl": "1.9.0", "unsloth": "2026.8.19", "liger": "0.8.2", "axolotl": "0.18.0"}
OLDEST = {"trl": "0.20.0", "unsloth": "2024.12.1", "liger": "0.5.0", "axolotl": "0.8.0"}

# Where each recipe's behaviour was read (repository @ commit, the version there).
RECIPE_SOURCES = {
    "trl": "huggingface/trl v1.9.0 (trl/trainer/sft_trainer.py, trl/trainer/sft_config.py)",
    "unsloth": "unslothai/unsloth 2026.8.19 @ 015bdef0d9 and unslothai/unsloth-zoo 2026.8.13 @ ce232d6c",
    "liger": "linkedin/Liger-Kernel v0.8.2 @ ead96b61 (src/liger_kernel/ops, transformers/monkey_patch.py)",
    "axolotl": "axolotl-ai-cloud/axolotl v0.18.0 @ 067b021c (examples/llama-3/qlora.yml, src/axolotl/loaders)",
    "cce": "apple/ml-cross-entropy 25.6.4 @ d42911f9 (cut_cross_entropy/cce.py, cce_backward.py)",
}

# Unsloth's fused loss: chunks so that one chunk's fp32 logits take at most min(half the free VRAM, 4 GiB).
# unsloth-zoo fused_losses/cross_entropy_loss.py lines 140-175 (_get_chunk_multiplier, get_chunk_size): the
# chunk count is the fp32 logits' GiB over the target, rounded up to a multiple of 4 (1 if it fits once).
UNSLOTH_CE_TARGET_BYTES = 4 << 30
# Unsloth's offloaded checkpointing (unsloth-zoo gradient_checkpointing.py): 200 pinned host buffers of 128 Ki
# elements made at start (line 639), two GPU staging buffers of 2·256·2048 elements (lines 57, 648-658), and
# a layer input is offloaded only above 2 MiB (MINIMUM_SIZE, line 694).
UNSLOTH_CPU_BUFFERS = 200
UNSLOTH_CPU_BUFFER_ELEMENTS = 128 * 1024
UNSLOTH_GPU_BUFFER_ELEMENTS = 2 * 256 * 2048
UNSLOTH_OFFLOAD_MIN_BYTES = 2 * 1024 * 1024
UNSLOTH_OFFLOAD_MIN_SEQ = 512  # models/_utils.py apply_unsloth_gradient_checkpointing: below, plain checkpointing
TRL_CHUNK_TOKENS = 256  # trl/trainer/sft_trainer.py line 86, _CHUNKED_LM_HEAD_CHUNK_SIZE
# The model types whose decoder layers the recipes' kernels replace and vramlab's Llama-style rule covers:
# Liger's apply_liger_kernel_to_{llama,mistral,qwen2,qwen3} (monkey_patch.py), Unsloth's FastLlamaModel and
# its Mistral/Qwen2/Qwen3 subclasses (models/llama.py patch_peft_model, lines 3620-3640).
KERNEL_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
UNSLOTH_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class RecipeError(ValueError):
    """A recipe, version or recipe-dependent choice that is not allowed; the message names the flag."""


@dataclass(frozen=True)
class Versioned:
    """One recipe behaviour that changed: `old` below `since`, `new` from it on."""

    recipe: str
    key: str
    since: str
    old: object
    new: object
    what: str
    source: str


VERSIONED = (
    Versioned("trl", "grad_ckpt", "1.0.0", False, True,
              "SFTConfig turns gradient checkpointing on by default",
              "trl PR eb973af2d (v1.0.0); sft_config.py line 135 'gradient_checkpointing: Defaults to True'"),
    Versioned("trl", "loss", "1.7.0", "full", "chunked",
              "SFTConfig.loss_type defaults to 'chunked_nll': lm_head and the cross-entropy over 256 valid tokens at a "
              "time, each chunk under a non-reentrant checkpoint (logits in fp32, lm_head cast to fp32 per chunk)",
              "trl PR #5846 (b58947c7e, v1.7.0); sft_config.py line 336; sft_trainer.py lines 86, 99-114, 117-234"),
    Versioned("trl", "kbit_prep", "0.26.0", True, False,
              "SFTTrainer no longer calls peft's prepare_model_for_kbit_training (the fp32 upcast of embeddings, "
              "norms and lm_head)",
              "trl PR #4577 (v0.26.0), as formulas/stack.py kbit_prep_empty_cache cites"),
    Versioned("trl", "quantized_adapter_dtype", "0.26.0", "auto", "bf16",
              "over a bitsandbytes base, SFTTrainer casts the trainable (LoRA) parameters to bf16",
              "trl 2af35fb0d (v0.26.0); sft_trainer.py lines 1127-1130 at v1.9.0"),
    Versioned("unsloth", "loss", "2025.8.6", "cut", "fused",
              "the causal-LM loss: Cut Cross-Entropy (unsloth-zoo's fused_linear_cross_entropy over apple's "
              "cut_cross_entropy, a dependency) above 1,024 tokens a micro-batch, and below that the bf16 logits of "
              "every position with their gradient written in place (fast_cross_entropy_loss), became "
              "unsloth_fused_ce_loss at every length: chunks of hidden states through lm_head and the cross-entropy "
              "inside torch.func.grad_and_value, compiled, the hidden-state gradient kept for backward",
              "unsloth fa8e59eb1b (2024-11-17, the CCE path: models/llama.py lines 1013-1025 at 2025.1.5) and "
              "806bee2433 (2025-08-13; first release 2025.8.6); models/llama.py lines 1465-1520 at 2026.8.19"),
    Versioned("unsloth", "ce_cap", "2026.7.1", False, True,
              "the fused loss's chunk target is capped at 4 GiB of fp32 logits (before: half the free VRAM)",
              "unsloth-zoo d9fe1f43 (2026-07-06, release 2026.7.1); fused_losses/cross_entropy_loss.py line 149"),
    Versioned("unsloth", "double_buffer", "2026.5.1", False, True,
              "offloaded checkpointing keeps a second GPU staging buffer of one layer input (double buffering) from "
              "the second step on, when more than 512 MiB are free",
              "unsloth-zoo 510d987f (2026-05-03, releases after 2026.4.9); gradient_checkpointing.py lines 648-673, "
              "788-806"),
)


def check_recipe_version(recipe, text):
    """The recipe's version normalised, or RecipeError naming --recipe-version. '' = the newest modelled."""
    if recipe == "hf":
        if text:
            raise RecipeError(f"--recipe-version {text}: --recipe hf is vramlab's own loop on the stack's versions "
                              "(--transformers, --peft, …); a recipe version goes with trl, unsloth, liger or axolotl")
        return ""
    if not text:
        return NEWEST[recipe]
    try:
        v = parse_version(text)
    except ValueError:
        raise RecipeError(f"--recipe-version {text}: not a version; give one like {NEWEST[recipe]}") from None
    if v < parse_version(OLDEST[recipe]):
        raise RecipeError(f"--recipe-version {text}: older than the oldest {PACKAGE[recipe]} vramlab models "
                          f"({OLDEST[recipe]}); formulas/recipes.py covers {OLDEST[recipe]} to {NEWEST[recipe]}")
    return ".".join(map(str, v))


def versioned(recipe, version, key, default=None):
    """A recipe behaviour at `version` (VERSIONED), or `default` where the recipe has no such entry."""
    for b in VERSIONED:
        if b.recipe == recipe and b.key == key:
            return b.new if parse_version(version or NEWEST[recipe]) >= parse_version(b.since) else b.old
    return default


def flag_defaults(recipe, version=""):
    """The flags a recipe sets when they are not given: {Spec field: value}. Applied by the CLI and sweeps to
    the fields a user left out (a Spec built in Python is taken as it is)."""
    if recipe == "trl":
        return {"grad_ckpt": versioned("trl", version, "grad_ckpt"), "kbit_prep": versioned("trl", version, "kbit_prep")}
    if recipe == "unsloth":
        # models/llama.py get_peft_model (line 3062): r=16 on the seven projections, lora_dropout 0, bias none,
        # use_gradient_checkpointing="unsloth"; its prepare_model_for_kbit_training (models/_utils.py line 2482)
        # casts no frozen weight to fp32
        return {"grad_ckpt": True, "kbit_prep": False, "lora_targets": UNSLOTH_TARGETS, "lora_rank": 16}
    if recipe == "axolotl":
        # examples/llama-3/qlora.yml: gradient_checkpointing true, lora_r 32, lora_target_linear true; the loader
        # calls peft's prepare_model_for_kbit_training for 4/8-bit adapters (loaders/model.py lines 1016-1022)
        return {"grad_ckpt": True, "kbit_prep": True, "lora_targets": ("all-linear",), "lora_rank": 32}
    return {}


@dataclass(frozen=True)
class Rules:
    """What a validated spec's recipe does to its step, resolved for its version, model and flags."""

    recipe: str
    version: str  # "" for hf
    loss: str  # full | chunked | fused | cut | inplace
    loss_impl: str  # hf | trl | unsloth | liger | cce | unsloth_inplace
    ckpt_mode: str  # full | offload | selective (what checkpointing does when it is on)
    ckpt_reentrant: object  # True / False, or None: the stack's (transformers' gradient_checkpointing_enable)
    norm_kernel: bool  # RMSNorm kernel: saves its input and a fp32 rstd per row
    swiglu_kernel: bool  # Liger SiLU·mul: saves gate and up only
    fused_lora: bool  # Unsloth's LoRA_QKV / LoRA_W / LoRA_MLP autograd functions
    trainer: bool  # built on the HF Trainer: its default optimizer
    ce_target_bytes: int  # Unsloth fused loss: fp32-logit bytes per chunk at most (0: one chunk)
    double_buffer: bool  # Unsloth offload: the second GPU staging buffer
    kernels_apply: bool  # the model type is one the recipe's kernels replace layers of


def rules(spec, shape=None):
    """The Rules of a validated spec (`shape`: its model's, for which layers the kernels replace)."""
    recipe = getattr(spec, "recipe", "hf")
    version = getattr(spec, "recipe_version", "") or (NEWEST[recipe] if recipe != "hf" else "")
    kernels = shape is None or (shape.model_type in KERNEL_MODEL_TYPES and shape.family == "llama")
    loss = getattr(spec, "loss", "auto")
    if loss == "auto":
        loss = {"hf": "full", "liger": "fused", "axolotl": "full",
                "trl": versioned("trl", version, "loss"), "unsloth": versioned("unsloth", version, "loss")}[recipe]
    impl = {"full": "hf", "chunked": "trl", "cut": "cce", "inplace": "unsloth_inplace",
            "fused": "unsloth" if recipe == "unsloth" else "liger"}[loss]
    mode = getattr(spec, "grad_ckpt_mode", "auto")
    if mode == "auto":  # Unsloth's "unsloth" mode; below 512 tokens it checkpoints plainly (effective_ckpt_mode)
        mode = "offload" if recipe == "unsloth" else "full"
    return Rules(
        recipe=recipe, version=version, loss=loss, loss_impl=impl, ckpt_mode=mode,
        # Unsloth checkpoints with use_reentrant=True (models/llama.py line 1178; unsloth-zoo unsloth_checkpoint);
        # axolotl passes {"use_reentrant": False} (core/builders/base.py lines 600-610)
        ckpt_reentrant={"unsloth": True, "axolotl": False}.get(recipe),
        norm_kernel=recipe in ("liger", "unsloth") and kernels,
        swiglu_kernel=recipe == "liger" and kernels,
        fused_lora=recipe == "unsloth" and kernels,
        trainer=recipe != "hf",
        ce_target_bytes=UNSLOTH_CE_TARGET_BYTES if (recipe == "unsloth" and versioned("unsloth", version, "ce_cap"))
        else 0,
        double_buffer=recipe == "unsloth" and bool(versioned("unsloth", version, "double_buffer")),
        kernels_apply=kernels,
    )


UNSLOTH_CCE_MIN_TOKENS = 1025  # models/llama.py at 2025.1.5 line 1015: `if bsz*q_len <= 1024: RETURN_LOGITS = True`


def loss_impl(r, tokens):
    """The loss implementation a step of `tokens` (batch × seq) runs: Unsloth before 2025.8.6 used Cut
    Cross-Entropy only above 1,024 tokens, its in-place loss on the logits below."""
    if r.recipe == "unsloth" and r.loss_impl == "cce" and tokens < UNSLOTH_CCE_MIN_TOKENS:
        return "unsloth_inplace"
    return r.loss_impl


def effective_ckpt_mode(r, seq):
    """The checkpointing a step of `seq` tokens per sequence runs: Unsloth falls back from offloading to plain
    (reentrant) checkpointing below 512 (models/_utils.py apply_unsloth_gradient_checkpointing, line 376)."""
    if r.ckpt_mode == "offload" and seq < UNSLOTH_OFFLOAD_MIN_SEQ:
        return "full"
    return r.ckpt_mode


# The token counts below may be numpy arrays (formulas.grid): only + - * // and comparisons are used.

def unsloth_ce_chunks(tokens, vocab, target_bytes):
    """Chunks of Unsloth's fused loss: the fp32 logits over the target, rounded up to a multiple of 4 (1 when they
    fit once). target 0: one chunk (the pre-2026.7 target, half the free VRAM, is taken as enough).
    Source: unsloth-zoo fused_losses/cross_entropy_loss.py get_chunk_size, lines 161-175."""
    if not target_bytes:
        return tokens * 0 + 1
    fp32 = tokens * vocab * 4
    return pick(fp32 <= target_bytes, 1, -(-fp32 // (4 * target_bytes)) * 4)


def _next_pow2(x):
    """The smallest power of two ≥ x (x ≥ 1), elementwise."""
    p = x * 0 + 1
    for _ in range(63):
        p = p + p * (p < x)
    return p


def liger_chunk_tokens(tokens, hidden, vocab):
    """Rows of one Liger fused-linear-cross-entropy chunk: next_power_of_2(ceil(BT / ceil(V / H))), so that a
    chunk's logits are about as large as the hidden states. Source: Liger-Kernel
    ops/fused_linear_cross_entropy.py lines 64-66."""
    return _next_pow2(-(-tokens // -(-vocab // hidden)))


def unsloth_offloaded_layers(tokens, hidden, act_bytes, n_layers):
    """Layers whose input Unsloth's checkpointing sends to host RAM: all but the last (after the first step),
    and none when one layer input is not above 2 MiB (MINIMUM_SIZE)."""
    return (n_layers - 1) * (tokens * hidden * act_bytes > UNSLOTH_OFFLOAD_MIN_BYTES)


def unsloth_host_bytes(tokens, hidden, act_bytes, n_layers):
    """Pinned host RAM of Unsloth's offloaded checkpointing: 200 buffers of 128 Ki elements, the first ones grown to
    one layer input each for every layer the first step offloaded (all of them; it keeps the last on the GPU from
    the second step, but its host buffer stays). Source: unsloth-zoo gradient_checkpointing.py lines 639, 808-815."""
    grown = n_layers * (tokens * hidden * act_bytes > UNSLOTH_OFFLOAD_MIN_BYTES)
    per = vmax(tokens * hidden, UNSLOTH_CPU_BUFFER_ELEMENTS) * act_bytes
    return grown * per + vmax(0, UNSLOTH_CPU_BUFFERS - grown) * UNSLOTH_CPU_BUFFER_ELEMENTS * act_bytes


def describe(r, spec):
    """Note lines saying what the recipe changed, each with its source."""
    if r.recipe == "hf" and r.loss == "full" and r.ckpt_mode == "full":
        return []
    head = f"recipe {r.recipe}" + (f" {r.version}" if r.version else "")
    out = []
    loss = {
        "full": "loss: transformers' full-vocabulary logits and their fp32 upcast",
        "chunked": (f"loss: TRL chunked_nll, {TRL_CHUNK_TOKENS} tokens a chunk under its own checkpoint; no "
                    "full-vocabulary logits (sft_trainer.py lines 99-234)"),
        "fused": ("loss: Unsloth's fused cross-entropy (compiled chunks of lm_head + CE inside grad_and_value, "
                  "the hidden-state gradient kept for backward; no fp32 logits: unsloth-zoo "
                  "fused_losses/cross_entropy_loss.py lines 140-175, 243, 442)" if r.loss_impl == "unsloth" else
                  "loss: Liger fused linear cross-entropy (chunks of ~hidden-size logits, gradient computed in the "
                  "forward, grad_input kept; no full-vocabulary logits: ops/fused_linear_cross_entropy.py lines "
                  "64-70, 130-230)"),
        "cut": "loss: Cut Cross-Entropy (log-sum-exp only; hidden states kept for backward: cce.py line 141)",
        "inplace": "loss: Unsloth's fast_cross_entropy_loss (bf16 logits kept, gradient written in place)",
    }["inplace" if loss_impl(r, spec.batch * spec.seq) == "unsloth_inplace" else r.loss]
    if r.recipe == "unsloth" and r.loss == "cut":
        loss += " — Unsloth's path from late 2024 to 2025.8.5 (unsloth-zoo fused_linear_cross_entropy), in-place " \
                "bf16 logits at 1,024 tokens or fewer"
    out.append(f"{head}: {loss}")
    if spec.grad_ckpt:
        out.append(f"{head}: checkpointing " + ("plain (reentrant) below 512 tokens, as Unsloth falls back: " if
                                               r.ckpt_mode == "offload" and spec.seq < UNSLOTH_OFFLOAD_MIN_SEQ else "") + {
            "full": "of every decoder layer" + (" (reentrant)" if r.ckpt_reentrant else ""),
            "offload": ("offloaded: layer inputs in pinned host RAM through " +
                        ("two GPU staging buffers" if r.double_buffer else "one GPU staging buffer") +
                        ", the last layer's kept on the GPU (unsloth-zoo gradient_checkpointing.py lines 605-900)"),
            "selective": ("selective: the attention kernel's outputs saved beside each layer input (axolotl "
                          "monkeypatch/selective_checkpointing.py)"),
        }[effective_ckpt_mode(r, spec.seq)])
    if r.recipe in ("liger", "unsloth"):
        if r.kernels_apply:
            k = ["RMSNorm saves its input and a fp32 rstd (" +
                 ("Liger ops/rms_norm.py line 657" if r.recipe == "liger" else "Unsloth kernels/rms_layernorm.py line 205")
                 + ")"]
            if r.swiglu_kernel:
                k.append("SwiGLU saves gate and up only (ops/swiglu.py line 262)")
            if r.fused_lora:
                k.append("LoRA q/k/v, o and MLP as fused autograd functions saving their input (and gate, up) only "
                         "(kernels/fast_lora.py lines 110, 418, 612) where all their projections carry adapters")
            k.append("RoPE kernels save cos and sin, as transformers' rotation does")
            out.append(f"{head}: kernels: " + "; ".join(k))
        else:
            out.append(f"{head}: its kernels are modelled for dense Llama-style layers ({', '.join(KERNEL_MODEL_TYPES)}); "
                       "this model's layers are predicted as transformers runs them")
    if r.recipe == "unsloth":
        out.append(f"{head}: frozen weights stay in their dtype (its kbit preparation upcasts nothing), adapters fp32 "
                   "(unsloth-zoo training_utils.py lines 300-420); attention as SDPA/flash with native GQA "
                   "(xformers would copy K/V per head)")
    if r.recipe == "trl" and spec.dtype in ("nf4", "fp4", "int8") and spec.method in ("lora", "qlora"):
        out.append(f"{head}: no kbit prep (since 0.26); adapters cast to bf16 over the quantized base "
                   "(sft_trainer.py line 1130)")
    if r.recipe == "axolotl":
        out.append(f"{head}: examples/llama-3/qlora.yml defaults (r=32 all-linear, checkpointing, kbit prep); its "
                   "lora_dropout 0.05 and paged_adamw_32bit are not modelled (vramlab runs LoRA without dropout; "
                   "--optimizer names the optimizer)")
    if r.trainer and spec.mode == "train":
        out.append(f"{head}: the HF Trainer's optimizer implementation; its bf16 autocast of LoRA layers is not "
                   "modelled (vramlab runs the LoRA forward in the adapters' dtype)")
    return out
