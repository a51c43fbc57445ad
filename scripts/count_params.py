#!/usr/bin/env python3
"""Count the parameters of every model in the config catalog.

For each ``<org>--<repo>.json`` in ``formulas/catalog/configs/`` (or only the
files / stems given on the command line) this script

1. builds the transformers config with the harness's
   ``harness.workload.models.transformers_config`` (``AutoConfig.for_model`` without
   ``quantization_config`` and ``auto_map``),
2. instantiates ``AutoModelForCausalLM.from_config(config)`` on the ``meta``
   device (no memory is allocated for the weights), and
3. prints one TSV line::

       <file stem> \t <model_type> \t <total parameters> \t <seconds to build>

Total parameters are ``sum(p.numel() for p in model.parameters())``; tied
weights (e.g. ``tie_word_embeddings: true``) are therefore counted once, as
``Module.parameters()`` de-duplicates shared tensors.

Usage::

    python3 scripts/count_params.py                       # whole catalog
    python3 scripts/count_params.py gpt2 Qwen--Qwen3-8B   # some entries
    python3 scripts/count_params.py --header > /tmp/param_counts.tsv

Needs ``torch`` and ``transformers`` (tested with torch 2.13 CPU and
transformers 5.x).  Nothing is downloaded: the configs are read from disk.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CATALOG_DIR = REPO_ROOT / "formulas" / "catalog" / "configs"

sys.path.insert(0, str(REPO_ROOT))

# The config → transformers step is the harness's own (quantization_config and auto_map dropped:
# the plain architecture, no FP8 modules, no remote code), so this count is what the tests check.
from harness.workload.models import transformers_config  # noqa: E402


def resolve(names: list[str]) -> list[Path]:
    if not names:
        return sorted(CATALOG_DIR.glob("*.json"))
    out = []
    for n in names:
        p = Path(n)
        if p.suffix == ".json" and p.exists():
            out.append(p)
            continue
        stem = n.replace("/", "--")
        if not stem.endswith(".json"):
            stem += ".json"
        q = CATALOG_DIR / stem
        if not q.exists():
            raise SystemExit(f"no catalog entry for {n!r} ({q})")
        out.append(q)
    return out


def count(path: Path) -> tuple[str, int, float]:
    import torch
    import transformers

    fields = json.loads(path.read_text())
    t0 = time.perf_counter()
    config = transformers_config(fields)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    dt = time.perf_counter() - t0
    del model
    return fields["model_type"], n, dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="catalog stems (org--repo), repo ids (org/repo) or json paths")
    ap.add_argument("--header", action="store_true", help="print a TSV header line first")
    args = ap.parse_args(argv)

    import transformers

    transformers.logging.set_verbosity_error()
    if args.header:
        print("stem\tmodel_type\tparams\tseconds", flush=True)
    failures = 0
    for path in resolve(args.names):
        try:
            model_type, n, dt = count(path)
        except Exception as e:  # keep going, report at the end
            failures += 1
            print(f"{path.stem}\tERROR\t{type(e).__name__}: {e}", file=sys.stderr, flush=True)
            continue
        print(f"{path.stem}\t{model_type}\t{n}\t{dt:.2f}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
