"""Which buffers torch.compile gives one chunk of a fused cross-entropy: the check behind Unsloth's loss model.

Unsloth's loss (unsloth-zoo fused_losses/cross_entropy_loss.py, UnslothFusedLoss) runs, per chunk of
hidden states, `torch.func.grad_and_value` of "logits = h @ Wᵀ; cross_entropy(logits.float())"
under `torch.compile(fullgraph=True, dynamic=True)`. Eager PyTorch would hold the chunk's logits,
their fp32 copy, the log-softmax and its gradients (about 18 bytes a logit); the compiled graph
holds far less. This script compiles the same computation (written here, not copied) on the CPU and
prints every buffer the generated code allocates: a (chunk, vocab) buffer in the weight's dtype,
reused for the logits' gradient, per-row fp32 statistics, and the (chunk, hidden) gradient.
formulas/predict.py (_recipe_loss) and harness/workload/recipes.py (UnslothFusedCE) follow it.

    python3 scripts/check_unsloth_ce_compile.py [--tokens 256] [--hidden 512] [--vocab 32000]

Needs torch with a C++ compiler (inductor's CPU backend); minutes on 2 cores. The CUDA backend
schedules reductions its own way (split reductions add small (rows, splits) buffers); the
(chunk, vocab) buffer and its reuse are scheduler decisions shared by both backends.
"""

import argparse
import re


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    a = ap.parse_args()

    import torch
    from torch._inductor.utils import run_and_get_code

    def loss_fn(h, w, labels, divisor):
        logits = torch.nn.functional.linear(h.to(w.dtype), w)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum") / divisor
        return loss, (loss.detach(),)

    def chunk(h, w, labels, divisor, grad_out):
        (g,), (_, (unscaled,)) = torch.func.grad_and_value(loss_fn, argnums=(0,), has_aux=True)(h, w, labels, divisor)
        grad_out[:] = g
        return unscaled

    compiled = torch.compile(chunk, dynamic=True, fullgraph=True)
    h = torch.randn(a.tokens, a.hidden, dtype=torch.bfloat16)
    w = torch.randn(a.vocab, a.hidden, dtype=torch.bfloat16)
    labels = torch.randint(0, a.vocab, (a.tokens,))
    _, codes = run_and_get_code(compiled, h, w, labels, torch.tensor(float(a.tokens)), torch.empty_like(h))
    code = "\n".join(codes)
    print(f"buffers of one chunk ({a.tokens} tokens, hidden {a.hidden}, vocab {a.vocab}, bf16):")
    for m in re.finditer(r"(buf\d+) = empty_strided_\w+\(\(([^)]*)\), \(([^)]*)\), torch\.(\w+)\)", code):
        print(f"  {m.group(1)}: ({m.group(2)}) {m.group(4)}")
    for m in re.finditer(r"(buf\d+) = (buf\d+); del \2  # reuse", code):
        print(f"  {m.group(1)} reuses {m.group(2)}")


if __name__ == "__main__":
    main()
