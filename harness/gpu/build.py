"""The model a spec describes, built on a device (the GPU, or the CPU in tests) the way loading a checkpoint would.

Float models: made on the meta device, then each tensor given storage once. bitsandbytes
int8/nf4/fp4: each nn.Linear but the output embedding replaced by a bitsandbytes layer quantized
from random weights made on the device one layer at a time. Real weights load from a local
directory (`real_model_dir`, local_files_only) with `from_pretrained`. The training setup
(LoRA, freezing, checkpointing) is harness.workload.models.prepare_for_training's, as for tracing.
"""


def _materialize_meta(model, device):
    """Give every parameter and buffer still on the meta device real storage on `device`, once each.

    A tensor two modules share (tied embeddings: lm_head.weight is embed_tokens.weight) is made once
    and given to both, as `from_pretrained` does; making lm_head its own weight and tying afterwards
    would allocate one embedding too many and leave its freed block reserved."""
    import torch

    made = {}  # id of a meta tensor → (that tensor, its materialized replacement)
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                if id(p) not in made:
                    # p.dtype is what the model chose on meta: the compute dtype, or fp32 where it pins it (routers).
                    data = torch.empty(p.shape, device=device, dtype=p.dtype)
                    torch.nn.init.normal_(data, std=0.02) if data.dim() > 1 else data.fill_(1.0)
                    made[id(p)] = (p, torch.nn.Parameter(data, requires_grad=p.requires_grad))
                setattr(module, name, made[id(p)][1])
        fresh = None
        if type(module).__name__.endswith("RotaryEmbedding") and any(b.is_meta for b in module.buffers(recurse=False)):
            fresh = type(module)(module.config)  # tiny: inv_freq is computed from the config in __init__
        for name, b in list(module.named_buffers(recurse=False)):
            if not b.is_meta:
                continue
            if id(b) not in made:
                if fresh is not None and hasattr(fresh, name):
                    value = getattr(fresh, name).to(device)
                elif b.dtype == torch.bool and b.dim() == 2:  # causal-mask buffers
                    value = torch.tril(torch.ones(b.shape, dtype=torch.bool, device=device))
                else:
                    value = torch.zeros(b.shape, dtype=b.dtype, device=device)
                made[id(b)] = (b, value)
            module.register_buffer(name, made[id(b)][1], persistent=name not in module._non_persistent_buffers_set)
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def _bnb_linear(lin, spec, compute_dtype, device):
    """A bitsandbytes layer with the shape of `lin`, quantized from random weights made on `device`."""
    import bitsandbytes as bnb
    import torch

    w = torch.randn(lin.out_features, lin.in_features, device=device, dtype=compute_dtype) * 0.02
    has_bias = lin.bias is not None
    if spec.dtype == "int8":
        new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=has_bias, has_fp16_weights=False,
                                  threshold=6.0, device="meta")
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(w.to(torch.float16))
        new.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    else:
        new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=has_bias, compute_dtype=compute_dtype,
                                compress_statistics=spec.double_quant, quant_type=spec.dtype, device="meta")
        w4, qs = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=spec.double_quant,
                                              quant_type=spec.dtype, quant_storage=torch.uint8)
        new.weight = bnb.nn.Params4bit(w4, requires_grad=False, quant_state=qs, blocksize=64,
                                       compress_statistics=spec.double_quant, quant_type=spec.dtype,
                                       bnb_quantized=True, module=new)
        new.quant_state = qs
    del w
    if has_bias:
        new.bias = torch.nn.Parameter(torch.zeros(lin.out_features, device=device, dtype=compute_dtype),
                                      requires_grad=False)
    return new


def build_on_device(spec, real_model_dir="", device="cuda"):
    """The model for a validated spec on `device`, with the spec's training setup applied.

    Shape-matched models are made on the meta device and then given storage tensor by tensor
    (`_materialize_meta`), so no weight is allocated twice; bitsandbytes layers are quantized from
    random weights one layer at a time, so the float model never exists in full, and the model is
    marked as transformers marks a bitsandbytes-loaded one, so peft picks its bitsandbytes LoRA
    layers (`lora.bnb.Linear4bit` / `Linear8bitLt`)."""
    import torch
    import transformers

    from ..workload.models import (
        hf_config,
        param_dtype,
        prepare_for_training,
        torch_dtype,
    )

    if spec.dtype in ("gptq-int4", "awq-int4", "fp8") or spec.dtype.startswith("q"):
        raise NotImplementedError(f"--dtype {spec.dtype}: GPU measurement covers float and bitsandbytes dtypes")
    compute = torch_dtype(spec.compute_dtype)
    if real_model_dir:
        kw = dict(local_files_only=True, attn_implementation=spec.attn, device_map={"": device})
        if spec.dtype in ("int8", "nf4", "fp4"):
            kw["quantization_config"] = transformers.BitsAndBytesConfig(
                load_in_8bit=spec.dtype == "int8", load_in_4bit=spec.dtype != "int8", bnb_4bit_quant_type=spec.dtype,
                bnb_4bit_use_double_quant=spec.double_quant, bnb_4bit_compute_dtype=compute)
        else:
            kw["dtype"] = torch_dtype(param_dtype(spec))
        model = transformers.AutoModelForCausalLM.from_pretrained(real_model_dir, **kw)
    elif spec.dtype in ("int8", "nf4", "fp4"):
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(hf_config(spec), dtype=compute,
                                                                  attn_implementation=spec.attn)
        out_emb = model.get_output_embeddings()
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear and child is not out_emb:
                    setattr(parent, name, _bnb_linear(child, spec, compute, device))
        _materialize_meta(model, device)
        mark_bnb_loaded(model, spec.dtype)
    else:
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(hf_config(spec), dtype=torch_dtype(param_dtype(spec)),
                                                                  attn_implementation=spec.attn)
        _materialize_meta(model, device)
    return prepare_for_training(model, spec)


def mark_bnb_loaded(model, dtype):
    """Set what transformers' bitsandbytes quantizers set on a model they load (quantizers/base.py,
    quantizer_bnb_4bit.py, quantizer_bnb_8bit.py); peft reads is_loaded_in_4bit/8bit to choose its layers."""
    model.is_quantized = True
    model.quantization_method = "bitsandbytes"
    model.is_loaded_in_4bit = dtype in ("nf4", "fp4")
    model.is_loaded_in_8bit = dtype == "int8"


def make_optimizer_on_device(model, spec):
    """The spec's optimizer over the trainable parameters: bitsandbytes ones here, the others from workload.steps."""
    from ..workload.steps import make_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    if spec.optimizer in ("adamw8bit", "paged_adamw8bit", "lion"):
        import bitsandbytes as bnb

        cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit,
               "lion": bnb.optim.Lion}[spec.optimizer]
        return cls(params, lr=1e-4)
    return make_optimizer(params, spec)
