"""Compare the engine predictors with published engine logs (results/published/engines/).

Prints one line per case (predicted vs published, relative error) and, per engine, the median
and worst absolute error against the bars of issue #14: vLLM KV-cache tokens within 10 % median,
llama.cpp CUDA compute buffer within 20 % median.

    python scripts/check_engines.py            # all engines
    python scripts/check_engines.py --engine vllm --json

Exit status 0 whatever the errors are: this reports, the tests assert.
"""

import argparse
import dataclasses
import importlib
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from formulas.catalog import get_shape  # noqa: E402
from formulas.engines.vllm import VllmSettings, predict_vllm  # noqa: E402
from formulas.hardware import get_hardware  # noqa: E402

PUBLISHED_DIR = os.path.join(ROOT, "results", "published", "engines")
BARS = {"vllm": 0.10, "llama.cpp": 0.20}  # issue #14: median relative error


def load_cases(engine_file):
    """The cases of one published file ([] when the file is missing)."""
    path = os.path.join(PUBLISHED_DIR, engine_file)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)["cases"]


def case_shape(case):
    """The catalog shape of a case, with the case's shape_overrides (e.g. Llama-3-8B's max positions)."""
    shape = get_shape(case["model"])
    overrides = case.get("shape_overrides") or {}
    return dataclasses.replace(shape, **overrides) if overrides else shape


def vllm_settings(case):
    """VllmSettings of a published vLLM case; the GPU total from the log, else from the hardware catalog."""
    s = case["settings"]
    total = case.get("gpu_total_bytes") or get_hardware(case["gpu"]).usable_bytes
    return VllmSettings(gpu_total_bytes=total, max_model_len=s["max_model_len"],
                        gpu_memory_utilization=s["gpu_memory_utilization"], max_num_seqs=s.get("max_num_seqs", 0),
                        max_num_batched_tokens=s.get("max_num_batched_tokens", 0), tp=s.get("tp", 1),
                        kv_dtype=s.get("kv_dtype", "auto"), block_size=s.get("block_size", 16),
                        enforce_eager=s.get("enforce_eager", False), version=case["version"],
                        gpu_name=case.get("gpu") or "")


def check_vllm():
    """Rows {id, predicted, published, error} for the vLLM KV-cache tokens."""
    rows = []
    for case in load_cases("vllm.json"):
        pred = predict_vllm(case_shape(case), case["weight_dtype"], vllm_settings(case))
        published = case["published"]["kv_cache_tokens"]
        rows.append({"id": case["id"], "metric": "kv_cache_tokens", "predicted": pred["kv_cache_tokens"],
                     "published": published, "error": pred["kv_cache_tokens"] / published - 1,
                     "derived": bool(case["published"].get("kv_cache_tokens_derived"))})
    return rows


def _llamacpp_module():
    try:
        return importlib.import_module("formulas.engines.llamacpp"), ""
    except ImportError as e:
        return None, f"formulas/engines/llamacpp.py is not importable ({e}); llama.cpp cases not checked"


def _llamacpp_settings(mod, case):
    """The llama.cpp helper's settings object, filled from the case by field name (it owns the class)."""
    cls = next((getattr(mod, n) for n in ("LlamaCppSettings", "LlamacppSettings", "LlamaSettings")
                if hasattr(mod, n)), None)
    if cls is None:
        raise LookupError("no LlamaCppSettings class in formulas.engines.llamacpp")
    s = case["settings"]
    aliases = {"n_ctx": ("n_ctx", "ctx"), "n_ubatch": ("n_ubatch", "ubatch"), "n_batch": ("n_batch", "batch"),
               "n_parallel": ("n_parallel", "parallel", "n_seq"), "flash_attn": ("flash_attn",),
               "type_k": ("type_k", "kv_dtype", "cache_type_k"), "type_v": ("type_v", "cache_type_v"),
               "n_gpu_layers": ("n_gpu_layers", "gpu_layers", "ngl")}
    s = dict(s)
    if s.get("kv_pad") == "legacy":  # builds before llama.cpp PR #17046 padded n_ctx to 32 (256 with flash attention)
        s["kv_pad"] = getattr(mod, "KV_PAD_LEGACY_FA" if s.get("flash_attn") else "KV_PAD_LEGACY", None)
        aliases["kv_pad"] = ("kv_pad",)
        s["kv_unified"] = True  # and kept one KV cache that every sequence's graph attends over (no split streams)
        aliases["kv_unified"] = ("kv_unified",)
        s["legacy_layer_start"] = True  # and counted -ngl from n_layer (i_gpu_start = max(n_layer - ngl, 0))
        aliases["legacy_layer_start"] = ("legacy_layer_start",)
    if "tensor_split" in s:
        s["tensor_split"] = tuple(s["tensor_split"])
        aliases["tensor_split"] = ("tensor_split",)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, names in aliases.items():
        for name in names:
            if name in fields and key in s:
                kwargs[name] = s[key]
                break
    if "gpus" in fields:
        kwargs["gpus"] = case.get("gpus", 1)
    return cls(**kwargs)


def check_llamacpp():
    """(rows for the CUDA0 compute buffer, a line saying why nothing was checked or '')."""
    mod, why = _llamacpp_module()
    cases = load_cases("llamacpp.json")
    if mod is None:
        return [], why
    if not hasattr(mod, "predict_llamacpp"):
        return [], "formulas/engines/llamacpp.py has no predict_llamacpp(shape, dtype, settings); llama.cpp cases not checked"
    rows = []
    for case in cases:
        try:
            pred = mod.predict_llamacpp(case_shape(case), case["weight_dtype"], _llamacpp_settings(mod, case))
        except (LookupError, TypeError, ValueError) as e:
            return rows, f"llama.cpp predictor could not take case {case['id']}: {e}"
        pred = pred.to_json() if hasattr(pred, "to_json") else pred
        predicted = pred["compute_buffer_bytes"]
        predicted = predicted[0] if isinstance(predicted, (list, tuple)) else predicted
        published = case["published"]["compute_buffer_bytes"][0]
        rows.append({"id": case["id"], "metric": "compute_buffer_bytes[0]", "predicted": predicted,
                     "published": published, "error": predicted / published - 1, "derived": False})
    return rows, ""


def summary(rows, bar):
    """Median and worst absolute relative error, and whether the median meets the bar."""
    if not rows:
        return {"cases": 0}
    errs = [abs(r["error"]) for r in rows]
    worst = max(rows, key=lambda r: abs(r["error"]))
    return {"cases": len(rows), "median_abs_error": statistics.median(errs), "worst_abs_error": abs(worst["error"]),
            "worst_case": worst["id"], "bar": bar, "meets_bar": statistics.median(errs) <= bar}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=("vllm", "llama.cpp", "all"), default="all")
    ap.add_argument("--json", action="store_true", help="print the rows and summaries as JSON")
    args = ap.parse_args(argv)
    out = {}
    if args.engine in ("vllm", "all"):
        rows = check_vllm()
        out["vllm"] = {"rows": rows, "summary": summary(rows, BARS["vllm"]), "note": ""}
    if args.engine in ("llama.cpp", "all"):
        rows, why = check_llamacpp()
        out["llama.cpp"] = {"rows": rows, "summary": summary(rows, BARS["llama.cpp"]), "note": why}
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    for engine, res in out.items():
        print(f"== {engine}")
        if res["note"]:
            print(res["note"])
        for r in res["rows"]:
            mark = " (published value derived from the log)" if r["derived"] else ""
            print(f"  {r['id']:<44} {r['metric']:<24} predicted {r['predicted']:>12,}  published {r['published']:>12,}"
                  f"  {r['error']:+7.1%}{mark}")
        s = res["summary"]
        if s["cases"]:
            print(f"  {s['cases']} cases: median |error| {s['median_abs_error']:.1%}, worst {s['worst_abs_error']:.1%} "
                  f"({s['worst_case']}); bar {s['bar']:.0%}: {'met' if s['meets_bar'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
