"""vLLM and SGLang budgets (formulas/engines/vllm.py) against hand-worked values and published logs.

Pure: no torch. The published cases live in results/published/engines/vllm.json.
"""

import dataclasses
import importlib.util
import json
import os

import pytest

from formulas.catalog import get_shape
from formulas.engines.vllm import (
    VLLM_RULES,
    SglangSettings,
    VllmSettings,
    kv_bytes_per_token_per_gpu,
    log_lines,
    parse_version,
    predict_sglang,
    predict_vllm,
    vllm_batch_defaults,
    vllm_rules,
    vllm_weights_bytes,
)
from formulas.units import GiB

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLISHED = os.path.join(ROOT, "results", "published", "engines", "vllm.json")

KV_TOKENS_TOLERANCE = 0.10  # issue #14: vLLM KV-cache tokens within 10 %
ACTIVATION_TOLERANCE_GIB = 0.05  # the logged peak is rounded to 0.01 GiB


def _case(case_id):
    with open(PUBLISHED) as f:
        return next(c for c in json.load(f)["cases"] if c["id"] == case_id)


def _load_check_engines():
    spec = importlib.util.spec_from_file_location("check_engines", os.path.join(ROOT, "scripts", "check_engines.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kv_bytes_per_token_gqa_tp_and_mla():
    """Llama-3.1-8B: 2 · 8 heads · 128 · 32 layers · 2 bytes; TP splits heads until one is left; MLA caches one latent."""
    s = get_shape("Llama-3.1-8B")
    assert kv_bytes_per_token_per_gpu(s, "bf16") == 2 * 8 * 128 * 32 * 2 == 131072
    assert kv_bytes_per_token_per_gpu(s, "bf16", tp=2) == 131072 // 2
    assert kv_bytes_per_token_per_gpu(s, "bf16", tp=16) == 2 * 1 * 128 * 32 * 2  # KV heads replicated past 8
    assert kv_bytes_per_token_per_gpu(s, "bf16", kv_dtype="fp8") == 131072 // 2
    v3 = get_shape("DeepSeek-V3")
    assert kv_bytes_per_token_per_gpu(v3, "bf16", tp=8) == (512 + 64) * 61 * 2


def test_weights_include_rotary_cache_as_vllm_logs_them():
    """Llama-3.1-8B: vLLM logs 'Loading model weights took 14.9888 GB' (issue #10517); the rotary cache is in it."""
    assert vllm_weights_bytes(get_shape("Llama-3.1-8B"), "bf16") / GiB == pytest.approx(14.9888, abs=0.0005)


def test_version_rules_cover_every_version_once():
    """Each rule has exactly one behaviour for every release from 0.2.0 on, and the table names a source for each."""
    for version in ("0.2.0", "0.2.4", "0.2.5", "0.5.4", "0.6.4", "0.6.5", "0.7.3", "0.8.0", "0.9.2", "0.11.2",
                    "0.21.0", "0.28.1"):
        rules = vllm_rules(version)
        assert set(rules) == {"budget", "cudagraphs", "batch_defaults", "sampler", "log"}, version
        v = parse_version(version)
        for rule in rules:
            rows = [r for r in VLLM_RULES if r[2] == rule and parse_version(r[0]) <= v
                    and (r[1] is None or v <= parse_version(r[1]))]
            assert len(rows) == 1, (version, rule)
    assert all(len(r[4]) > 20 for r in VLLM_RULES)
    with pytest.raises(ValueError, match="older"):
        vllm_rules("0.1.7")


def test_cudagraphs_enter_the_budget_from_0_21():
    shape = get_shape("Llama-3.1-8B")
    common = dict(gpu_total_bytes=80 * GiB, max_model_len=8192, max_num_seqs=256, max_num_batched_tokens=8192)
    before = predict_vllm(shape, "bf16", VllmSettings(version="0.20.0", **common))
    after = predict_vllm(shape, "bf16", VllmSettings(version="0.21.0", **common))
    eager = predict_vllm(shape, "bf16", VllmSettings(version="0.21.0", enforce_eager=True, **common))
    assert not before["cudagraph_in_budget"] and after["cudagraph_in_budget"]
    assert before["kv_cache_bytes"] - after["kv_cache_bytes"] == after["cudagraph_bytes"] > 0
    assert eager["cudagraph_bytes"] == 0 and eager["kv_cache_bytes"] == before["kv_cache_bytes"]


def test_batch_defaults_by_version_and_gpu():
    mk = lambda **kw: VllmSettings(**{"gpu_total_bytes": 24 * GiB, "max_model_len": 20000, **kw})  # noqa: E731
    assert vllm_batch_defaults(mk(version="0.6.4")) == (256, 20000)  # no chunked prefill at ≤ 32k
    assert vllm_batch_defaults(mk(version="0.6.4", max_model_len=131072)) == (256, 512)
    assert vllm_batch_defaults(mk(version="0.7.2", max_model_len=131072)) == (256, 2048)
    assert vllm_batch_defaults(mk(version="0.11.0")) == (256, 2048)
    assert vllm_batch_defaults(mk(version="0.11.0", gpu_total_bytes=80 * GiB)) == (1024, 8192)
    assert vllm_batch_defaults(mk(version="0.11.0", gpu_total_bytes=80 * GiB, gpu_name="A100 80GB")) == (256, 2048)


def test_activation_peak_matches_logged_peaks_issue_10517():
    """vLLM 0.6.4 on an RTX 3090 logs peak_torch_memory − weights: 2.07 GiB at 20k and 2.99 GiB at 29k tokens.

    These two points fixed _HIDDEN_COPIES_AT_MLP_PEAK (docs/engines.md says so); the test guards the rule from drifting."""
    for case_id, logged in (("vllm-10517-llama31-8b-3090-20k", 17.06 - 14.9888),
                            ("vllm-10517-llama31-8b-3090-29k", 17.98 - 14.9888)):
        case = _case(case_id)
        pred = predict_vllm(get_shape(case["model"]), case["weight_dtype"], _load_check_engines().vllm_settings(case))
        assert pred["activation_peak_bytes"] / GiB == pytest.approx(logged, abs=ACTIVATION_TOLERANCE_GIB)


@pytest.mark.parametrize("case_id", ["vllm-10517-llama31-8b-3090-20k", "vllm-10517-llama31-8b-3090-29k",
                                     "vllm-10511-llama3-8b-h100", "vllm-2031-llama-2-7b-a100-tp1-0.2.5"])
def test_kv_tokens_against_published_logs(case_id):
    """A few published cases, one by one, within the issue's 10 % (each is a real log with its settings)."""
    case = _case(case_id)
    check = _load_check_engines()
    pred = predict_vllm(check.case_shape(case), case["weight_dtype"], check.vllm_settings(case))
    published = case["published"]["kv_cache_tokens"]
    assert abs(pred["kv_cache_tokens"] / published - 1) <= KV_TOKENS_TOLERANCE
    assert pred["num_gpu_blocks"] * 16 == pred["kv_cache_tokens"]
    assert pred["max_concurrency"] == round(pred["kv_cache_tokens"] / case["settings"]["max_model_len"], 2)


def test_check_engines_vllm_median_meets_bar():
    """scripts/check_engines.py over the whole published vLLM set: median |error| of KV tokens ≤ 10 %."""
    check = _load_check_engines()
    rows = check.check_vllm()
    assert len(rows) >= 8
    s = check.summary(rows, check.BARS["vllm"])
    assert s["median_abs_error"] <= KV_TOKENS_TOLERANCE, s


def test_log_lines_render_the_engines_own_lines():
    shape = get_shape("Llama-3.1-8B")
    v1 = predict_vllm(shape, "bf16", VllmSettings(gpu_total_bytes=80 * GiB, max_model_len=32768, version="0.11.0"))
    lines = log_lines(v1)
    assert lines[1] == f"GPU KV cache size: {v1['kv_cache_tokens']:,} tokens"
    assert lines[2] == f"Maximum concurrency for 32,768 tokens per request: {v1['max_concurrency']:.2f}x"
    v0 = predict_vllm(shape, "bf16", VllmSettings(gpu_total_bytes=24 * GiB, max_model_len=8192, version="0.6.4"))
    assert log_lines(v0)[0].startswith(f"# GPU blocks: {v0['num_gpu_blocks']},")
    sg = predict_sglang(shape, "bf16", SglangSettings(gpu_total_bytes=80 * GiB, mem_fraction_static=0.88))
    assert log_lines(sg)[-1] == f"max_total_num_tokens={sg['max_total_num_tokens']}"
    json.dumps(v1), json.dumps(sg)  # JSON-ready


def test_sglang_budget_hand_worked():
    """rest = (total − context) · mfs − weights; tokens = rest // cell; --max-total-tokens caps it."""
    shape = get_shape("Llama-3.1-8B")
    s = SglangSettings(gpu_total_bytes=80 * GiB, mem_fraction_static=0.88)
    r = predict_sglang(shape, "bf16", s)
    free = 80 * GiB - 512 * 2**20
    expected = int(free - vllm_weights_bytes(shape, "bf16") - free * (1 - 0.88)) // 131072
    assert r["max_total_num_tokens"] == expected
    capped = predict_sglang(shape, "bf16", dataclasses.replace(s, max_total_tokens=1000))
    assert capped["max_total_num_tokens"] == 1000
    tp2 = predict_sglang(shape, "bf16", dataclasses.replace(s, tp=2, mem_fraction_static=0))
    assert tp2["mem_fraction_static"] == 0.87 and tp2["max_total_num_tokens"] > r["max_total_num_tokens"]


def test_settings_validate_fields():
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        VllmSettings(gpu_total_bytes=GiB, max_model_len=10, gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="kv_dtype"):
        VllmSettings(gpu_total_bytes=GiB, max_model_len=10, kv_dtype="int4")
    with pytest.raises(ValueError, match="mem_fraction_static"):
        SglangSettings(gpu_total_bytes=GiB, mem_fraction_static=1.2)
