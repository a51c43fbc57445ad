"""vLLM and SGLang budgets (formulas/engines/vllm.py, sglang.py) against hand-worked values, the engines' sources and
published logs.

Pure: no torch. The published cases live in results/published/engines/vllm.json.
"""

import dataclasses
import importlib.util
import json
import os

import pytest

from formulas.catalog import get_shape, load_config
from formulas.overhead import DEFAULT_OVERHEADS  # noqa: I001
from formulas.engines.sglang import SGLANG_RULES, SglangSettings, predict_sglang, sglang_defaults, sglang_rules
from formulas.engines.sglang import log_lines as sglang_log_lines
from formulas.engines.vllm import (
    VLLM_RULES,
    VllmSettings,
    kv_bytes_per_token_per_gpu,
    kv_layer_groups,
    log_lines,
    parse_version,
    predict_vllm,
    vllm_batch_defaults,
    vllm_cudagraph_sizes,
    vllm_engines,
    vllm_kv_plan,
    vllm_model_dtype,
    vllm_rules,
    vllm_sampler_peak_bytes,
    vllm_weights_bytes,
)
from formulas.units import GiB, MiB

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLISHED = os.path.join(ROOT, "results", "published", "engines", "vllm.json")

# issue #29's bars on the published set
KV_MEDIAN, KV_P90 = 0.05, 0.12
ACTIVATION_MEDIAN = 0.20
CUDAGRAPH_MEDIAN = 0.25
ACTIVATION_TOLERANCE = 0.03  # a published activation peak that the rule reproduces (2 decimals of GiB logged)


def _case(case_id):
    with open(PUBLISHED) as f:
        return next(c for c in json.load(f)["cases"] if c["id"] == case_id)


def _check():
    spec = importlib.util.spec_from_file_location("check_engines", os.path.join(ROOT, "scripts", "check_engines.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _settings(**kw):
    base = dict(gpu_total_bytes=80 * GiB, max_model_len=8192)
    base.update(kw)
    return VllmSettings(**base)


# ------------------------------------------------------------------ versions

def test_every_rule_has_one_row_per_version_and_engine():
    """Each rule has exactly one behaviour for every release and engine modelled, and a source for each row."""
    for version in ("0.2.0", "0.2.5", "0.6.4", "0.6.5", "0.7.3", "0.8.0", "0.9.1", "0.9.2", "0.10.2", "0.11.0",
                    "0.12.0", "0.14.1", "0.19.0", "0.20.0", "0.21.0", "0.21.3"):
        for engine in vllm_engines(version):
            rules = vllm_rules(version, engine)
            v = parse_version(version)
            for rule in {r[3] for r in VLLM_RULES if r[3] != "engines"}:
                rows = [r for r in VLLM_RULES if r[3] == rule and r[2] in (engine, "any")
                        and parse_version(r[0]) <= v and (r[1] is None or v <= parse_version(r[1]))]
                assert len(rows) <= 1, (version, engine, rule)
            assert {"budget", "sampler", "cudagraph_mode", "cudagraphs", "batch_defaults", "log"} <= set(rules)
    assert all(len(r[5]) > 30 for r in VLLM_RULES)


def test_engines_per_release_and_refusals():
    assert vllm_engines("0.6.4") == ("v0",)
    assert vllm_engines("0.9.2") == ("v1", "v0")  # VLLM_USE_V1=0 still works
    assert vllm_engines("0.11.0") == ("v1",)  # V0 removed
    with pytest.raises(ValueError, match="older than the oldest"):
        vllm_rules("0.1.7")
    with pytest.raises(ValueError, match="newer than the newest"):
        vllm_rules("0.34.0")
    with pytest.raises(ValueError, match="runs V1 only"):
        vllm_rules("0.11.0", "v0")
    for bad in ("abc", "5.x", "", "0"):
        with pytest.raises(ValueError, match="give a release"):
            parse_version(bad)
    assert parse_version("0.6.4.post1") == (0, 6, 4) and parse_version("v0.11.0rc2") == (0, 11, 0)


def test_defaults_that_moved():
    """gpu_memory_utilization 0.92 from 0.20.0 (config/cache.py); graph estimate counted from 0.20.0 (envs.py)."""
    assert predict_vllm(get_shape("Llama-3.1-8B"), "bf16", _settings(version="0.19.0"))["gpu_memory_utilization"] == 0.9
    assert predict_vllm(get_shape("Llama-3.1-8B"), "bf16", _settings(version="0.20.0"))["gpu_memory_utilization"] == 0.92
    shape = get_shape("Llama-3.1-8B")
    r19 = predict_vllm(shape, "bf16", _settings(version="0.19.0", gpu_memory_utilization=0.9))
    r20 = predict_vllm(shape, "bf16", _settings(version="0.20.0", gpu_memory_utilization=0.9))
    assert r19["cudagraph_estimate_bytes"] > 0 and not r19["cudagraph_in_budget"]  # logged, not subtracted
    assert r20["cudagraph_in_budget"]
    assert r19["kv_cache_budget_bytes"] - r20["kv_cache_budget_bytes"] == r20["cudagraph_estimate_bytes"]
    eager = predict_vllm(shape, "bf16", _settings(version="0.20.0", gpu_memory_utilization=0.9, enforce_eager=True))
    assert eager["cudagraph_bytes"] == eager["cudagraph_estimate_bytes"] == 0


def test_batch_defaults_by_version_engine_gpu_and_usage():
    mk = lambda **kw: VllmSettings(**{"gpu_total_bytes": 24 * GiB, "max_model_len": 20000, **kw})  # noqa: E731
    assert vllm_batch_defaults(mk(version="0.6.4")) == (256, 20000)  # no chunked prefill at ≤ 32k
    assert vllm_batch_defaults(mk(version="0.6.4", max_model_len=131072)) == (256, 512)
    assert vllm_batch_defaults(mk(version="0.7.2", max_model_len=131072)) == (256, 2048)
    assert vllm_batch_defaults(mk(version="0.9.2", engine="v0", max_model_len=131072)) == (256, 2048)
    assert vllm_batch_defaults(mk(version="0.11.0")) == (256, 2048)
    assert vllm_batch_defaults(mk(version="0.11.0", gpu_total_bytes=80 * GiB)) == (1024, 8192)
    assert vllm_batch_defaults(mk(version="0.11.0", gpu_total_bytes=80 * GiB, gpu_name="A100 80GB")) == (256, 2048)
    assert vllm_batch_defaults(mk(version="0.21.0", usage="llm")) == (256, 8192)


# ------------------------------------------------------------------ dtypes and KV

def test_model_dtype_of_a_config_without_torch_dtype():
    """gpt-oss ships no torch_dtype: vLLM's auto resolves float32 to bf16 (fp16 without bf16); --dtype wins."""
    oss = get_shape("gpt-oss-20b")
    assert oss.config_dtype == "fp32"
    assert vllm_model_dtype(oss) == "bf16"
    assert vllm_model_dtype(oss, gpu_bf16=False) == "fp16"
    assert vllm_model_dtype(oss, "float32") == "fp32"
    assert vllm_model_dtype(get_shape("Llama-3.1-8B"), "float16") == "fp16"


def test_kv_bytes_per_token_gqa_tp_mla_and_gpt_oss_for_both_engines():
    s = get_shape("Llama-3.1-8B")
    assert kv_bytes_per_token_per_gpu(s, "auto") == 2 * 8 * 128 * 32 * 2 == 131072
    assert kv_bytes_per_token_per_gpu(s, "auto", tp=2) == 131072 // 2
    assert kv_bytes_per_token_per_gpu(s, "auto", tp=16) == 2 * 1 * 128 * 32 * 2  # KV heads replicated past 8
    assert kv_bytes_per_token_per_gpu(s, "auto", kv_dtype="fp8") == 131072 // 2
    assert kv_bytes_per_token_per_gpu(get_shape("DeepSeek-V3"), "auto", tp=8) == (512 + 64) * 61 * 2
    # gpt-oss: 2 · 8 KV heads · 64 · 2 bytes per layer, 24 / 36 layers — bf16, not the fp32 a missing torch_dtype reads
    for name, layers in (("gpt-oss-20b", 24), ("gpt-oss-120b", 36)):
        oss = get_shape(name)
        want = 2 * 8 * 64 * 2 * layers
        v = predict_vllm(oss, "mxfp4", _settings(version="0.21.0"))
        g = predict_sglang(oss, "mxfp4", SglangSettings(gpu_total_bytes=80 * GiB))
        assert v["kv_cache_bytes_per_token"] == want == g["kv_cache_bytes_per_token"], name
        f32 = predict_vllm(oss, "mxfp4", _settings(version="0.21.0", dtype="float32"))
        assert f32["kv_cache_bytes_per_token"] == 2 * want


def test_hybrid_groups_gpt_oss_sliding_and_full():
    """12 sliding + 12 full layers → 2 groups of 12, one page of 16 tokens × 2,048 B; num_blocks = budget // page // 12;
    from 0.21 the logged tokens are concurrency × max_model_len (the sliding group holds min(127 + batched, L) tokens)."""
    oss = get_shape("gpt-oss-20b")
    groups = kv_layer_groups(oss, 2, 2)
    assert sorted((g.kind, g.count, g.window) for g in groups) == [("full", 12, 0), ("sliding", 12, 128)]
    budget = 10 * GiB
    plan = vllm_kv_plan(groups, budget, 16, 131072, 8192)
    assert plan.page_bytes == 16 * 2048 and plan.group_size == 12 and len(plan.groups) == 2
    assert plan.num_blocks == budget // (16 * 2048) // 12
    per_request = 131072 // 16 + (-(-(127 + 8192) // 16) + 1)  # full blocks + sliding blocks
    new = predict_vllm(oss, "mxfp4", _settings(version="0.21.0", max_model_len=131072, kv_cache_memory_bytes=budget))
    old = predict_vllm(oss, "mxfp4", _settings(version="0.20.0", max_model_len=131072, kv_cache_memory_bytes=budget))
    assert new["kv_cache_tokens"] == int(plan.num_blocks / per_request * 131072)
    assert old["kv_cache_tokens"] == plan.num_blocks // 2 * 16
    v0 = predict_vllm(oss, "mxfp4", _settings(version="0.9.1", max_model_len=131072, gpu_total_bytes=80 * GiB))
    assert v0["kv_groups"] == [{"kind": "full", "layers": 24, "window": 0}]  # before the hybrid allocator


def test_hybrid_groups_qwen3_next_mamba_pages():
    """Qwen3-Next (tp 1, bf16): gated-delta-net state = conv (128·16·2 + 128·32) · (4 − 1) + 32 · 128 · 128, ×2 B;
    the attention block grows to 16 · ⌈state / (16 · 2,048)⌉ tokens; 12 full + 36 mamba layers → 4 groups of 12."""
    shape = get_shape("Qwen3-Next-80B-A3B-Instruct")
    config = load_config("Qwen3-Next-80B-A3B-Instruct")
    groups = kv_layer_groups(shape, 2, 2, 1, config)
    state = ((128 * 16 * 2 + 128 * 32) * 3 + 32 * 128 * 128) * 2
    assert [g.state_bytes for g in groups if g.kind == "mamba"] == [state]
    plan = vllm_kv_plan(groups, 20 * GiB, 16, 262144, 2048)
    block = 16 * -(-state // (16 * 2048))
    assert plan.block_size == block == 544 and plan.page_bytes == block * 2048
    assert plan.group_size == 12 and len(plan.groups) == 4
    assert plan.num_blocks == 20 * GiB // plan.page_bytes // 12


# ------------------------------------------------------------------ weights, activations, graphs

def test_weights_as_vllm_logs_them():
    """Llama-3.1-8B 'Loading model weights took 14.9888 GB' (vllm#10517); gpt-oss-20b on an A100 (Marlin pads the
    experts to hidden 3072 and intermediate 2944) 'Model loading took 13.72 GiB' (vLLM 0.19, published case)."""
    assert vllm_weights_bytes(get_shape("Llama-3.1-8B"), "bf16", "bf16") / GiB == pytest.approx(14.9888, abs=0.0005)
    oss = vllm_weights_bytes(get_shape("gpt-oss-20b"), "mxfp4", "bf16", 1, "marlin")
    assert oss / GiB == pytest.approx(13.72, abs=0.03)
    assert vllm_weights_bytes(get_shape("gpt-oss-20b"), "mxfp4", "bf16", 1, "triton") < oss


def test_sampler_warmup_per_version():
    """Per element of [rows, vocab]: the sort path (V0, V1 without flashinfer) holds the model-dtype logits, float32
    logits, sort values and int64 indices, and torch's segmented-sort buffers (8 + 12 B from 128 rows); FlashInfer
    float32 logits, masked logits and probabilities; 0.21 adds Triton's per-program rows."""
    s = get_shape("Qwen2.5-7B")
    rows, V = 256, s.vocab
    assert vllm_sampler_peak_bytes(s, "bf16", rows, "sort") == rows * V * (2 + 4 + 4 + 8 + 8 + 12)
    assert vllm_sampler_peak_bytes(s, "bf16", 64, "sort") == 64 * V * (2 + 4 + 4 + 8 + 16 + 12)
    assert vllm_sampler_peak_bytes(s, "bf16", rows, "flashinfer") == rows * V * (2 + 12)
    assert vllm_sampler_peak_bytes(s, "bf16", rows, "flashinfer_then_native") == rows * V * 14 + 128 * V * 4
    v0 = predict_vllm(s, "bf16", _settings(version="0.9.2", engine="v0", gpu_total_bytes=24 * GiB))
    v1 = predict_vllm(s, "bf16", _settings(version="0.11.0", gpu_total_bytes=24 * GiB))
    docker = predict_vllm(s, "bf16", _settings(version="0.11.0", gpu_total_bytes=24 * GiB, sampler="flashinfer"))
    assert v0["sampler"] == v1["sampler"] == "sort" and docker["sampler"] == "flashinfer"
    assert docker["activation_peak_bytes"] < v1["activation_peak_bytes"]


def test_activation_peak_sampler_dominated_published_case():
    """vLLM 0.7.3, a 5.2 GiB Qwen2.5-7B on an 8 GB card: 'PyTorch activation peak memory takes 1.42GiB' at 4,096
    tokens — the forward is 0.5 GiB, the sort sampler on 256 × 152,064 logits the rest (vllm#13882)."""
    check = _check()
    case = _case("vllm-13882-qwen25-7b-awq-4060-fails")
    pred = predict_vllm(check.case_shape(case), case["weight_dtype"], check.vllm_settings(case))
    assert pred["activation_peak_bytes"] / GiB == pytest.approx(1.42, rel=ACTIVATION_TOLERANCE)
    assert pred["forward_peak_bytes"] < pred["sampler_peak_bytes"]
    assert not pred["startup"]["ok"] and pred["startup"]["step"] == "allocate KV cache"


def test_cudagraph_sizes_from_the_source():
    """0.21: 'Profiling CUDA graph memory: PIECEWISE=51 (largest=512), FULL=35 (largest=256)' at 256 seqs (LMCache
    #3430); 0.11: [1, 2, 4] + multiples of 8 to 512; V0: 35 whole-step graphs up to 256."""
    new = vllm_cudagraph_sizes("full_and_piecewise_16", 256, 8192)
    assert (len(new["PIECEWISE"]), new["PIECEWISE"][0], len(new["FULL"]), new["FULL"][0]) == (51, 512, 35, 256)
    old = vllm_cudagraph_sizes("full_and_piecewise_8", 256, 8192)
    assert len(old["PIECEWISE"]) == 67 and old["FULL"][0] == 256
    assert len(vllm_cudagraph_sizes("v0_full", 256, 8192)["V0"]) == 35
    assert vllm_cudagraph_sizes("piecewise", 16, 8192)["PIECEWISE"][0] == 32  # min(2 · seqs, 512)


# ------------------------------------------------------------------ start-up as an answer

def test_startup_failures_name_the_step():
    big = predict_vllm(get_shape("Llama-3.1-70B"), "bf16", _settings(gpu_total_bytes=24 * GiB))
    assert not big["startup"]["ok"] and big["startup"]["step"] == "load weights"
    assert big["kv_cache_tokens"] == 0 and big["num_gpu_blocks"] == 0 and "start-up fails" in log_lines(big)[-1]
    long = predict_vllm(get_shape("Llama-3.1-8B"), "bf16", _settings(gpu_total_bytes=24 * GiB, max_model_len=131072,
                                                                      version="0.21.0"))
    assert long["startup"]["step"] == "allocate KV cache" and "estimated maximum model length" in \
        long["startup"]["message"]
    full = predict_vllm(get_shape("Llama-3.1-8B"), "bf16", _settings(gpu_memory_utilization=1.0))
    assert full["startup"]["step"] == "request memory"  # the CUDA context already holds part of the card
    tight = predict_vllm(get_shape("Llama-3.1-8B"), "bf16",
                         _settings(version="0.11.0", gpu_memory_utilization=0.995, gpu_total_bytes=80 * GiB))
    assert tight["startup"]["step"] in ("capture CUDA graphs", "warm up the sampler", "request memory")
    ok = predict_vllm(get_shape("Llama-3.1-8B"), "bf16", _settings())
    assert ok["startup"]["ok"] and ok["peak_device_bytes"] < 80 * GiB


def test_max_model_len_auto_and_kv_cache_memory():
    shape = get_shape("Llama-3.1-8B")
    auto = predict_vllm(shape, "bf16", _settings(gpu_total_bytes=24 * GiB, max_model_len=-1, version="0.21.0"))
    L = auto["max_model_len"]
    assert auto["startup"]["ok"] and 0 < L < shape.max_positions and auto["max_model_len_auto"]
    assert -(-L // 16) * 16 * 131072 <= auto["kv_cache_budget_bytes"] < (-(-(L + 16) // 16) * 16) * 131072
    assert log_lines(auto)[0] == f"Auto-fit max_model_len: {L:,}"
    with pytest.raises(ValueError, match="no 'auto'"):
        VllmSettings(gpu_total_bytes=GiB, max_model_len=-1, version="0.13.0")
    fixed = predict_vllm(shape, "bf16", _settings(kv_cache_memory_bytes=5 * GiB, version="0.21.0"))
    assert fixed["kv_cache_budget_bytes"] == 5 * GiB and fixed["num_gpu_blocks"] == 5 * GiB // (16 * 131072)
    with pytest.raises(ValueError, match="kv-cache-memory"):
        VllmSettings(gpu_total_bytes=GiB, max_model_len=10, kv_cache_memory_bytes=GiB, version="0.9.2")


def test_settings_validate_fields():
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        VllmSettings(gpu_total_bytes=GiB, max_model_len=10, gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="kv_dtype"):
        VllmSettings(gpu_total_bytes=GiB, max_model_len=10, kv_dtype="int4")
    with pytest.raises(ValueError, match="mem_fraction_static"):
        SglangSettings(gpu_total_bytes=GiB, mem_fraction_static=1.2)


# ------------------------------------------------------------------ SGLang

def test_sglang_rules_cover_every_version_once():
    for version in ("0.4.0", "0.4.6", "0.5.5", "0.5.9", "0.5.10", "0.5.19", "0.5.20", "0.5.23"):
        rules = sglang_rules(version)
        v = parse_version(version)
        for rule in {r[2] for r in SGLANG_RULES}:
            rows = [r for r in SGLANG_RULES if r[2] == rule and parse_version(r[0]) <= v
                    and (r[1] is None or v <= parse_version(r[1]))]
            assert len(rows) == 1, (version, rule)
        assert set(rules) == {"mem_fraction_static", "tiers", "prefill_graphs"}
    with pytest.raises(ValueError, match="modelled are"):
        sglang_rules("0.6.0")


def test_sglang_automatic_mem_fraction_static_hand_worked():
    """0.5.23 on an H100 (81,559 MiB): reserve 512 + 8192·1.5 + 1/8·1024 + 256·2 + 58 prefill sizes · 8 = 13,904 MiB
    → round((81,559 − 13,904) / 81,559, 3); an RTX 4090 (0.5.5 tier 2048 / 24; 0.5.23 4096 / 48); 0.4.6 by TP."""
    shape = get_shape("Llama-3.1-8B")
    h100 = 85520809984
    mfs, chunk, bs, reserved = sglang_defaults(SglangSettings(gpu_total_bytes=h100), shape)
    assert (chunk, bs, reserved) == (8192, 256, 13904) and mfs == round((h100 / MiB - 13904) / (h100 / MiB), 3)
    r4090 = 24 * GiB
    old = sglang_defaults(SglangSettings(gpu_total_bytes=r4090, version="0.5.5"), shape)
    new = sglang_defaults(SglangSettings(gpu_total_bytes=r4090, version="0.5.23"), shape)
    assert old[1:3] == (2048, 24) and new[1:3] == (4096, 48)
    assert old[3] == 512 + 2048 * 1.5 + 1024 / 8 + 24 * 2  # 0.5.5: no prefill graphs yet
    assert sglang_defaults(SglangSettings(gpu_total_bytes=r4090, version="0.4.6", tp=2), shape)[0] == 0.87
    assert sglang_defaults(SglangSettings(gpu_total_bytes=r4090, mem_fraction_static=0.7), shape)[0] == 0.7


def test_sglang_pools_hand_worked():
    """rest = (total − context) · mfs − weights; tokens = rest // cell, capped by --max-total-tokens; gpt-oss splits
    into a full pool and a SWA pool of 0.8 × its tokens; too little memory is SGLang's 'Not enough memory'."""
    shape = get_shape("Llama-3.1-8B")
    s = SglangSettings(gpu_total_bytes=80 * GiB, mem_fraction_static=0.88)
    r = predict_sglang(shape, "bf16", s)
    free = 80 * GiB - DEFAULT_OVERHEADS.cuda_context_bytes
    expected = int(free - vllm_weights_bytes(shape, "bf16", "bf16") - free * (1 - 0.88)) // 131072
    assert r["max_total_num_tokens"] == expected and r["startup"]["ok"]
    assert predict_sglang(shape, "bf16", dataclasses.replace(s, max_total_tokens=1000))["max_total_num_tokens"] == 1000
    oss = predict_sglang(get_shape("gpt-oss-20b"), "mxfp4", s)
    assert oss["swa_max_total_num_tokens"] == int(oss["max_total_num_tokens"] * 0.8)
    assert "Use Sliding window memory pool" in sglang_log_lines(oss)[1]
    starved = predict_sglang(get_shape("Llama-3.1-70B"), "bf16", SglangSettings(gpu_total_bytes=80 * GiB))
    assert not starved["startup"]["ok"] and starved["max_total_num_tokens"] == 0


# ------------------------------------------------------------------ published logs

@pytest.mark.parametrize("case_id", ["vllm-10517-llama31-8b-3090-20k", "vllm-10511-llama3-8b-h100",
                                     "vllm-15815-qwen25-32b-l40s-tp2", "vllm-2031-llama-2-7b-a100-tp1-0.2.5"])
def test_kv_against_published_logs(case_id):
    """Published start-ups one by one, within the issue's p90 bar (each is a real log with its settings)."""
    case = _case(case_id)
    check = _check()
    pred = predict_vllm(check.case_shape(case), case["weight_dtype"], check.vllm_settings(case))
    assert abs(pred["kv_cache_tokens"] / case["published"]["kv_cache_tokens"] - 1) <= KV_P90
    assert pred["max_concurrency"] == round(pred["kv_cache_tokens"] / case["settings"]["max_model_len"], 2)


def test_check_engines_meets_the_bars_and_every_failure_is_predicted():
    """scripts/check_engines.py over the published vLLM set: the issue's bars, and every published start-up failure
    predicted to fail (every published success predicted to start)."""
    check = _check()
    rows = check.check_vllm()
    s = check.summary(rows)
    assert s["kv_cache"]["cases"] >= 10 and s["kv_cache"]["median_abs_error"] <= KV_MEDIAN
    assert s["kv_cache"]["p90_abs_error"] <= KV_P90
    assert s["activation_peak"]["median_abs_error"] <= ACTIVATION_MEDIAN
    # graph memory: every published figure was used to fit a constant — shown, not scored; the fit must hold
    assert s["cudagraph"].get("fitted_only") or s["cudagraph"]["median_abs_error"] <= CUDAGRAPH_MEDIAN
    assert all(abs(r["error"]) <= 0.02 for r in rows if r["metric"] == "cudagraph" and r.get("fit"))
    assert s["startup"]["failures_published"] >= 3
    assert s["startup"]["right"] == s["startup"]["cases"]


def test_docs_print_every_rule_with_its_source():
    """docs/engines.md's version tables are VLLM_RULES and SGLANG_RULES: every row's source is there."""
    with open(os.path.join(ROOT, "docs", "engines.md"), encoding="utf-8") as f:
        doc = f.read()
    for row in VLLM_RULES:
        assert row[5].replace("|", "/") in doc, row[:4]
    for row in SGLANG_RULES:
        assert row[4] in doc, row[:3]
