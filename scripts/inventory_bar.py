#!/usr/bin/env python3
"""The general inventory against transformers: 45 popular causal-LM types outside the 13 hand-modelled ones.

Each type's default config (`AutoConfig.for_model(type, num_hidden_layers=4)`) goes through what a
user's config goes through — `vramlab predict --dtype bf16` builds and caches its inventory, then
predicts from it — and the predicted weight and buffer bytes are compared with the model
transformers builds on the meta device in bf16 (`sum(numel × element_size)` over
`model.parameters()` and `model.buffers()`). Prints one line per type and a summary; exit 1 if
fewer than 90% are within 1%.

    python3 scripts/inventory_bar.py            # all 45
    python3 scripts/inventory_bar.py gemma2 jamba
"""

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Chosen before any was run: popular architectures of the last years that transformers ships as causal
# LMs, none of them hand-modelled (formulas/shapes.py FAMILIES).
TYPES = (
    "gemma", "gemma2", "gemma3_text", "phi", "phi3", "phimoe", "gpt_oss", "llama4_text", "qwen3_next",
    "qwen3_5_text", "qwen3_5_moe_text", "falcon", "falcon_h1", "falcon_mamba", "jamba", "nemotron", "nemotron_h",
    "mamba", "mamba2", "glm", "glm4", "glm4_moe", "granite", "granitemoe", "granitemoehybrid", "olmo", "olmo2",
    "olmo3", "olmoe", "cohere", "cohere2", "starcoder2", "ministral", "smollm3", "deepseek_v32", "dbrx", "stablelm",
    "gptj", "gpt_neo", "bloom", "mpt", "exaone4", "ernie4_5_moe", "lfm2", "bamba",
)
TOLERANCE = 0.01
BAR = 0.90


def cut_config(model_type, layers=4):
    """transformers' default config of `model_type` with `layers` decoder layers, as a config.json dict."""
    import transformers

    kw = {"num_hidden_layers": layers}
    if model_type == "gpt_neo":  # its per-layer attention pattern is given as [[pattern, repeats]]
        kw["attention_types"] = [[["global", "local"], layers // 2]]
    cfg = transformers.AutoConfig.for_model(model_type, **kw).to_dict()
    cfg["model_type"] = model_type
    return cfg


def meta_bytes(cfg):
    """(parameter bytes, buffer bytes) of the model transformers builds from cfg on the meta device, in bf16."""
    import torch
    import transformers

    from harness.workload.models import transformers_config

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers_config(cfg), dtype=torch.bfloat16)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return params, buffers


def check(model_type, folder):
    """One row: (type, predicted weights, meta weights, predicted buffers, meta buffers, error or None)."""
    from formulas.catalog import get_shape
    from formulas.predict import predict
    from formulas.spec import Spec
    from harness.inventory import ensure_for_model

    cfg = cut_config(model_type)
    path = os.path.join(folder, f"{model_type}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f)
    ensure_for_model(path)
    get_shape.cache_clear()
    pred = predict(Spec(model=path, dtype="bf16", seq=1, attn="auto"))
    load = pred.phases["load"]
    return load["weights"], load["buffers"], meta_bytes(cfg)


def main(argv):
    types = argv or TYPES
    ok = 0
    with tempfile.TemporaryDirectory() as folder:
        os.environ.setdefault("VRAMLAB_CACHE", os.path.join(folder, "cache"))
        print(f"{'model_type':<18} {'predicted weights':>18} {'meta weights':>16} {'error':>8}  buffers (pred / meta)")
        for mt in types:
            t0 = time.perf_counter()
            try:
                w, b, (mw, mb) = check(mt, folder)
            except Exception as e:  # noqa: BLE001 — a type that fails is a row, not the end of the run
                print(f"{mt:<18} failed: {type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}", flush=True)
                continue
            err = w / mw - 1 if mw else float("inf")
            ok += abs(err) <= TOLERANCE
            print(f"{mt:<18} {w:>18,} {mw:>16,} {err:>+8.3%}  {b:,} / {mb:,}  ({time.perf_counter() - t0:.1f} s)", flush=True)
    share = ok / len(types)
    print(f"{ok} of {len(types)} within {TOLERANCE:.0%} ({share:.0%}; bar {BAR:.0%})")
    return 0 if share >= BAR else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
