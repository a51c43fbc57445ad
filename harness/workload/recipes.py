"""The fine-tuning recipes' step, as PyTorch code that allocates what their kernels allocate.

`apply_recipe(model, spec)` turns a model built by `models.prepare_for_training` into the step a
recipe runs (formulas/recipes.py says which, with the sources): its loss, its checkpointing and
the kernels that replace transformers' modules. Liger's and Unsloth's kernels are Triton code
that needs a GPU; here each is an autograd Function that allocates the tensors the kernel
allocates (its outputs, what it saves for backward, what its backward writes) and does its
arithmetic inside `kernel_internals()` — what a fused kernel keeps in registers, not in device
memory, so measurement does not count it. The saved tensors are the kernels' own
`save_for_backward` lists; the arithmetic is plain PyTorch (rmsnorm, silu·mul, cross-entropy),
so on real tensors the values are right too.

- loss `fused`: Liger's fused linear cross-entropy (chunks of next_pow2(ceil(BT / ceil(V/H)))
  rows, logits in the input dtype, gradient written in place, grad_input kept) or Unsloth's
  fused loss as torch.compile runs it (one buffer of chunk logits in lm_head's dtype, reused
  for their gradient; the hidden-state gradient kept; scripts/check_unsloth_ce_compile.py reads
  the compiled graph's buffers on the CPU);
- loss `chunked`: TRL's chunked_nll as it is written (eager PyTorch, 256 tokens a chunk);
- loss `cut`: Cut Cross-Entropy (log-sum-exp kept, gradient of the hidden states in backward);
- loss `inplace`: Unsloth before 2025.8.6 (bf16 logits kept, gradient written in place);
- checkpointing `offload`: Unsloth's reentrant checkpoint with pinned host buffers and GPU
  staging buffers; `selective`: torch's selective checkpointing saving the attention kernel's
  outputs (axolotl's policy);
- kernels: RMSNorm (Liger, Unsloth), SiLU·mul (Liger), Unsloth's LoRA_QKV / LoRA_W / LoRA_MLP.

Host memory (the pinned buffers) is allocated inside `host_memory()`. Both markers are plain
module state that the category tracker reads (harness/tracing/tracker.py); nothing here
measures.
"""

import contextlib
import functools

from formulas import recipes as R

_LABELS = []  # "internal" | "host": what storages born now are (read by the category tracker)


@contextlib.contextmanager
def _labelled(what):
    _LABELS.append(what)
    try:
        yield
    finally:
        _LABELS.pop()


def kernel_internals():
    """Storages born inside are a fused kernel's arithmetic (registers and shared memory on a GPU)."""
    return _labelled("internal")


def host_memory():
    """Storages born inside live in (pinned) host RAM."""
    return _labelled("host")


def current_label():
    """'internal', 'host' or None: what a storage born now is."""
    return _LABELS[-1] if _LABELS else None


def causal_lm(model):
    """The transformers *ForCausalLM module inside `model` (a PeftModel wraps one)."""
    from transformers import PreTrainedModel

    for _, m in model.named_modules():
        if isinstance(m, PreTrainedModel) and m.get_output_embeddings() is not None:
            return m
    raise ValueError(f"{type(model).__name__}: no module with an output embedding")


# ------------------------------------------------------------------ kernels

def _functions():
    """The autograd Functions, built on first use (torch is imported lazily)."""
    import torch
    import torch.nn.functional as F

    class RMSNorm(torch.autograd.Function):
        """Liger LigerRMSNormFunction (ops/rms_norm.py lines 449-453, 657; llama casting mode) and Unsloth
        Fast_RMS_Layernorm (kernels/rms_layernorm.py lines 182-205): Y in the input dtype, a fp32 rstd per row,
        save (X, W, rstd); backward writes dX into dY."""

        @staticmethod
        def forward(ctx, x, weight, eps):
            x2 = x.view(-1, x.shape[-1])
            y = torch.empty_like(x2)
            rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
            with kernel_internals():
                xf = x2.float()
                r = torch.rsqrt(xf.pow(2).mean(-1) + eps)
                rstd.copy_(r)
                y.copy_((xf * r[:, None]).to(x.dtype) * weight)
            ctx.save_for_backward(x2, weight, rstd)
            return y.view(x.shape)

        @staticmethod
        def backward(ctx, dy):
            x2, weight, rstd = ctx.saved_tensors
            dy2 = dy.contiguous().view(-1, dy.shape[-1])
            dw = None
            with kernel_internals():
                xf = x2.float()
                xhat = xf * rstd[:, None]
                g = dy2.float() * weight.float()
                dx = rstd[:, None] * (g - xhat * (g * xhat).mean(-1, keepdim=True))
                if ctx.needs_input_grad[1]:
                    dwf = (dy2.float() * xhat.to(x2.dtype).float()).sum(0)
            if ctx.needs_input_grad[1]:
                dw = torch.empty_like(weight)
                with kernel_internals():
                    dw.copy_(dwf)
            with kernel_internals():
                dy2.copy_(dx)  # in place (Liger in_place=True; Unsloth dX = dY)
            return dy2.view(dy.shape), dw, None

    class SiLUMul(torch.autograd.Function):
        """Liger LigerSiLUMulFunction (ops/swiglu.py lines 155, 191-262): c = silu(a)·b, save (a, b); backward
        writes the gradients into a and b."""

        @staticmethod
        def forward(ctx, a, b):
            c = torch.empty_like(a)
            with kernel_internals():
                c.copy_(F.silu(a) * b)
            ctx.save_for_backward(a, b)
            return c

        @staticmethod
        def backward(ctx, dc):
            a, b = ctx.saved_tensors
            with kernel_internals():
                af = a.float()
                sig = torch.sigmoid(af)
                silu = af * sig
                db = (dc.float() * silu).to(a.dtype)
                da = (dc.float() * b.float() * (sig * (1 + af * (1 - sig)))).to(a.dtype)
                a.copy_(da)
                b.copy_(db)
            return a, b

    def matmul_lora(x, w, a, b, s):
        """Unsloth kernels/utils.py matmul_lora: out = x·Wᵀ, then out += s·(x·Aᵀ)·Bᵀ in x's dtype (in place)."""
        x2 = x.reshape(-1, x.shape[-1])
        out = x2 @ w.t()
        with kernel_internals():
            out.addmm_(x2 @ a.to(x.dtype).t(), b.to(x.dtype).t(), alpha=s)
        return out.view(*x.shape[:-1], out.shape[-1])

    def lora_grads(x2, d2, a, b, s):
        """dA, dB of one LoRA pair (small; the adapters' dtype)."""
        with kernel_internals():
            da = (s * (d2 @ b.to(d2.dtype)).t() @ x2).to(a.dtype)
            db = (s * d2.t() @ (x2 @ a.to(x2.dtype).t())).to(b.dtype)
        ga, gb = torch.empty_like(a), torch.empty_like(b)
        with kernel_internals():
            ga.copy_(da)
            gb.copy_(db)
        return ga, gb

    class LoRAQKV(torch.autograd.Function):
        """Unsloth LoRA_QKV (kernels/fast_lora.py lines 368-430): Q, K, V = matmul_lora(X, ·), save (X, A's, B's);
        backward writes dX into X (inplace=True)."""

        @staticmethod
        def forward(ctx, x, qw, qa, qb, kw, ka, kb, vw, va, vb, s):
            q, k, v = matmul_lora(x, qw, qa, qb, s), matmul_lora(x, kw, ka, kb, s), matmul_lora(x, vw, va, vb, s)
            ctx.save_for_backward(x, qa, qb, ka, kb, va, vb)
            ctx.w, ctx.s = (qw, kw, vw), s
            return q, k, v

        @staticmethod
        def backward(ctx, dq, dk, dv):
            x, qa, qb, ka, kb, va, vb = ctx.saved_tensors
            x2 = x.view(-1, x.shape[-1])
            grads = []
            for d, a, b in ((dq, qa, qb), (dk, ka, kb), (dv, va, vb)):
                grads += lora_grads(x2, d.reshape(-1, d.shape[-1]), a, b, ctx.s)
            with kernel_internals():
                dx = sum(d.reshape(-1, d.shape[-1]) @ w.to(x.dtype) for d, w in zip((dq, dk, dv), ctx.w))
                x2.copy_(dx)
            return (x, None, grads[0], grads[1], None, grads[2], grads[3], None, grads[4], grads[5], None)

    class LoRAW(torch.autograd.Function):
        """Unsloth LoRA_W (kernels/fast_lora.py lines 604-650): save (A, B, X); backward makes dX."""

        @staticmethod
        def forward(ctx, x, w, a, b, s):
            ctx.save_for_backward(a, b, x)
            ctx.w, ctx.s = w, s
            return matmul_lora(x, w, a, b, s)

        @staticmethod
        def backward(ctx, dy):
            a, b, x = ctx.saved_tensors
            d2 = dy.reshape(-1, dy.shape[-1])
            ga, gb = lora_grads(x.reshape(-1, x.shape[-1]), d2, a, b, ctx.s)
            dx = torch.empty_like(x)
            with kernel_internals():
                dx.view(-1, x.shape[-1]).copy_(d2 @ ctx.w.to(x.dtype) + ctx.s * (d2 @ b.to(x.dtype)) @ a.to(x.dtype))
            return dx, None, ga, gb, None

    class LoRAMLP(torch.autograd.Function):
        """Unsloth LoRA_MLP (kernels/fast_lora.py lines 69-229): e, g = matmul_lora(X, gate / up), h = silu(e)·g,
        i = matmul_lora(h, down); save (A's, B's, X, e, g). Backward: DW = dY·down (new), the SwiGLU backward in
        place into (DW, e, g), dX written into X."""

        @staticmethod
        def forward(ctx, x, gw, ga, gb, uw, ua, ub, dw, da, db, s):
            e = matmul_lora(x, gw, ga, gb, s)
            g = matmul_lora(x, uw, ua, ub, s)
            h = torch.empty_like(e)
            with kernel_internals():
                h.copy_(F.silu(e) * g)
            i = matmul_lora(h, dw, da, db, s)
            ctx.save_for_backward(ga, gb, ua, ub, da, db, x, e, g)
            ctx.w, ctx.s = (gw, uw, dw), s
            return i

        @staticmethod
        def backward(ctx, dy):
            ga, gb, ua, ub, da, db, x, e, g = ctx.saved_tensors
            gw, uw, dw = ctx.w
            s = ctx.s
            x2, e2, g2 = x.view(-1, x.shape[-1]), e.view(-1, e.shape[-1]), g.view(-1, g.shape[-1])
            d2 = dy.reshape(-1, dy.shape[-1])
            big = d2 @ dw.to(x.dtype)  # DW = matmul_lora(dY, downWᵀ, …): a new (tokens, intermediate) tensor
            with kernel_internals():
                big.addmm_(d2 @ db.to(x.dtype), da.to(x.dtype), alpha=s)
                ef = e2.float()
                sig = torch.sigmoid(ef)
                h = (ef * sig * g2.float()).to(x.dtype)
                df = (big.float() * ef * sig).to(x.dtype)
                de = (big.float() * g2.float() * sig * (1 + ef * (1 - sig))).to(x.dtype)
                big.copy_(h)  # swiglu_DWf_DW_dfg_kernel: h, df, de written over DW, e, g
                e2.copy_(df)
                g2.copy_(de)
            gda, gdb = lora_grads(big, d2, da, db, s)
            gua, gub = lora_grads(x2, e2, ua, ub, s)  # up's output gradient (df) now lives in e
            gga, ggb = lora_grads(x2, g2, ga, gb, s)  # gate's (de) in g
            with kernel_internals():
                dx = e2 @ uw.to(x.dtype) + g2 @ gw.to(x.dtype)
                x2.copy_(dx)  # torch.matmul(df, upWᵀ, out=X), then the gate's share added
            return (x, None, gga, ggb, None, gua, gub, None, gda, gdb, None)

    return {"RMSNorm": RMSNorm, "SiLUMul": SiLUMul, "LoRAQKV": LoRAQKV, "LoRAW": LoRAW, "LoRAMLP": LoRAMLP}


@functools.lru_cache(maxsize=1)
def functions():
    """The kernels' autograd Functions by name."""
    return _functions()


# ------------------------------------------------------------------ losses

def _loss_functions():
    import torch
    import torch.nn.functional as F

    def _ce_grad(logits, labels, divisor):
        """(loss sum, d loss / d logits) of a chunk, in fp32 (a kernel's arithmetic)."""
        lf = logits.float()
        lse = torch.logsumexp(lf, -1)
        valid = labels != -100
        picked = lf.gather(-1, labels.clamp(min=0)[:, None])[:, 0]
        loss = ((lse - picked) * valid).sum()
        grad = torch.softmax(lf, -1)
        grad.scatter_add_(-1, labels.clamp(min=0)[:, None], -torch.ones_like(grad[:, :1]))
        return loss, grad * (valid[:, None] / divisor)

    class UnslothFusedCE(torch.autograd.Function):
        """unsloth-zoo UnslothFusedLoss (fused_losses/cross_entropy_loss.py lines 187-445) as torch.compile runs
        each chunk: the chunk's logits in lm_head's dtype, their gradient written over them, the chunk's hidden
        gradient (a new tensor) copied into grad_inputs; save (grad_inputs, grad_lm_head)."""

        @staticmethod
        def forward(ctx, hidden, weight, labels, n_chunks):
            shifted = torch.empty_like(labels)  # labels[..., 1:] with -100 at the end (line 224)
            with kernel_internals():
                shifted[..., :-1] = labels[..., 1:]
                shifted[..., -1] = -100
            shifted = shifted.view(-1)
            with kernel_internals():
                divisor = (shifted != -100).sum().float()
            grad_inputs = torch.empty_like(hidden)
            grad_w = torch.zeros_like(weight) if weight.requires_grad else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            h2 = hidden.reshape(-1, hidden.shape[-1])
            for hj, lj, gj in zip(torch.chunk(h2, n_chunks), torch.chunk(shifted, n_chunks),
                                  torch.chunk(grad_inputs.view(-1, hidden.shape[-1]), n_chunks)):
                logits = hj.to(weight.dtype) @ weight.t()
                with kernel_internals():
                    loss, grad = _ce_grad(logits, lj, divisor)
                    total.add_(loss / divisor)
                    logits.copy_(grad)  # the compiled graph reuses the logits' buffer for their gradient
                gi = logits @ weight  # extern mm into a new (chunk, hidden) buffer
                with kernel_internals():
                    gj.copy_(gi)
                if grad_w is not None:
                    gw = logits.t() @ hj.to(weight.dtype)
                    with kernel_internals():
                        grad_w.add_(gw)
                    del gw
                del logits, gi
            ctx.save_for_backward(grad_inputs, grad_w)
            return total

        @staticmethod
        def backward(ctx, grad_output):
            grad_inputs, grad_w = ctx.saved_tensors
            # line 527: out of place, so the saved tensor is not bumped
            return grad_inputs * grad_output, (grad_w * grad_output if grad_w is not None else None), None, None

    class LigerFLCE(torch.autograd.Function):
        """Liger LigerFusedLinearCrossEntropyFunction (ops/fused_linear_cross_entropy.py lines 20-265, reduction
        mean): grad_input zeros, fp32 loss per row, per chunk the logits in the input dtype with their gradient
        written in place (liger_cross_entropy_kernel), grad_input[chunk] = grad_logits @ W; save grad_input (and
        grad_weight)."""

        @staticmethod
        def forward(ctx, x, weight, target):
            bt, h = x.shape
            chunk = R.liger_chunk_tokens(bt, h, weight.shape[0])
            grad_input = torch.zeros_like(x)
            grad_w = torch.zeros_like(weight) if weight.requires_grad else None
            loss_1d = torch.zeros(bt, dtype=torch.float32, device=x.device)
            mask = target != -100
            with kernel_internals():
                n = mask.sum().float()
            for start in range(0, bt, chunk):
                xc = x[start:start + chunk]
                logits = xc @ weight.t()
                with kernel_internals():
                    loss, grad = _ce_grad(logits, target[start:start + chunk], n)
                    loss_1d[start:start + chunk] = loss / max(1, xc.shape[0])
                    logits.copy_(grad)  # the kernel writes the gradient over the logits
                gi = logits @ weight
                grad_input[start:start + chunk] = gi
                if grad_w is not None:
                    gw = torch.mm(logits.t(), xc).float()
                    grad_w += gw
                    del gw
                del logits, gi
            loss = torch.sum(loss_1d)
            ctx.save_for_backward(grad_input, grad_w)
            return loss

        @staticmethod
        def backward(ctx, grad_output):
            grad_input, grad_w = ctx.saved_tensors
            with kernel_internals():  # element_mul_kernel, in place (a no-op at grad_output == 1)
                grad_input.mul_(grad_output)
                if grad_w is not None:
                    grad_w.mul_(grad_output)
            return grad_input, grad_w, None

    class CutCE(torch.autograd.Function):
        """Cut Cross-Entropy (apple/ml-cross-entropy cce.py lines 51-165, cce_backward.py lines 391-394): the fp32
        log-sum-exp per row; save (e, c, lse); backward: de = zeros_like(e) (and dc), the logits recomputed in
        blocks on chip."""

        @staticmethod
        def forward(ctx, e, c, targets):
            lse = torch.full((e.shape[0],), float("-inf"), dtype=torch.float32, device=e.device)
            with kernel_internals():
                lf = (e @ c.t()).float()
                lse.copy_(torch.logsumexp(lf, -1))
                valid = targets != -100
                loss = ((lse - lf.gather(-1, targets.clamp(min=0)[:, None])[:, 0]) * valid).sum() / valid.sum()
            ctx.save_for_backward(e, c, lse, targets)
            return loss

        @staticmethod
        def backward(ctx, grad_output):
            e, c, lse, targets = ctx.saved_tensors
            de = torch.zeros_like(e) if ctx.needs_input_grad[0] else None
            dc = torch.zeros_like(c) if ctx.needs_input_grad[1] else None
            with kernel_internals():
                _, grad = _ce_grad(e @ c.t(), targets, (targets != -100).sum().float())
                grad = grad * grad_output
                if de is not None:
                    de.copy_(grad.to(e.dtype) @ c)
                if dc is not None:
                    dc.copy_(grad.t().to(e.dtype) @ e)
            return de, dc, None

    class InplaceCE(torch.autograd.Function):
        """Unsloth before 2025.8.6: Fast_CrossEntropyLoss (kernels/cross_entropy_loss.py) on the logits as they
        come: fp32 loss and log-sum-exp per row, save (logits, logsumexp, labels); backward writes dlogits into
        the logits."""

        @staticmethod
        def forward(ctx, logits, labels):
            rows = logits.shape[0]
            losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
            lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
            with kernel_internals():
                lf = logits.float()
                lse.copy_(torch.logsumexp(lf, -1))
                valid = labels != -100
                losses.copy_((lse - lf.gather(-1, labels.clamp(min=0)[:, None])[:, 0]) * valid)
                loss = losses.sum() / valid.sum()
            ctx.save_for_backward(logits, lse, labels)
            return loss

        @staticmethod
        def backward(ctx, grad_output):
            logits, lse, labels = ctx.saved_tensors
            with kernel_internals():
                _, grad = _ce_grad(logits, labels, (labels != -100).sum().float())
                logits.copy_(grad * grad_output)
            return logits, None

    def trl_chunk(h, w, lbl):
        """TRL sft_trainer.py `_chunk` (lines 99-114): fp32 logits of one chunk, loss, accuracy, entropy."""
        logits = h.float() @ w.float().t()
        log_p = F.log_softmax(logits, dim=-1)
        chunk_loss = F.nll_loss(log_p, lbl, ignore_index=-100, reduction="sum")
        valid = lbl != -100
        chunk_correct = ((logits.argmax(dim=-1) == lbl) & valid).sum().float()
        chunk_entropy = (-(log_p.exp() * log_p).sum(dim=-1) * valid).sum()
        return chunk_loss, chunk_correct, chunk_entropy

    def trl_chunked_loss(hidden_states, weight, labels, chunk_size=R.TRL_CHUNK_TOKENS):
        """TRL `_chunked_cross_entropy_loss` (lines 117-234): valid tokens packed to the front, chunks of
        `chunk_size` under a non-reentrant checkpoint each, mean over the valid tokens."""
        hidden = hidden_states[..., :-1, :].reshape(-1, hidden_states.size(-1))
        labels = labels[..., 1:].reshape(-1)
        valid = labels != -100
        n_valid = valid.sum()
        order = valid.to(torch.int8).argsort(descending=True, stable=True)
        hidden = hidden[order]
        labels = labels[order]
        n_padded = -(-labels.shape[0] // chunk_size) * chunk_size  # every token is valid here (no padding)
        loss = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, n_padded, chunk_size):
            chunk_loss, _, _ = torch.utils.checkpoint.checkpoint(
                trl_chunk, hidden[start:start + chunk_size], weight, labels[start:start + chunk_size],
                use_reentrant=False)
            loss = loss + chunk_loss
        return loss / n_valid

    return {"unsloth": UnslothFusedCE, "liger": LigerFLCE, "cce": CutCE, "unsloth_inplace": InplaceCE,
            "trl": trl_chunked_loss}


@functools.lru_cache(maxsize=1)
def loss_functions():
    """The losses by Rules.loss_impl."""
    return _loss_functions()


def _loss_module(rules):
    """An nn.Module computing the recipe's loss from the final hidden states: the category tracker counts what
    it allocates as logits."""
    import torch
    import torch.nn.functional as F

    class RecipeLoss(torch.nn.Module):
        """The recipe's loss on the final hidden states and lm_head's weight (the implementation by token count:
        formulas.recipes.loss_impl)."""

        def forward(self, hidden, weight, labels):
            fns = loss_functions()
            impl = R.loss_impl(rules, labels.numel())
            if impl == "trl":
                return fns["trl"](hidden, weight, labels)
            shifted = F.pad(labels, (0, 1), value=-100)[..., 1:].contiguous().view(-1)
            if impl == "unsloth":
                b, s, _ = hidden.shape
                chunks = R.unsloth_ce_chunks(b * s, weight.shape[0], rules.ce_target_bytes)
                return fns["unsloth"].apply(hidden, weight, labels, chunks)
            if impl == "liger":
                return fns["liger"].apply(hidden.view(-1, hidden.shape[-1]), weight, shifted)
            if impl == "cce":
                return fns["cce"].apply(hidden.view(-1, hidden.shape[-1]), weight, shifted)
            logits = F.linear(hidden, weight)  # unsloth_inplace: lm_head's logits, kept
            return fns["unsloth_inplace"].apply(logits.view(-1, logits.shape[-1]), shifted)

    return RecipeLoss()


def _patch_loss(causal_lm, rules):
    """Replace the CausalLM's forward by the base model + the recipe's loss, as Liger's lce_forward, Unsloth's
    CausalLM_fast_forward and TRL's _patch_chunked_ce_lm_head do (logits=None)."""
    import types

    from transformers.modeling_outputs import CausalLMOutputWithPast

    causal_lm.recipe_loss = _loss_module(rules)
    base = causal_lm.get_decoder() if hasattr(causal_lm, "get_decoder") else causal_lm.model

    def forward(self, input_ids=None, labels=None, attention_mask=None, inputs_embeds=None, **kwargs):
        out = base(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, use_cache=False)
        hidden = out[0]
        loss = self.recipe_loss(hidden, self.get_output_embeddings().weight, labels) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=None)

    causal_lm.forward = types.MethodType(forward, causal_lm)


# ------------------------------------------------------------------ checkpointing

class _OffloadState:
    """Unsloth's checkpointing state (unsloth-zoo gradient_checkpointing.py lines 580-700), per model: pinned host
    buffers, one or two GPU staging buffers, and the pass counters that keep the last layer's input on the GPU."""

    def __init__(self, dtype, double_buffer):
        import torch

        with host_memory():
            self.cpu = [torch.empty(R.UNSLOTH_CPU_BUFFER_ELEMENTS, dtype=dtype)
                        for _ in range(R.UNSLOTH_CPU_BUFFERS)]
        self.gpu = [torch.empty(R.UNSLOTH_GPU_BUFFER_ELEMENTS, dtype=dtype),
                    torch.empty(R.UNSLOTH_GPU_BUFFER_ELEMENTS, dtype=dtype) if double_buffer else None]
        self.dtype = dtype
        self.double = False  # enabled after the first pass (USE_DOUBLE_BUFFER)
        self.first_pass = True
        self.last = 0  # LAST_GC_INDEX
        self.current = 0  # CURRENT_GC_INDEX
        self.cpu_index = 0
        self.slot = 0
        self.backward_pass = True
        self.minimum = R.UNSLOTH_OFFLOAD_MIN_BYTES // dtype.itemsize


def _offload_function():
    import torch

    class UnslothCheckpoint(torch.autograd.Function):
        """unsloth-zoo UnslothCheckpointFunction (gradient_checkpointing.py lines 705-1025): reentrant; the first
        tensor argument copied to a pinned host buffer (unless it is the last layer's, after the first pass, or
        not above 2 MiB), the layer run under no_grad; backward copies it into a GPU staging buffer, recomputes
        the layer with grad and runs its backward."""

        @staticmethod
        def forward(ctx, state, run_function, *args):
            ctx.state, ctx.run_function = state, run_function
            ctx.offloaded = None
            tensors = []
            for i, arg in enumerate(args):
                if not torch.is_tensor(arg):
                    continue
                if i == 0 and arg.requires_grad:
                    if state.first_pass:
                        state.last += 1
                    state.current += 1
                    n = arg.numel()
                    if n > state.minimum and (state.current != state.last or state.first_pass):
                        if state.backward_pass:
                            state.backward_pass = False
                            state.cpu_index = 0
                            if not state.first_pass and state.gpu[1] is not None:
                                state.double = True  # free memory > 512 MiB assumed
                        if state.cpu_index >= len(state.cpu):
                            with host_memory():
                                state.cpu.append(torch.empty(n, dtype=arg.dtype))
                        if n > state.cpu[state.cpu_index].numel():
                            with host_memory():
                                state.cpu[state.cpu_index] = torch.empty(n, dtype=arg.dtype)  # resize_
                        if n > state.gpu[0].numel():
                            state.gpu[0] = torch.empty(n, dtype=state.dtype)  # resize_: a new block
                        if state.double and n > state.gpu[1].numel():
                            state.gpu[1] = torch.empty(n, dtype=state.dtype)
                        state.cpu[state.cpu_index][:n].view(arg.shape).copy_(arg)
                        ctx.offloaded = (n, arg.shape, state.cpu_index, state.slot)
                        state.slot ^= 1
                        state.cpu_index += 1
                        tensors.append(None)
                        continue
                tensors.append(arg)
            ctx.save_for_backward(*[t for t in tensors if t is not None])
            ctx.kinds = [t is not None for t in tensors]
            ctx.args = [None if torch.is_tensor(a) else a for a in args]
            ctx.tensor_positions = [i for i, a in enumerate(args) if torch.is_tensor(a)]
            with torch.no_grad():
                return run_function(*args)

        @staticmethod
        def backward(ctx, *grads):
            state = ctx.state
            saved = iter(ctx.saved_tensors)
            args = list(ctx.args)
            for pos, kept in zip(ctx.tensor_positions, ctx.kinds):
                args[pos] = next(saved) if kept else None
            if ctx.offloaded is not None:
                n, shape, index, slot = ctx.offloaded
                buffer = state.gpu[1] if (state.double and slot == 1) else state.gpu[0]
                view = buffer[:n].view(shape)
                view.copy_(state.cpu[index][:n].view(shape))
                args[0] = view
            state.backward_pass = True
            state.first_pass = False
            state.current = 0
            detached = []
            for a in args:
                if torch.is_tensor(a):
                    d = a.detach()
                    d.requires_grad_(a.requires_grad or a is args[0])
                    detached.append(d)
                else:
                    detached.append(a)
            with torch.enable_grad():
                outputs = ctx.run_function(*detached)
            if torch.is_tensor(outputs):
                outputs = (outputs,)
            pairs = [(o, g) for o, g in zip(outputs, grads) if torch.is_tensor(o) and o.requires_grad]
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            return (None, None) + tuple(d.grad if torch.is_tensor(d) else None for d in detached)

    return UnslothCheckpoint


def _sac_context():
    """torch's selective checkpointing with axolotl's policy: save the attention kernels' outputs
    (monkeypatch/selective_checkpointing.py, _ATEN_ATTENTION_PACKETS), recompute the rest."""
    import torch
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    ops = {getattr(torch.ops.aten, n).default for n in (
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
        if hasattr(torch.ops.aten, n)}

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in ops else CheckpointPolicy.PREFER_RECOMPUTE

    return functools.partial(create_selective_checkpoint_contexts, policy)


def _checkpointed_layers(model):
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]


def _patch_checkpointing(model, spec, rules):
    import torch

    layers = _checkpointed_layers(model)
    mode = R.effective_ckpt_mode(rules, spec.seq)
    if mode == "offload":
        dtype = next(p for p in model.parameters() if p.dtype.is_floating_point).dtype
        fn = _offload_function()
        holder = {}

        def offloaded(run_function, *args):
            # Unsloth makes its buffers when it patches checkpointing (get_peft_model); here at the first layer
            # call, so that a measurement wrapped around the workload sees them born
            if "state" not in holder:
                holder["state"] = _OffloadState(dtype, rules.double_buffer)
            return fn.apply(holder["state"], run_function, *args)

        model._recipe_offload_state = holder  # kept as long as the model: Unsloth's buffers are process-wide
        for layer in layers:
            layer._gradient_checkpointing_func = offloaded
    elif mode == "selective":
        ckpt = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False, context_fn=_sac_context())
        for layer in layers:
            layer._gradient_checkpointing_func = ckpt
    elif rules.ckpt_reentrant:
        ckpt = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=True)
        for layer in layers:
            layer._gradient_checkpointing_func = ckpt


# ------------------------------------------------------------------ kernels into the model

def _lora_parts(module):
    """(base weight, lora_A weight, lora_B weight, scaling) of a peft LoRA Linear with one adapter, or None."""
    a = getattr(module, "lora_A", None)
    if not a or len(a) != 1 or getattr(module.get_base_layer(), "bias", None) is not None:
        return None
    name = next(iter(a))
    return module.get_base_layer().weight, a[name].weight, module.lora_B[name].weight, module.scaling[name]


def _patch_kernels(model, spec, rules):
    """Put the recipe's kernels into the decoder layers (Llama-style dense layers only, as formulas/recipes.py)."""
    import types

    fns = functions()
    if rules.norm_kernel:
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm") and hasattr(m, "weight"):
                eps = getattr(m, "variance_epsilon", getattr(m, "eps", 1e-6))
                m.forward = types.MethodType(lambda self, x, _eps=eps: fns["RMSNorm"].apply(x, self.weight, _eps), m)
    for m in model.modules():
        mlp = getattr(m, "mlp", None)
        attn = getattr(m, "self_attn", None)
        if mlp is not None and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            parts = [_lora_parts(getattr(mlp, n)) for n in ("gate_proj", "up_proj", "down_proj")]
            if rules.fused_lora and all(parts) and len({p[3] for p in parts}) == 1:
                def mlp_forward(self, x, _parts=parts):
                    (gw, ga, gb, s), (uw, ua, ub, _), (dw, da, db, _) = _parts
                    return fns["LoRAMLP"].apply(x, gw, ga, gb, uw, ua, ub, dw, da, db, s)
                mlp.forward = types.MethodType(mlp_forward, mlp)
            elif rules.swiglu_kernel:
                def swiglu_forward(self, x):
                    return self.down_proj(fns["SiLUMul"].apply(self.gate_proj(x), self.up_proj(x)))
                mlp.forward = types.MethodType(swiglu_forward, mlp)
        if rules.fused_lora and attn is not None and all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj")):
            qkv = [_lora_parts(getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj")]
            if all(qkv) and len({p[3] for p in qkv}) == 1:
                _fuse_qkv(attn, qkv, fns["LoRAQKV"])
            o = _lora_parts(attn.o_proj) if hasattr(attn, "o_proj") else None
            if o:
                o_proj = attn.o_proj
                o_proj.forward = types.MethodType(lambda self, x, _o=o: fns["LoRAW"].apply(x, *_o), o_proj)


def _fuse_qkv(attn, parts, fn):
    """transformers' attention calls q_proj, k_proj and v_proj one after the other on the same input; the first
    call runs LoRA_QKV for all three and the next two return its K and V (one Function, X saved once)."""
    import types

    (qw, qa, qb, s), (kw, ka, kb, _), (vw, va, vb, _) = parts
    held = {}

    def q_forward(self, x):
        q, k, v = fn.apply(x, qw, qa, qb, kw, ka, kb, vw, va, vb, s)
        held["x"], held["k"], held["v"] = x, k, v
        return q

    def kv_forward(which):
        def forward(self, x):
            if held.get("x") is not x:
                raise RuntimeError("LoRA_QKV emulation: k_proj/v_proj called on another input than q_proj")
            out = held.pop(which)
            if not ("k" in held or "v" in held):
                held.clear()
            return out
        return forward

    attn.q_proj.forward = types.MethodType(q_forward, attn.q_proj)
    attn.k_proj.forward = types.MethodType(kv_forward("k"), attn.k_proj)
    attn.v_proj.forward = types.MethodType(kv_forward("v"), attn.v_proj)


def _on_gpu(model):
    return any(p.device.type == "cuda" for p in model.parameters())


def _real_kernels(model, spec, rules, causal_lm):
    """On a GPU the recipe's own kernels run, not the emulation (whose arithmetic would be device memory there):
    Liger's through liger-kernel; TRL's chunked loss and selective checkpointing are plain PyTorch already.
    Unsloth (its own model loading, pinned to transformers ≤ 5.5 in 2026.8.19) and Cut Cross-Entropy are not
    built for measurement."""
    from formulas.spec import SpecError

    if spec.recipe == "unsloth" or rules.loss in ("cut", "inplace"):
        raise SpecError(f"--recipe {spec.recipe} --loss {rules.loss}: measured on a GPU only with the package itself "
                        "(Unsloth's FastLanguageModel, apple's cut_cross_entropy), which vramlab does not build; "
                        "`vramlab predict` and `vramlab trace` model it")
    if rules.norm_kernel or rules.swiglu_kernel or rules.loss == "fused":
        try:
            from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance
        except ImportError:
            raise SpecError(f"--recipe {spec.recipe}: measuring Liger's kernels needs liger-kernel on the GPU machine "
                            "(../shared/tools/gpu-wheels liger-kernel, then install the wheel)") from None
        fused = rules.loss == "fused"
        _apply_liger_kernel_to_instance(model=causal_lm, rope=rules.norm_kernel, rms_norm=rules.norm_kernel,
                                        swiglu=rules.swiglu_kernel, fused_linear_cross_entropy=fused,
                                        cross_entropy=False)


def apply_recipe(model, spec):
    """Make `model` (from models.prepare_for_training, validated `spec`) run the recipe's step; returns it."""
    from formulas.catalog import get_shape

    rules = R.rules(spec, get_shape(spec.model))
    if spec.mode != "train" or spec.recipe == "hf" and rules.loss == "full" and rules.ckpt_mode == "full":
        return model
    if _on_gpu(model):
        if spec.grad_ckpt:
            _patch_checkpointing(model, spec, rules)
        if rules.loss == "chunked":
            _patch_loss(causal_lm(model), rules)
        _real_kernels(model, spec, rules, causal_lm(model))
        return model
    if spec.grad_ckpt:
        _patch_checkpointing(model, spec, rules)
    if rules.norm_kernel or rules.swiglu_kernel or rules.fused_lora:
        _patch_kernels(model, spec, rules)
    if rules.loss != "full":
        _patch_loss(causal_lm(model), rules)
    return model
