"""Shape-matched transformers models for a Spec: dtype, attention, LoRA, freezing, checkpointing.

The model is built from the spec's config.json with `AutoModelForCausalLM.from_config`, so
every module, parameter and buffer is the one transformers runs; its weights are random
(whatever device or fake-tensor mode is active when `build_model` is called decides where
they live — the tracer calls it inside a FakeTensorMode, so a 70B model costs no memory).

What the spec decides, mirroring `formulas.predict`:

- parameters: `pure` stores them in `spec.dtype`; `amp` (autocast) stores the trainable ones
  in fp32 (full: the whole model; freeze: the trainable layers) and the workload runs the
  forward under `torch.autocast`; `master` (low-precision parameters + fp32 master copy in
  the optimizer, DeepSpeed/FSDP style) is not built here yet.
- LoRA through peft with `lora_dropout=0.0`; peft casts bf16/fp16 adapters to fp32 by default
  (`autocast_adapter_dtype=True`), the adapters are then cast to `spec.lora_dtype`.
- freeze: only the last `spec.trainable_layers` decoder layers require grad.
- gradient checkpointing with `use_reentrant=False` (`activation_checkpointing_enable`, the name
  transformers 5.2x uses; `gradient_checkpointing_enable` is its deprecated alias).

`build_model` = config → float model → `prepare_for_training`; GPU measurement builds its own
(bitsandbytes) models (harness/gpu/measure.py) and applies the same `prepare_for_training`.

Quantized dtypes (bitsandbytes int8/nf4/fp4 and QLoRA, GPTQ/AWQ, GGUF, fp8) are refused: their
kernels (bitsandbytes' CUDA matmuls, GPTQ/AWQ packers, FineGrainedFP8) need real data on a
real device and cannot run on fake tensors, and a dequantize-to-float stand-in would trace a
different model. Their memory is checked by GPU measurement instead.
"""

from formulas.catalog import get_shape, load_config
from formulas.lora import default_targets
from formulas.spec import SpecError, is_quantized, validate

TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# config.json keys that make transformers build something other than the plain float model.
_DROPPED_CONFIG_KEYS = ("quantization_config", "auto_map")


def torch_dtype(name):
    """torch dtype for a vramlab float dtype name ('bf16' → torch.bfloat16)."""
    import torch

    return getattr(torch, TORCH_DTYPES[name])


def check_traceable(spec):
    """Raise SpecError (naming the flag) for what a fake-tensor trace cannot run. `spec` is validated."""
    if spec.method == "qlora" or is_quantized(spec.dtype):
        flag = "--method qlora" if spec.method == "qlora" else f"--dtype {spec.dtype}"
        raise SpecError(f"{flag}: quantized weights cannot be traced on fake tensors (bitsandbytes/GPTQ/AWQ/GGUF/fp8 "
                        "kernels need real data on a GPU); trace a float dtype (bf16, fp16, fp32) or measure on a GPU")
    if spec.kv_dtype != spec.compute_dtype:
        raise SpecError(f"--kv-dtype {spec.kv_dtype}: transformers' DynamicCache keeps K/V in the compute dtype; "
                        "trace without --kv-dtype")
    if spec.precision == "master" and spec.gpus == 1:
        raise SpecError("--precision master: fp32 master weights in the optimizer (DeepSpeed/FSDP) are traced on "
                        "several ranks (--gpus N --zero 2|3); trace --precision amp or pure")
    if spec.pp > 1 or spec.offload != "none":
        flag = f"--pp {spec.pp}" if spec.pp > 1 else f"--offload {spec.offload}"
        raise SpecError(f"{flag}: pipeline stages and offload are not built; trace --tp, --zero or DDP over --gpus")
    if spec.layer_split:
        raise SpecError("--layer-split: the tracer runs one device; trace without --layer-split")
    if spec.recipe != "hf" and spec.gpus > 1:
        raise SpecError(f"--recipe {spec.recipe} with --gpus {spec.gpus}: trace one GPU (DDP replicas each run the "
                        "same step, plus the gradient buckets)")
    if spec.grad_ckpt and spec.ckpt_every > 1:
        raise SpecError(f"--grad-ckpt-every {spec.ckpt_every}: torchtitan's layer-selective checkpointing is predicted, "
                        "not built; trace --grad-ckpt (every layer)")
    if spec.gpus > 1:
        strategy_of(spec)  # the multi-rank combinations that are built, else one line
        kv = get_shape(spec.model).n_kv_heads
        if spec.tp > 1 and kv % spec.tp:
            raise SpecError(f"--tp {spec.tp}: transformers' plan splits the {kv} KV heads column-wise; "
                            f"--tp must divide them to run")
        if spec.precision == "master" and spec.zero < 2:
            raise SpecError(f"--zero {spec.zero}: mixed precision resolves to --precision master here (fp32 master "
                            "weights), which is built with FSDP2 (--zero 2 or 3); give --precision pure or amp")
        if spec.zero >= 2 and spec.precision == "pure":
            pinned = sorted({t.dtype for t in get_shape(spec.model).tensors if t.dtype and t.dtype != spec.dtype})
            if pinned:  # FSDP2 asserts one original dtype per group (_init_mp_dtypes)
                raise SpecError(f"--zero {spec.zero} --precision pure: {spec.model} keeps some parameters in "
                                f"{', '.join(pinned)} (e.g. its router), and FSDP2 shards one dtype per layer; "
                                "give --precision amp or master")


STRATEGIES = ("ddp", "zero1", "fsdp", "tp", "tp_fsdp", "replicas")


def strategy_of(spec):
    """The strategy a validated multi-GPU spec runs (None on one GPU)."""
    if spec.gpus == 1:
        return None
    if spec.mode == "inference" and spec.tp == 1 and not (spec.pp > 1 or spec.layer_split or spec.offload != "none"):
        return "replicas"  # every GPU serves the whole model on its own share of the batch or spec.layer_split or spec.offload != "none":
        flag = "--pp" if spec.pp > 1 else "--layer-split" if spec.layer_split else f"--offload {spec.offload}"
        raise SpecError(f"{flag}: multi-rank runs build DDP, ZeRO-1/2/3 (FSDP2) and tensor parallelism only")
    for flag, on in (("--cp", spec.cp > 1), ("--ep", spec.ep > 1), ("--sequence-parallel", spec.sequence_parallel)):
        if on:
            raise SpecError(f"{flag}: multi-rank runs build DDP, ZeRO-1/2/3 (FSDP2), tensor parallelism and "
                            "TP × FSDP2 only")
    if spec.shard_gpus and (spec.tp > 1 or spec.zero < 2):
        raise SpecError(f"--shard-gpus {spec.shard_gpus}: multi-rank runs build hybrid sharding with FSDP2 (--zero 2/3) "
                        "without --tp")
    if spec.tp > 1:
        if spec.zero == 1:
            raise SpecError(f"--zero 1 with --tp {spec.tp}: tensor parallelism runs with DDP (--zero 0) or FSDP2 "
                            "(--zero 2/3) over the other GPUs")
        if spec.zero >= 2 and spec.mode == "train" and spec.gpus > spec.tp:
            return "tp_fsdp"  # torchtitan's 2-D parallelism: TP inside, FSDP2 over the data-parallel mesh dimension
        return "tp"
    return {0: "ddp", 1: "zero1", 2: "fsdp", 3: "fsdp"}[spec.zero]


def transformers_config(cfg):
    """A transformers config from a config.json dict, without quantization or remote code."""
    import transformers

    from formulas.remote_code import REMOTE_CODE
    from formulas.shapes import UnsupportedModelError

    if cfg.get("model_type") in REMOTE_CODE:
        raise UnsupportedModelError(f"model_type {cfg['model_type']!r} runs the repo's own remote code, which vramlab "
                                    "does not run: it is predicted from that code's module tree (vramlab predict), not "
                                    "built, traced or measured")
    cfg = dict(cfg)
    for key in _DROPPED_CONFIG_KEYS:
        cfg.pop(key, None)
    model_type = cfg.pop("model_type")
    return transformers.AutoConfig.for_model(model_type, **cfg)


def hf_config(spec):
    """The transformers config of the spec's model (`transformers_config` of its config.json); with
    `spec.dropout` off, every dropout probability in it is 0 (the modules read them when built)."""
    config = transformers_config(load_config(spec.model))
    if not spec.dropout:
        for key, value in config.to_dict().items():
            if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
                setattr(config, key, 0.0)
    return config


def decoder_layers(model):
    """The ModuleList of decoder layers (model.layers, transformer.h, decoder.layers, gpt_neox.layers)."""
    import torch

    n = model.config.num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"{type(model).__name__}: no ModuleList of {n} decoder layers found")


def param_dtype(spec):
    """Storage dtype of the base model's parameters."""
    if spec.mode == "train" and spec.precision in ("amp", "master") and spec.method == "full":
        return "fp32"  # autocast trains fp32 parameters; FSDP2 keeps fp32 shards and gathers them low
    return spec.dtype


def _dtype_keyword():
    """`from_config`'s dtype keyword: `dtype` from transformers 4.56, `torch_dtype` before (older
    versions pass an unknown `dtype=` on to the model's __init__, which refuses it)."""
    import transformers

    from formulas.versions import parse_version

    return "dtype" if parse_version(transformers.__version__) >= (4, 56, 0) else "torch_dtype"


def build_model(spec):
    """Build the float model `spec` describes on the current default device / fake mode, set up for its mode.

    `spec` is validated here ('auto' fields resolved) and checked with `check_traceable`."""
    import transformers

    shape = get_shape(spec.model)
    spec = validate(spec, shape)
    check_traceable(spec)
    model = transformers.AutoModelForCausalLM.from_config(
        hf_config(spec), **{_dtype_keyword(): torch_dtype(param_dtype(spec))}, attn_implementation=spec.attn)
    return prepare_for_training(model, spec)


def prepare_for_training(model, spec):
    """Apply the validated spec's mode to a built model and return it (a PeftModel under LoRA).

    inference: eval mode, no parameter requires grad. train: gradient checkpointing, then
    freeze (last `trainable_layers` layers train, in fp32 under autocast) or LoRA adapters in
    `lora_dtype` (peft, also over bitsandbytes layers for QLoRA), then train mode (dropout on).
    LoRA over a bitsandbytes base with `spec.kbit_prep`: peft's `prepare_model_for_kbit_training`
    first, as PEFT's QLoRA recipe does (every unquantized fp16/bf16 weight cast to fp32)."""
    import torch

    if spec.mode != "train":
        model.eval()
        model.requires_grad_(False)
        return model
    if spec.grad_ckpt:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.2x name; the old one warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec.method == "freeze":
        model.requires_grad_(False)
        for layer in list(decoder_layers(model))[-spec.trainable_layers:]:
            if spec.precision == "amp":
                layer.to(torch.float32)  # the trainable layers train in fp32 under autocast
            layer.requires_grad_(True)
    elif spec.method in ("lora", "qlora"):
        import peft

        if spec.kbit_prep and (getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)):
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.grad_ckpt,
                                                         gradient_checkpointing_kwargs={"use_reentrant": False})
        targets = list(spec.lora_targets) or list(default_targets(get_shape(spec.model)))
        if targets == ["all-linear"]:
            targets = "all-linear"
        model = peft.get_peft_model(model, peft.LoraConfig(r=spec.lora_rank, target_modules=targets, lora_dropout=0.0))
        adapter_dtype = torch_dtype(spec.lora_dtype)
        for name, module in model.named_modules():
            if name.endswith((".lora_A", ".lora_B")):
                module.to(adapter_dtype)  # peft made them fp32 (autocast_adapter_dtype); the spec decides
    from .recipes import apply_recipe

    model = apply_recipe(model, spec)  # the recipe's loss, checkpointing and kernels (formulas/recipes.py)
    model.train()
    return model
