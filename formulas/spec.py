"""Spec: one workload to predict — model, precision, shape of the work, method, parallelism.

Validated at the edge: a bad value raises SpecError naming the CLI flag, the value and
what is allowed, before any arithmetic runs.
"""

from dataclasses import dataclass, fields, replace

from .dtypes import BNB_DTYPES, FLOAT_DTYPES, GGUF_DTYPES, INT4_DTYPES, KV_DTYPES, WEIGHT_DTYPES
from .recipes import CKPT_MODES, LOSSES, RECIPES, RecipeError, check_recipe_version, versioned
from .stack import StackError, behaviour, check_version
from .training import OPTIMIZER_IMPLS, OPTIMIZERS

MODES = ("inference", "train")
METHODS = ("full", "freeze", "lora", "qlora")
ATTNS = ("sdpa", "eager")
PRECISIONS = ("auto", "pure", "amp", "master")
OFFLOADS = ("none", "optimizer", "params")
MLA_CACHES = ("expanded", "compressed")
LOGITS = ("last", "all")
GPTQ_KERNELS = ("exllama", "exllamav2", "other")


class SpecError(ValueError):
    """A spec value that is not allowed; the message names the flag."""


@dataclass(frozen=True)
class Spec:
    """One workload. Field comments give the CLI flag's meaning; defaults are the CLI's."""

    model: str  # catalog name, HF id, config.json path or model directory
    mode: str = "inference"  # inference | train
    dtype: str = "bf16"  # weight precision; with --method qlora the compute dtype (base is nf4)
    batch: int = 1  # concurrent sequences (inference) / micro-batch (training)
    seq: int = 2048  # prompt tokens (inference) / sequence length (training)
    gen: int = 0  # decode steps after the prompt (inference)
    method: str = "full"  # full | freeze | lora | qlora (training)
    compute_dtype: str = "bf16"  # dtype of unquantized parts and compute when dtype is quantized
    lora_rank: int = 16  # LoRA rank r
    lora_targets: tuple = ()  # module leaf names, ("all-linear",), or () for peft's default per model type
    lora_dtype: str = "fp32"  # adapter dtype (peft ≥ 0.12 upcasts adapters to fp32); auto: as the stack's peft does
    trainable_layers: int = 2  # --method freeze: train the last N decoder layers
    optimizer: str = "adamw"
    optimizer_impl: str = "auto"  # auto (foreach on one GPU/DDP, fused under ZeRO) | foreach | fused | forloop
    precision: str = "auto"  # auto | pure | amp (autocast, fp32 params) | master (fp32 master in optimizer)
    grad_ckpt: bool = False  # gradient checkpointing per decoder layer
    attn: str = "sdpa"  # sdpa | eager | auto (sdpa where the model runs it, else eager; the CLI default)
    grad_accum: int = 1  # micro-batches per optimizer step (batch is the micro-batch)
    kv_dtype: str = ""  # KV cache dtype; "" = compute dtype
    mla_cache: str = "compressed"  # MLA models: compressed latent (transformers 5, vLLM) | expanded per-head K/V | auto (the stack's)
    logits: str = "last"  # inference prefill keeps logits of the last position (generate) or all
    double_quant: bool = True  # bitsandbytes 4-bit double quantization
    group_size: int = 128  # GPTQ/AWQ group size
    gptq_kernel: str = "exllama"  # GPTQ kernel: exllama (v1, transformers' default) | exllamav2 (a fixed scratch buffer) | other
    dropout: bool = True  # training-mode dropout masks where the config has p > 0
    kbit_prep: bool = True  # LoRA over a bitsandbytes base: peft's prepare_model_for_kbit_training (its default recipe)
    gpus: int = 1  # GPUs in total
    zero: int = 0  # ZeRO stage 0-3 over the data-parallel GPUs (3 = FSDP full shard)
    tp: int = 1  # tensor-parallel degree
    pp: int = 1  # pipeline-parallel degree
    layer_split: bool = False  # split layers over the GPUs like device_map="auto" (no data parallel)
    offload: str = "none"  # none | optimizer (ZeRO-Offload) | params (weights streamed from CPU; under ZeRO-2/3 FSDP's
    #                        CPU offload: parameters, gradients and the optimizer step on the CPU)
    cp: int = 1  # context-parallel degree: each sequence split over cp GPUs (ring attention; training)
    ep: int = 1  # expert-parallel degree: MoE routed experts split over ep of the data-parallel GPUs
    sequence_parallel: bool = False  # TP as Megatron-LM / torchtitan run it: norm inputs sequence-sharded, vocab-parallel loss
    ckpt_every: int = 1  # with grad_ckpt: checkpoint every k-th decoder layer (torchtitan's layer SAC); 1 = every layer
    shard_gpus: int = 0  # ZeRO / FSDP shards over groups of this many data-parallel GPUs and replicates over the groups
    #                      (hybrid sharding: FSDP HYBRID_SHARD, torchtitan dp_shard × dp_replicate); 0 = over all of them
    # library versions ((package, version), ...) the prediction assumes (formulas/stack.py); () = the newest modelled
    stack: tuple = ()
    # The fine-tuning recipe (formulas/recipes.py). Their defaults leave every spec hash as it was.
    recipe: str = "hf"  # hf (vramlab's own loop) | trl | unsloth | liger | axolotl
    recipe_version: str = ""  # the recipe package's version; "" = the newest modelled
    loss: str = "auto"  # auto (the recipe's) | full | chunked | fused | cut
    grad_ckpt_mode: str = "auto"  # with grad_ckpt: auto (the recipe's) | full | offload | selective

    def __post_init__(self):
        if isinstance(self.stack, dict):  # from JSON: {package: version}
            object.__setattr__(self, "stack", tuple((p, v) for p, v in self.stack.items() if v is not None))
        elif isinstance(self.stack, list):
            object.__setattr__(self, "stack", tuple(tuple(x) if isinstance(x, (list, tuple)) else x for x in self.stack))

    def replace(self, **changes):
        """A copy with some fields changed (dataclasses.replace's result, built without re-running __init__: the
        planner makes thousands of these)."""
        unknown = changes.keys() - _FIELD_NAMES
        if unknown:
            return replace(self, **changes)  # dataclasses' own error, naming the field
        new = object.__new__(Spec)
        new.__dict__.update(self.__dict__)
        new.__dict__.update(changes)
        new.__post_init__()
        return new

    def to_dict(self):
        """Plain dict (tuples as lists) for JSON."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["lora_targets"] = list(d["lora_targets"])
        d["stack"] = dict(self.stack)
        return d


_FIELD_NAMES = frozenset(f.name for f in fields(Spec))


def _choice(flag, value, allowed):
    if value not in allowed:
        raise SpecError(f"--{flag} {value}: not allowed; choose one of {', '.join(map(str, allowed))}")


MAX_TOKENS = 1 << 26  # bound on --seq and --gen (67M tokens): beyond it nothing fits anywhere, and torch's sizes overflow
MAX_BATCH = 1 << 20
MAX_GPUS = 1 << 24  # bound on --gpus, --tp and --pp: 16.7M; the planner's deadline search reaches past its --max-gpus


def _positive(flag, value, zero_ok=False, maximum=None):
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if zero_ok else 1):
        bound = "≥ 0" if zero_ok else "≥ 1"
        raise SpecError(f"--{flag} {value}: must be an integer {bound}")
    if maximum is not None and value > maximum:
        raise SpecError(f"--{flag} {value:,}: must be at most {maximum:,}")


# Position-embedding tables: a model that looks its positions up (GPT-2, GPTBigCode, OPT) has no row past its
# n_positions / max_position_embeddings, and indexing past it is a device-side assert on the GPU (measured on the
# H200: GPT-2-medium at a 1,024-token prompt + 16 generated tokens). Rotary models compute positions and run past
# their nominal window, so only these are held to it. A prediction of such a spec is still a number (what the
# tensors would take); what must run — a sweep's experiments — is checked (harness/sweep/schema.py).
POSITION_TABLES = ("wpe.weight", "embed_positions.weight")


def check_positions(spec, shape):
    """A spec that needs more positions than the model's learned position table has is one SpecError."""
    table = shape.max_positions if any(t.name in POSITION_TABLES for t in shape.tensors) else 0
    gen = spec.gen if spec.mode == "inference" else 0
    if table and spec.seq + gen > table:
        asked = f"seq {spec.seq:,} + gen {gen:,} = {spec.seq + gen:,} positions" if gen else f"seq {spec.seq:,}"
        most = f"at most seq {table - gen:,} with gen {gen:,}" if gen else f"at most seq {table:,}"
        raise SpecError(f"{asked}: {shape.name} has {table:,} learned positions (max_position_embeddings); {most}")


def validate(spec, shape):
    """Check `spec` against itself and the model; return it with 'auto' fields resolved."""
    _choice("mode", spec.mode, MODES)
    _choice("dtype", spec.dtype, WEIGHT_DTYPES)
    for flag, v in (("lora-rank", spec.lora_rank), ("grad-accum", spec.grad_accum), ("cp", spec.cp), ("ep", spec.ep),
                    ("group-size", spec.group_size), ("grad-ckpt-every", spec.ckpt_every)):
        _positive(flag, v)
    for flag, v in (("gpus", spec.gpus), ("tp", spec.tp), ("pp", spec.pp)):
        _positive(flag, v, maximum=MAX_GPUS)
    _positive("batch", spec.batch, maximum=MAX_BATCH)
    _positive("seq", spec.seq, maximum=MAX_TOKENS)
    _positive("gen", spec.gen, zero_ok=True, maximum=MAX_TOKENS)
    _positive("trainable-layers", spec.trainable_layers)
    _positive("shard-gpus", spec.shard_gpus, zero_ok=True)
    _choice("method", spec.method, METHODS)
    _choice("compute-dtype", spec.compute_dtype, ("bf16", "fp16", "fp32"))
    _choice("lora-dtype", spec.lora_dtype, ("auto",) + FLOAT_DTYPES)
    _choice("optimizer", spec.optimizer, OPTIMIZERS)
    _choice("optimizer-impl", spec.optimizer_impl, ("auto",) + OPTIMIZER_IMPLS)
    _choice("precision", spec.precision, PRECISIONS)
    _choice("attn", spec.attn, ("auto",) + ATTNS)
    supported = getattr(shape, "attn_implementations", ()) or ATTNS
    groups = getattr(shape, "cache_groups", ())
    if groups and not any(g.kind in ("full", "sliding", "hybrid") for g in groups):
        spec = spec.replace(attn=supported[0])  # no attention layers (Mamba): the choice changes nothing
    if not isinstance(spec.stack, tuple) or not all(isinstance(x, tuple) and len(x) == 2 for x in spec.stack):
        raise SpecError(f"stack: {spec.stack!r} is not a mapping of package to version, e.g. {{'transformers': '4.40.2'}}")
    try:
        stack = tuple((p, check_version(p, v)) for p, v in spec.stack)
    except StackError as e:
        raise SpecError(str(e)) from None
    if spec.attn == "auto":  # transformers' own default: sdpa where the model runs it (since 4.36), else eager
        spec = spec.replace(attn="sdpa" if "sdpa" in supported and behaviour(stack, "default_attn") == "sdpa" else "eager")
    elif spec.attn not in supported:
        raise SpecError(f"--attn {spec.attn}: {shape.model_type} runs only {' or '.join(supported)} attention in "
                        f"{shape.inventory_source or 'transformers'}; use --attn {supported[0]}")
    _choice("mla-cache", spec.mla_cache, ("auto",) + MLA_CACHES)
    _choice("logits", spec.logits, LOGITS)
    _choice("gptq-kernel", spec.gptq_kernel, GPTQ_KERNELS)
    _choice("zero", spec.zero, (0, 1, 2, 3))
    _choice("offload", spec.offload, OFFLOADS)
    if spec.kv_dtype:
        _choice("kv-dtype", spec.kv_dtype, KV_DTYPES)
    dtype, compute = spec.dtype, spec.compute_dtype
    if dtype in FLOAT_DTYPES:
        compute = dtype
    if spec.mode == "train":
        if dtype in GGUF_DTYPES:
            raise SpecError(f"--dtype {dtype}: GGUF files are for llama.cpp inference; training needs a float or bitsandbytes base")
        if spec.method == "qlora":
            if dtype == "fp32":
                raise SpecError("--dtype fp32 with --method qlora: QLoRA keeps the base in nf4 and computes in bf16 or fp16; "
                                "for an fp32 base use --method lora --dtype fp32")
            if dtype in ("bf16", "fp16"):
                compute, dtype = dtype, "nf4"
            elif dtype not in ("nf4", "fp4"):
                raise SpecError(f"--dtype {dtype} with --method qlora: give the compute dtype (bf16 or fp16), or nf4/fp4")
        elif spec.method in ("full", "freeze") and dtype not in FLOAT_DTYPES:
            raise SpecError(f"--dtype {dtype} with --method {spec.method}: quantized weights cannot be trained; "
                            "use --method lora (frozen quantized base) or qlora")
        elif spec.method == "lora" and dtype in INT4_DTYPES + ("fp8",):
            pass  # adapters over a frozen GPTQ/AWQ/fp8 base are a supported peft setup
        if spec.trainable_layers > shape.n_layers:
            raise SpecError(f"--trainable-layers {spec.trainable_layers}: {shape.name} has {shape.n_layers} layers")
    else:
        if spec.zero:
            raise SpecError(f"--zero {spec.zero}: ZeRO shards training state; inference uses --tp, --pp or --layer-split")
        if spec.method != "full":
            raise SpecError(f"--method {spec.method}: applies to --mode train (inference runs the model as it is)")
    _choice("recipe", spec.recipe, RECIPES)
    _choice("loss", spec.loss, ("auto",) + LOSSES)
    _choice("grad-ckpt-mode", spec.grad_ckpt_mode, ("auto",) + CKPT_MODES)
    try:
        recipe_version = check_recipe_version(spec.recipe, spec.recipe_version)
    except RecipeError as e:
        raise SpecError(str(e)) from None
    if spec.mode != "train":
        for flag, value, default in (("recipe", spec.recipe, "hf"), ("loss", spec.loss, "auto"),
                                     ("grad-ckpt-mode", spec.grad_ckpt_mode, "auto")):
            if value != default:
                raise SpecError(f"--{flag} {value}: applies to --mode train (fine-tuning recipes); inference runs "
                                "the model as transformers does")
    if spec.grad_ckpt_mode != "auto" and not spec.grad_ckpt:
        raise SpecError(f"--grad-ckpt-mode {spec.grad_ckpt_mode}: says how checkpointing is done; it needs --grad-ckpt")
    if spec.grad_ckpt_mode == "offload" and spec.recipe != "unsloth":
        raise SpecError("--grad-ckpt-mode offload: models Unsloth's offloaded checkpointing (its staging buffers); "
                        "give --recipe unsloth")
    if spec.grad_ckpt_mode == "selective" and spec.recipe == "unsloth":
        raise SpecError("--grad-ckpt-mode selective: saves ops inside non-reentrant checkpoints; Unsloth checkpoints "
                        "reentrantly (use full or offload)")
    if spec.recipe != "hf" and (spec.zero or spec.tp > 1 or spec.pp > 1 or spec.layer_split or spec.offload != "none"
                                or spec.cp > 1 or spec.ep > 1 or spec.sequence_parallel or spec.shard_gpus):
        raise SpecError(f"--recipe {spec.recipe}: the recipes are modelled on one GPU or on DDP replicas (--gpus N "
                        "without --zero, --tp, --pp, --cp, --ep, --layer-split or --offload)")
    if spec.recipe != "hf" and spec.ckpt_every > 1:
        raise SpecError(f"--grad-ckpt-every {spec.ckpt_every} with --recipe {spec.recipe}: the recipes checkpoint every "
                        "layer (or none); give --grad-ckpt-mode for how")
    precision = spec.precision
    if precision == "auto":
        # Single GPU / DDP: PyTorch autocast. ZeRO (DeepSpeed bf16/fp16, FSDP mixed precision):
        # low-precision parameters with an fp32 master copy owned by the optimizer.
        mixed = spec.mode == "train" and spec.method in ("full", "freeze") and dtype in ("bf16", "fp16")
        precision = ("master" if spec.zero else "amp") if mixed else "pure"
    if precision in ("amp", "master") and dtype == "fp32":
        raise SpecError(f"--precision {precision} with --dtype fp32: mixed precision needs a bf16 or fp16 compute dtype")
    # parallelism
    model_parallel = spec.tp * spec.pp * spec.cp
    if spec.gpus % model_parallel:
        what = "--tp × --pp" + (" × --cp" if spec.cp > 1 else "")
        raise SpecError(f"--gpus {spec.gpus}: must be a multiple of {what} = {model_parallel}")
    if spec.ckpt_every > 1 and not spec.grad_ckpt:
        raise SpecError(f"--grad-ckpt-every {spec.ckpt_every}: checkpoints every k-th layer of --grad-ckpt; "
                        "give --grad-ckpt")
    if spec.ckpt_every > shape.n_layers:
        raise SpecError(f"--grad-ckpt-every {spec.ckpt_every}: {shape.name} has {shape.n_layers} layers")
    if spec.cp > 1:
        if spec.mode != "train":
            raise SpecError(f"--cp {spec.cp}: context parallelism is modelled for --mode train")
        if spec.seq % spec.cp:
            raise SpecError(f"--cp {spec.cp}: must divide --seq {spec.seq} (each GPU holds seq / cp positions)")
        if spec.attn != "sdpa":
            raise SpecError(f"--cp {spec.cp}: ring attention runs on SDPA; use --attn sdpa")
    if spec.ep > 1:
        if spec.mode != "train":
            raise SpecError(f"--ep {spec.ep}: expert parallelism is modelled for --mode train")
        if not shape.is_moe:
            raise SpecError(f"--ep {spec.ep}: {shape.name} has no routed experts")
        if shape.n_experts % spec.ep:
            raise SpecError(f"--ep {spec.ep}: does not divide the {shape.n_experts} routed experts of {shape.name}")
        if (spec.gpus // (spec.tp * spec.pp)) % spec.ep:
            raise SpecError(f"--ep {spec.ep}: must divide the data-parallel GPUs --gpus / (--tp × --pp) = "
                            f"{spec.gpus // (spec.tp * spec.pp)} (experts are split over data-parallel ranks)")
    if spec.shard_gpus:
        dp_all = spec.gpus // (spec.tp * spec.pp)
        if not spec.zero or spec.shard_gpus < 2 or dp_all % spec.shard_gpus or spec.shard_gpus % spec.cp:
            raise SpecError(f"--shard-gpus {spec.shard_gpus}: with --zero, a divisor ≥ 2 of the data-parallel GPUs "
                            f"--gpus / (--tp × --pp) = {dp_all} (and a multiple of --cp)")
    if spec.sequence_parallel and spec.tp < 2:
        raise SpecError("--sequence-parallel: shards what tensor parallelism replicates; give --tp ≥ 2")
    if spec.tp > 1:
        if shape.n_heads % spec.tp:
            raise SpecError(f"--tp {spec.tp}: does not divide the {shape.n_heads} attention heads of {shape.name}")
        kv = shape.n_kv_heads
        if kv % spec.tp and spec.tp % kv:
            raise SpecError(f"--tp {spec.tp}: neither divides nor is divided by the {kv} KV heads of {shape.name}")
    if spec.pp > shape.n_layers:
        raise SpecError(f"--pp {spec.pp}: more pipeline stages than the {shape.n_layers} layers of {shape.name}")
    if spec.layer_split and (spec.tp > 1 or spec.pp > 1 or spec.zero or spec.cp > 1 or spec.ep > 1):
        raise SpecError("--layer-split: splits layers over --gpus by itself; do not combine with --tp, --pp, --cp, --ep "
                        "or --zero")
    if spec.layer_split and spec.gpus > shape.n_layers:
        raise SpecError(f"--gpus {spec.gpus} with --layer-split: more GPUs than the {shape.n_layers} layers")
    if spec.zero and spec.gpus // (spec.tp * spec.pp) < 2:
        raise SpecError(f"--zero {spec.zero}: needs at least 2 data-parallel GPUs (--gpus / (--tp × --pp))")
    if spec.offload == "params" and spec.mode == "train" and 0 < spec.zero < 2:
        raise SpecError(f"--offload params with --zero {spec.zero}: parameters are offloaded by ZeRO-3 / FSDP "
                        "(--zero 3) or, unsharded, by a device map (--zero 0)")
    if spec.offload == "optimizer" and spec.mode != "train":
        raise SpecError("--offload optimizer: only applies to --mode train")
    impl = spec.optimizer_impl
    if impl == "auto":  # torch picks foreach on CUDA (2.0+); DeepSpeed/FSDP setups use a fused Adam
        impl = "fused" if spec.zero else behaviour(stack, "adamw_impl")
        if spec.recipe != "hf":  # the recipes train with the HF Trainer: its default optim (adamw_torch_fused since 4.54)
            impl = behaviour(stack, "trainer_adamw")
    lora_dtype = spec.lora_dtype
    if lora_dtype == "auto":  # peft < 0.12: the base layer's dtype where it is a float; ≥ 0.12: fp32
        base = behaviour(stack, "adapter_dtype") == "base" and dtype in FLOAT_DTYPES
        lora_dtype = (dtype if precision != "amp" else "fp32") if base else "fp32"
        if spec.recipe == "trl" and dtype in BNB_DTYPES and versioned("trl", recipe_version, "quantized_adapter_dtype") == "bf16":
            lora_dtype = "bf16"  # TRL ≥ 0.26 casts the adapters over a bitsandbytes base to bf16
        elif spec.recipe == "unsloth":
            lora_dtype = "fp32"  # unsloth-zoo prepare_model_for_training: adapters upcast to fp32
    mla_cache = spec.mla_cache if spec.mla_cache != "auto" else behaviour(stack, "mla_cache")
    # The model by its canonical name (catalog id or config path), so spellings hash alike.
    return spec.replace(model=shape.name, dtype=dtype, compute_dtype=compute, precision=precision,
                   kv_dtype=spec.kv_dtype or compute, optimizer_impl=impl, lora_dtype=lora_dtype, mla_cache=mla_cache,
                   stack=stack, recipe_version=spec.recipe_version and recipe_version)


def is_quantized(dtype):
    """True for dtypes whose weights are stored packed."""
    return dtype in BNB_DTYPES + INT4_DTYPES + GGUF_DTYPES + ("fp8", "mxfp4")
