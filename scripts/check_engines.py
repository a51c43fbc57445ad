"""Compare the engine predictors with published engine logs (results/published/engines/).

Prints one line per case and metric (predicted vs published, relative error) and, per metric, the
median, p90 and worst absolute error against the bars: issue #29 for vLLM (KV-cache tokens median
≤ 5 %, p90 ≤ 12 %; activation peak median ≤ 20 %; CUDA-graph memory median ≤ 25 %; a start-up that
ran out of memory predicted to fail), issue #14 for llama.cpp (CUDA compute buffer median ≤ 20 %).

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

from formulas.catalog import get_shape, load_config  # noqa: E402
from formulas.engines.sglang import SglangSettings, predict_sglang  # noqa: E402
from formulas.engines.vllm import VllmSettings, predict_vllm  # noqa: E402
from formulas.hardware import get_hardware  # noqa: E402
from formulas.units import GiB  # noqa: E402

PUBLISHED_DIR = os.path.join(ROOT, "results", "published", "engines")
# metric → (median bar, p90 bar or None); issue #29 (vLLM, SGLang) and #14 (llama.cpp)
BARS = {"vllm": 0.05, "llama.cpp": 0.20}
METRIC_BARS = {"kv_cache": (0.05, 0.12), "activation_peak": (0.20, None), "cudagraph": (0.25, None),
               "max_total_num_tokens": (0.05, 0.12), "compute_buffer_bytes[0]": (0.20, None)}


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


def _gpu(case):
    try:
        return get_hardware(case["gpu"]) if case.get("gpu") else None
    except ValueError:
        return None


def _overheads(case):
    """The uncalibrated device figures of the case's GPU architecture: the catalog's GPU, else the case's
    `compute_capability` (a card the catalog lacks), else the default (sm90)."""
    from formulas.device import compute_capability
    from formulas.overhead import default_overheads

    cc = compute_capability(_gpu(case))
    if cc is None and case.get("compute_capability"):
        cc = tuple(int(x) for x in str(case["compute_capability"]).split("."))
    return default_overheads(cc)


def vllm_settings(case):
    """VllmSettings of a published vLLM case; the GPU total from the log, else from the hardware catalog."""
    s = case["settings"]
    gpu = _gpu(case)
    total = case.get("gpu_total_bytes") or gpu.usable_bytes
    return VllmSettings(gpu_total_bytes=total, max_model_len=s["max_model_len"],
                        gpu_memory_utilization=s.get("gpu_memory_utilization"), max_num_seqs=s.get("max_num_seqs", 0),
                        max_num_batched_tokens=s.get("max_num_batched_tokens", 0), tp=s.get("tp", 1),
                        kv_dtype=s.get("kv_dtype", "auto"), dtype=s.get("dtype", "auto"),
                        block_size=s.get("block_size", 16), enforce_eager=s.get("enforce_eager", False),
                        version=case["version"], engine=s.get("engine"), gpu_name=case.get("gpu") or "",
                        gpu_bf16=s.get("gpu_bf16", True), enable_chunked_prefill=s.get("enable_chunked_prefill"),
                        kv_cache_memory_bytes=s.get("kv_cache_memory_bytes", 0), sampler=s.get("sampler"),
                        usage=s.get("usage", "server"))


def _config(case):
    try:
        return load_config(case["model"])
    except ValueError:
        return None


def _row(case, metric, predicted, published, derived=False):
    return {"id": case["id"], "metric": metric, "predicted": predicted, "published": published,
            "error": predicted / published - 1, "derived": derived}


def check_vllm():
    """Rows {id, metric, predicted, published, error} for every vLLM figure a case publishes, and start-up rows
    {id, metric 'startup', predicted, published} (published outcome: ok, or the step that failed)."""
    rows = []
    for case in load_cases("vllm.json"):
        pred = predict_vllm(case_shape(case), case["weight_dtype"], vllm_settings(case), _overheads(case),
                            config=_config(case))
        pub = case["published"]
        startup = pub.get("startup") or {"ok": True}
        rows.append({"id": case["id"], "metric": "startup", "predicted": pred["startup"],
                     "published": startup, "error": 0.0 if pred["startup"]["ok"] == startup["ok"] else 1.0,
                     "derived": False})
        # the KV cache: the token count where the log gives one, else the memory vLLM sized it from
        if "kv_cache_tokens" in pub:
            rows.append(_row(case, "kv_cache", pred["kv_cache_tokens"], pub["kv_cache_tokens"],
                             bool(pub.get("kv_cache_tokens_derived"))))
        elif pub.get("kv_cache_gib", 0) > 0:
            rows.append(_row(case, "kv_cache", pred["kv_cache_budget_bytes"], round(pub["kv_cache_gib"] * GiB)))
        if "activation_peak_gib" in pub:
            # a V0 worker other than the driver never samples: its logged peak is the forward's
            key = "forward_peak_bytes" if pub.get("activation_rank") == "worker" else "activation_peak_bytes"
            rows.append(_row(case, "activation_peak", pred[key], round(pub["activation_peak_gib"] * GiB)))
        if "cudagraph_gib" in pub:
            key = "cudagraph_estimate_bytes" if pub.get("cudagraph_counter") == "vllm_estimate" else "cudagraph_bytes"
            row = _row(case, "cudagraph", pred[key], round(pub["cudagraph_gib"] * GiB))
            row["fit"] = bool(pub.get("cudagraph_fit"))  # the figure a constant was fitted on: shown, not scored
            rows.append(row)
    return rows


def check_sglang():
    """Rows for SGLang's max_total_num_tokens (and start-up outcomes)."""
    rows = []
    for case in load_cases("sglang.json"):
        s = case["settings"]
        gpu = _gpu(case)
        settings = SglangSettings(gpu_total_bytes=case.get("gpu_total_bytes") or gpu.usable_bytes,
                                  mem_fraction_static=s.get("mem_fraction_static", 0.0),
                                  max_total_tokens=s.get("max_total_tokens", 0), tp=s.get("tp", 1),
                                  kv_dtype=s.get("kv_dtype", "auto"), dtype=s.get("dtype", "auto"),
                                  page_size=s.get("page_size", 1), version=case["version"],
                                  chunked_prefill_size=s.get("chunked_prefill_size", 0),
                                  cuda_graph_max_bs=s.get("cuda_graph_max_bs", 0), model_name=case["model"])
        pred = predict_sglang(case_shape(case), case["weight_dtype"], settings, _overheads(case), config=_config(case))
        pub = case["published"]
        rows.append(_row(case, "max_total_num_tokens", pred["max_total_num_tokens"], pub["max_total_num_tokens"]))
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


def _p90(errs):
    errs = sorted(errs)
    return errs[min(len(errs) - 1, int(round(0.9 * (len(errs) - 1))))]


def summary(rows, bar=None):
    """Per metric: cases, median / p90 / worst absolute relative error and whether the bars are met; start-up rows:
    how many outcomes (starts or fails) were predicted right. `bar` overrides the median bar of a single metric."""
    out = {}
    for metric in sorted({r["metric"] for r in rows}):
        rs = [r for r in rows if r["metric"] == metric and not r.get("fit")]
        if not rs:
            out[metric] = {"cases": 0, "fitted_only": True}
            continue
        if metric == "startup":
            fails = [r for r in rs if not r["published"]["ok"]]
            out[metric] = {"cases": len(rs), "right": sum(r["error"] == 0 for r in rs),
                           "failures_published": len(fails),
                           "failures_predicted": sum(not r["predicted"]["ok"] for r in fails)}
            continue
        errs = [abs(r["error"]) for r in rs]
        worst = max(rs, key=lambda r: abs(r["error"]))
        med_bar, p90_bar = METRIC_BARS.get(metric, (bar, None))
        med_bar = bar if bar is not None and len({r["metric"] for r in rows}) == 1 else med_bar
        med, p90 = statistics.median(errs), _p90(errs)
        out[metric] = {"cases": len(rs), "median_abs_error": med, "p90_abs_error": p90,
                       "worst_abs_error": abs(worst["error"]), "worst_case": worst["id"], "bar": med_bar,
                       "p90_bar": p90_bar, "meets_bar": med <= med_bar and (p90_bar is None or p90 <= p90_bar)}
    if len(out) == 1:  # one metric: the flat form earlier callers read
        return dict(next(iter(out.values())))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=("vllm", "sglang", "llama.cpp", "all"), default="all")
    ap.add_argument("--json", action="store_true", help="print the rows and summaries as JSON")
    args = ap.parse_args(argv)
    out = {}
    if args.engine in ("vllm", "all"):
        rows = check_vllm()
        out["vllm"] = {"rows": rows, "summary": summary(rows), "note": ""}
    if args.engine in ("sglang", "all"):
        rows = check_sglang()
        out["sglang"] = {"rows": rows, "summary": summary(rows) if rows else {},
                         "note": "" if rows else "no published SGLang case with complete settings"}
    if args.engine in ("llama.cpp", "all"):
        rows, why = check_llamacpp()
        out["llama.cpp"] = {"rows": rows, "summary": summary(rows, BARS["llama.cpp"]) if rows else {}, "note": why}
    if args.json:
        print(json.dumps(out, indent=1, default=str))
        return 0
    for engine, res in out.items():
        print(f"== {engine}")
        if res["note"]:
            print(res["note"])
        for r in res["rows"]:
            if r["metric"] == "startup":
                p, q = r["predicted"], r["published"]
                said = lambda x: "starts" if x["ok"] else f"fails at '{x['step']}'"  # noqa: E731
                print(f"  {r['id']:<44} {'startup':<24} predicted {said(p)}; published {said(q)}"
                      + ("" if r["error"] == 0 else "  WRONG"))
                continue
            mark = " (published value derived from the log)" if r["derived"] else ""
            mark += " (the figure the constant was fitted on: not scored)" if r.get("fit") else ""
            print(f"  {r['id']:<44} {r['metric']:<24} predicted {r['predicted']:>14,}  published "
                  f"{r['published']:>14,}  {r['error']:+7.1%}{mark}")
        summ = res["summary"]
        if summ and "cases" in summ:
            summ = {res["rows"][0]["metric"]: summ}
        for metric, s in (summ or {}).items():
            if s.get("fitted_only"):
                print(f"  {metric}: no held-out case (every published figure was used to fit); bar not measurable")
                continue
            if metric == "startup":
                print(f"  startup: {s['right']}/{s['cases']} outcomes right; published failures predicted to fail: "
                      f"{s['failures_predicted']}/{s['failures_published']}")
                continue
            bar = f"median ≤ {s['bar']:.0%}" + (f", p90 ≤ {s['p90_bar']:.0%}" if s["p90_bar"] else "")
            print(f"  {metric}: {s['cases']} cases, median |error| {s['median_abs_error']:.1%}, p90 "
                  f"{s['p90_abs_error']:.1%}, worst {s['worst_abs_error']:.1%} ({s['worst_case']}); bar {bar}: "
                  f"{'met' if s['meets_bar'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
