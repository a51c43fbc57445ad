#!/usr/bin/env python3
"""Build the shipped inventories: one per catalog config whose model type is not hand-modelled.

Each goes to formulas/catalog/inventories/, named by model type, config hash and the transformers
that built it (harness/inventory.py), so `vramlab predict` of those catalog models needs no torch.
Run it again after adding a config or changing transformers; `--check` only says which are missing
or stale (exit 1), as a test does.

    python3 scripts/build_inventories.py            # build what is missing
    python3 scripts/build_inventories.py --rebuild  # build all again
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from formulas.catalog import CONFIG_DIR, INVENTORY_DIR  # noqa: E402
from formulas.shapes import FAMILIES  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rebuild", action="store_true", help="build every inventory again")
    p.add_argument("--check", action="store_true", help="only list missing inventories (exit 1 if any)")
    a = p.parse_args(argv)
    from harness.inventory import ensure_inventory, inventory_path

    missing = 0
    wanted = set()
    for fn in sorted(os.listdir(CONFIG_DIR)):
        if not fn.endswith(".json"):
            continue
        with open(os.path.join(CONFIG_DIR, fn), encoding="utf-8") as f:
            cfg = json.load(f)
        if cfg.get("model_type") in FAMILIES:
            continue
        path = inventory_path(cfg, INVENTORY_DIR)
        wanted.add(os.path.basename(path))
        if a.check:
            if not os.path.isfile(path):
                print(f"missing: {fn} → {os.path.basename(path)}")
                missing += 1
            continue
        t0 = time.perf_counter()
        ensure_inventory(cfg, fn[:-5].replace("--", "/", 1), rebuild=a.rebuild, folder=INVENTORY_DIR)
        print(f"{fn}: {os.path.basename(path)} ({time.perf_counter() - t0:.1f} s)", flush=True)
    if not a.check:
        for fn in sorted(os.listdir(INVENTORY_DIR)):
            if fn.endswith(".json") and fn not in wanted:
                os.remove(os.path.join(INVENTORY_DIR, fn))
                print(f"removed stale {fn}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
