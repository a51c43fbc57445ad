"""Regenerate formulas/engines/gguf_tensor_names.json from gguf-py (the `gguf` package on PyPI).

The file lists, per llama.cpp architecture, the tensor names gguf-py's MODEL_TENSORS allows
(TENSOR_NAMES templates, `{bid}` for the block index). formulas/ reads it as data and never imports gguf.

    pip install gguf==0.19.0 && python scripts/gen_gguf_tables.py
"""

import json
import os

import gguf

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "formulas", "engines",
                   "gguf_tensor_names.json")


def main():
    table = {}
    for arch, name in sorted(gguf.MODEL_ARCH_NAMES.items(), key=lambda kv: kv[1]):
        table[name] = sorted(gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS.get(arch, ()))
    doc = {"source": f"gguf-py {gguf.__version__ if hasattr(gguf, '__version__') else ''}".strip(),
           "generated_by": "scripts/gen_gguf_tables.py", "architectures": table}
    try:
        from importlib.metadata import version
        doc["source"] = f"gguf {version('gguf')} (gguf-py, ggml-org/llama.cpp)"
    except Exception:  # noqa: BLE001 - the version is a label only
        pass
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=0, sort_keys=True)
        f.write("\n")
    print(f"wrote {OUT}: {len(table)} architectures")


if __name__ == "__main__":
    main()
