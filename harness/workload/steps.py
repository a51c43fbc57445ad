"""The workloads vramlab measures: generate-style inference and training steps. No measuring here.

Measurement (the fake-tensor tracer, the GPU measurement) wraps these functions and learns
where the workload is from the `mark(phase)` callback, called as each phase begins. Phase
names are those of `formulas.categories` (PHASES_INFERENCE, PHASES_TRAIN).

inference — what `GenerationMixin._sample` does with a DynamicCache, greedy:
  load; prefill of batch × seq random tokens with `logits_to_keep=1` (or every position with
  `spec.logits == "all"`), the last position's logits copied to fp32; then `spec.gen` decode
  steps of one token each. As in generate, the output object is dropped once its logits are
  copied, and the previous step's fp32 logits stay alive until the next copy replaces them.

training — `spec.grad_accum` micro-batches of forward (`loss = model(ids, labels=ids).loss`,
  the output object dropped at once) and backward, then `optimizer.step()` and
  `zero_grad(set_to_none=True)`; two full steps, because step 1 creates the optimizer state
  that every later step carries.
"""

import contextlib

from formulas.spec import SpecError

from .models import torch_dtype

TRAIN_STEPS = 2  # step 1 allocates optimizer state; step 2 is the steady state


def _no_mark(phase):
    pass


def random_ids(model, batch, seq, device):
    """batch × seq random token ids."""
    import torch

    config = getattr(model, "config", None) or model.module.config  # a DDP wrapper holds the model in .module
    return torch.randint(0, config.vocab_size, (batch, seq), device=device)


def cache_keyword(model):
    """The forward keyword that takes the KV cache: `cache` from transformers 5.24, `past_key_values` before.

    Older versions put an unknown `cache=` into **kwargs and drop it without a warning; every decode
    step would then start a fresh one-token cache. So the name comes from the signature."""
    import inspect

    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise ValueError(f"{type(model).__name__}.forward takes neither `cache` nor `past_key_values`")


def check_cache_length(cache, expected, step):
    """The cache must hold every token so far; anything else means the model did not use it. A cache of
    linear-attention / SSM layers only (Mamba) holds states, not tokens: nothing to count."""
    try:
        held = cache.get_seq_length()
    except ValueError:  # transformers: "`get_seq_length` can only be called on Attention layers"
        return
    if held != expected:
        import transformers

        raise RuntimeError(f"{step}: the KV cache holds {held} tokens, expected {expected} "
                           f"(transformers {transformers.__version__} did not use the cache passed to it)")


def run_inference(model, spec, mark=_no_mark, device="cpu"):
    """Prefill, then `spec.gen` greedy decode steps. Returns the last fp32 logits (batch × vocab).

    After every forward the cache must hold seq + steps tokens (`check_cache_length`)."""
    import torch
    from transformers import DynamicCache

    mark("load")
    kw = cache_keyword(model)
    with torch.no_grad():  # generate() runs under no_grad
        mark("prefill")
        ids = random_ids(model, spec.batch, spec.seq, device)
        cache = DynamicCache(config=model.config)
        keep = 1 if spec.logits == "last" else 0
        out = model(ids, use_cache=True, logits_to_keep=keep, **{kw: cache})
        check_cache_length(cache, spec.seq, "prefill")
        logits = out.logits[:, -1, :].to(copy=True, dtype=torch.float32)
        del out, ids
        for step in range(1, spec.gen + 1):
            mark("decode")
            next_ids = torch.argmax(logits, dim=-1, keepdim=True)
            out = model(next_ids, use_cache=True, logits_to_keep=1, **{kw: cache})
            check_cache_length(cache, spec.seq + step, f"decode step {step}")
            logits = out.logits[:, -1, :].to(copy=True, dtype=torch.float32)
            del out, next_ids
    return logits


def make_optimizer(params, spec):
    """The torch / transformers optimizer the spec names, with the spec's implementation."""
    import torch

    params = list(params)
    impl = spec.optimizer_impl
    if spec.optimizer == "adamw":
        if impl == "fused":
            return torch.optim.AdamW(params, lr=1e-4, fused=True)
        return torch.optim.AdamW(params, lr=1e-4, foreach=impl == "foreach")
    if spec.optimizer in ("sgd", "sgd_momentum"):
        momentum = 0.9 if spec.optimizer == "sgd_momentum" else 0.0
        if impl == "fused":
            return torch.optim.SGD(params, lr=1e-3, momentum=momentum, fused=True)
        return torch.optim.SGD(params, lr=1e-3, momentum=momentum, foreach=impl == "foreach")
    if spec.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, scale_parameter=False, relative_step=False, lr=1e-3)
    raise SpecError(f"--optimizer {spec.optimizer}: a bitsandbytes optimizer; its CUDA kernels cannot run here "
                    "(choose adamw, sgd, sgd_momentum or adafactor)")


def _autocast(spec, device):
    import torch

    if spec.precision != "amp":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=torch_dtype(spec.compute_dtype))


def run_training(model, spec, mark=_no_mark, device="cpu", steps=TRAIN_STEPS, optimizer=None):
    """`steps` optimizer steps of `spec.grad_accum` micro-batches each. Returns the optimizer."""
    mark("load")
    opt = optimizer or make_optimizer((p for p in model.parameters() if p.requires_grad), spec)
    for _ in range(steps):
        for _ in range(spec.grad_accum):
            mark("forward")
            ids = random_ids(model, spec.batch, spec.seq, device)
            with _autocast(spec, device):
                loss = model(input_ids=ids, labels=ids).loss
            del ids
            mark("backward")
            loss.backward()
            del loss
        mark("optimizer_step")
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt
