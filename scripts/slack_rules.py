"""Where the slack rules of formulas/overhead.py come from: traced workloads replayed through the allocator simulation.

    python scripts/slack_rules.py generate --out results/allocator/slack_dataset.json   # trace the grid (slow)
    python scripts/slack_rules.py fit results/allocator/slack_dataset.json              # the rules' constants

`generate` traces a grid of float specs on fake tensors (no GPU), replays each allocation stream through
formulas/allocator.py under torch's default settings and under expandable_segments:True, and keeps per phase
the simulated allocated and reserved peaks beside the formula's figures for the same spec (its allocated
peak, transient bytes, KV cache, gradients). `fit` derives the rules' constants from those simulated
figures only — no GPU record is used, so scoring the rules on GPU records is scoring them on data they
never saw.
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MiB = 2**20
CONFIGS = {"default": "", "expandable": "expandable_segments:True"}

INFERENCE_MODELS = ("Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.2-1B", "Qwen/Qwen3-1.7B", "EleutherAI/pythia-410m",
                    "facebook/opt-350m", "openai-community/gpt2-medium", "Qwen/Qwen2.5-1.5B")
TRAIN_MODELS = ("Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.2-1B", "EleutherAI/pythia-410m", "Qwen/Qwen3-0.6B")


def grid():
    """The specs traced: inference prefill + decode at several batch and prompt sizes, in bf16 and fp32; training
    (full, LoRA; with and without checkpointing) at a few batch and sequence sizes."""
    from formulas.spec import Spec

    out = []
    for m in INFERENCE_MODELS:
        for dtype in ("bf16", "fp32"):
            for batch, seq in ((1, 256), (1, 2048), (4, 1024), (8, 2048), (16, 512)):
                out.append(Spec(model=m, dtype=dtype, batch=batch, seq=seq, gen=8))
    for m in TRAIN_MODELS:
        for method in ("full", "lora"):
            for ckpt in (False, True):
                for batch, seq in ((1, 512), (2, 256), (4, 1024)):
                    out.append(Spec(model=m, mode="train", method=method, dtype="bf16", precision="pure",
                                    grad_ckpt=ckpt, batch=batch, seq=seq))
    return out


def features(spec):
    """The formula's figures for a spec: per phase its allocated bytes, transient bytes, KV cache and gradients."""
    from formulas import categories as C
    from formulas.overhead import DEFAULT_OVERHEADS
    from formulas.predict import predict

    p = predict(spec)
    ov = DEFAULT_OVERHEADS
    out = {}
    for ph, bd in p.phases.items():
        out[ph] = {"allocated": sum(bd.values()), "transient": ov.transient(bd), "kv": bd.get(C.KV_CACHE, 0),
                   "gradients": bd.get(C.GRADIENTS, 0), "activations": bd.get(C.ACTIVATIONS, 0)}
    return {"phases": out, "peak_phase": p.peak_phase, "peak_allocated": p.peak_allocated_bytes}


def generate(out_path, limit=None):
    from formulas.allocator import CachingAllocatorModel, parse_alloc_conf
    from harness.tracing.tracer import trace

    rows = []
    if os.path.exists(out_path):
        with open(out_path, encoding="utf-8") as f:
            rows = json.load(f)["rows"]
    done = {r["spec"] for r in rows}
    for spec in grid()[:limit]:
        key = json.dumps(spec.to_dict(), sort_keys=True)
        if key in done:
            continue
        t0 = time.perf_counter()
        try:
            res = trace(spec, keep_stream=True)
        except Exception as e:  # a spec this transformers cannot build on fake tensors: said, not fatal
            print(f"skipped {spec.model} {spec.mode}: {type(e).__name__}: {e}", flush=True)
            continue
        sims = {}
        for name, text in CONFIGS.items():
            sim = CachingAllocatorModel(parse_alloc_conf(text))
            for ev in res.stream:
                if ev[0] == "malloc":
                    sim.malloc(ev[1], ev[2])
                elif ev[0] == "free":
                    sim.free(ev[1])
                else:
                    sim.mark(ev[1])
            sims[name] = {ph: dict(v) for ph, v in sim.stats.phases.items()}
        rows.append({"spec": key, "model": spec.model, "mode": spec.mode, "method": spec.method, "dtype": spec.dtype,
                     "batch": spec.batch, "seq": spec.seq, "grad_ckpt": spec.grad_ckpt, "simulated": sims,
                     "formula": features(spec), "seconds": round(time.perf_counter() - t0, 1)})
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        tmp = out_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"about": __doc__.splitlines()[0], "rows": rows}, f)
        os.replace(tmp, out_path)
        print(f"{len(rows)} {spec.model} {spec.mode} {spec.method} {spec.dtype} b{spec.batch} s{spec.seq} "
              f"ckpt={spec.grad_ckpt} [{rows[-1]['seconds']} s]", flush=True)
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--out", default=os.path.join(ROOT, "results", "allocator", "slack_dataset.json"))
    g.add_argument("--limit", type=int, default=None)
    f = sub.add_parser("fit")
    f.add_argument("dataset")
    a = ap.parse_args(argv)
    if a.cmd == "generate":
        return generate(a.out, a.limit)
    from formulas.overhead import fit_slack_rules

    with open(a.dataset, encoding="utf-8") as fh:
        rows = json.load(fh)["rows"]
    print(json.dumps(fit_slack_rules(rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
