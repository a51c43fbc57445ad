"""Trace vs prediction at full size (fake tensors, CPU): peak allocated and activations, traced / predicted.

    python3 benchmarks/trace_vs_predict.py
"""
import os
import sys, time; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from formulas.predict import predict
from formulas.spec import Spec
from harness.tracing.tracer import trace

G = 2**30
cases = [
    dict(model="Llama-3.1-8B", seq=2048, gen=8),
    dict(model="Llama-3.1-8B", seq=2048, gen=8, attn="eager"),
    dict(model="Qwen3-30B-A3B", seq=2048, gen=8),
    dict(model="DeepSeek-V2-Lite", seq=2048, gen=8),
    dict(model="gpt2-xl", seq=1024, gen=8, dtype="fp32"),
    dict(model="Llama-3.1-8B", mode="train", seq=2048, precision="pure"),
    dict(model="Llama-3.1-8B", mode="train", seq=2048),
    dict(model="Llama-3.1-8B", mode="train", seq=2048, method="lora"),
    dict(model="Llama-3.1-8B", mode="train", seq=2048, method="lora", grad_ckpt=True),
    dict(model="Qwen2.5-1.5B", mode="train", seq=2048, batch=2, grad_ckpt=True),
    dict(model="Qwen3-30B-A3B", mode="train", seq=1024, method="lora"),
]
for c in cases:
    t0 = time.time(); spec = Spec(**c); tr = trace(spec); p = predict(spec)
    ph = tr.peak_phase
    act_t = tr.phases[ph]["activations"]; act_p = p.phases[ph]["activations"]
    print(f"{str(c):95s} peak {tr.peak_allocated_bytes/G:7.2f}/{p.peak_allocated_bytes/G:7.2f} ({tr.peak_allocated_bytes/p.peak_allocated_bytes:.3f}) "
          f"{ph}/{p.peak_phase} act@{ph} {act_t/G:6.3f}/{act_p/G:6.3f} ({act_t/max(act_p,1):.2f}) {time.time()-t0:.0f}s", flush=True)
