"""llama.cpp / Ollama buffers: hand-worked numbers (docs/seeds.md), the engine's rules, and — where
llama-cpp-python is installed — the engine's own log on the CPU, to the printed byte."""

import json
import os
import subprocess
import sys
import time

import pytest

from formulas.catalog import get_shape
from formulas.engines.llamacpp import (
    LlamaCppSettings,
    gguf_tensors,
    kv_cells,
    layer_devices,
    log_lines,
    ollama_defaults,
    predict_llamacpp,
)
from formulas.shapes import shape_from_config

QWEN32 = "DeepSeek-R1-Distill-Qwen-32B"
LLAMA70 = "DeepSeek-R1-Distill-Llama-70B"


def _ollama(**kw):
    return LlamaCppSettings(engine="ollama", ollama_version="0.6.6", **kw)


def test_seed_qwen32b_ollama_kv_and_weights():
    """S1.5: Q4_K_M on one GPU, num_ctx 2048 × parallel 1 / 4, f16 KV (docs/seeds.md)."""
    shape = get_shape(QWEN32)
    r1 = predict_llamacpp(shape, "q4_k_m", _ollama(parallel=1))
    assert r1.kv_cells == 2048
    assert r1.kv_buffer_bytes == [536_870_912]
    assert r1.model_buffer_bytes == [19_407_413_248]  # 19,845,357,568 − token_embd on the host
    assert r1.host_model_buffer_bytes == 437_944_320  # 778,567,680 weights × 144 B / 256 (Q4_K)
    r4 = predict_llamacpp(shape, "q4_k_m", _ollama(parallel=4))
    assert (r4.kv_cells, r4.kv_buffer_bytes) == (8192, [2_147_483_648])


def test_seed_llama70b_two_gpus():
    """S1.7: the 70B over 2 cards: 41,921,527,808 B of weights on the GPUs, split 41 / 39 + output."""
    r = predict_llamacpp(get_shape(LLAMA70), "q4_k_m", _ollama(parallel=1, gpus=2))
    assert sum(r.model_buffer_bytes) == 41_921_527_808
    assert r.layers_per_gpu == [41, 39]
    assert sum(r.kv_buffer_bytes) == 671_088_640
    assert r.kv_buffer_bytes == [41 * 8_388_608, 39 * 8_388_608]


def test_default_split_rule():
    """llama-model.cpp: upper_bound of (il − start) / act over the cumulative split; output is layer n_layer."""
    lay, out = layer_devices(4, "all", 2)
    assert lay == [0, 0, 0, 1] and out == 1  # 5 "layers" over 2 equal cards: f = 0, .2, .4 | .6, .8
    lay, out = layer_devices(4, 2, 1)  # -ngl 2: the last repeating layer and the output
    assert lay == [-1, -1, -1, 0] and out == 0
    lay, out = layer_devices(4, 3, 2, tensor_split=(1, 3))  # layers 2, 3 and output: f = 0 | 1/3, 2/3
    assert lay == [-1, -1, 0, 1] and out == 1


def test_kv_padding_and_ollama_defaults():
    assert kv_cells(LlamaCppSettings(ctx=1000))[0] == 1024
    assert kv_cells(LlamaCppSettings(ctx=4096, parallel=4)) == (4096, 1024, 4096)
    assert kv_cells(LlamaCppSettings(engine="ollama", ollama_version="0.6.7"))[0] == 4096
    assert kv_cells(LlamaCppSettings(engine="ollama", ollama_version="0.6.6", parallel=4))[0] == 8192
    assert ollama_defaults("0.6.6")[0] == 2048 and ollama_defaults("0.7.0")[0] == 4096
    with pytest.raises(ValueError, match="ollama_version"):
        ollama_defaults("0.1.0")


def test_quantized_v_needs_flash_attention():
    shape = get_shape(QWEN32)
    with pytest.raises(ValueError, match="flash attention"):
        predict_llamacpp(shape, "q4_k_m", LlamaCppSettings(ctx=4096, kv_dtype="q8_0"))
    r8 = predict_llamacpp(shape, "q4_k_m", LlamaCppSettings(ctx=4096, kv_dtype="q8_0", flash_attn=True))
    r16 = predict_llamacpp(shape, "q4_k_m", LlamaCppSettings(ctx=4096, flash_attn=True))
    assert r8.kv_buffer_bytes[0] * 32 == r16.kv_buffer_bytes[0] * 17  # Q8_0: 34 B per 32 values vs 64 B


def test_bad_input_is_one_clear_error():
    shape = get_shape(QWEN32)
    for kw, word in ((dict(ctx=0), "ctx"), (dict(ctx=512, kv_dtype="q5_1"), "kv_dtype"),
                     (dict(ctx=512, gpu_layers=-1), "gpu_layers"), (dict(ctx=512, engine="vllm"), "engine")):
        with pytest.raises(ValueError, match=word):
            predict_llamacpp(shape, "q4_k_m", LlamaCppSettings(**kw))
    with pytest.raises(ValueError, match="not a GGUF type"):
        predict_llamacpp(shape, "nf4", LlamaCppSettings(ctx=512))


def test_fallback_types_for_rows_not_multiple_of_256():
    """Qwen2.5-0.5B (hidden 896): Q4_K → Q5_0 and Q6_K → Q8_0 (llama-quant.cpp tensor_type_fallback)."""
    types = {name: typ for name, _, typ, _, _ in gguf_tensors(get_shape("Qwen/Qwen2.5-0.5B"), "q4_k_m")}
    assert types["blk.0.attn_q.weight"] == "Q5_0"
    assert types["token_embd.weight"] == "Q8_0"  # tied: takes the output's Q6_K, which falls back
    assert types["blk.0.ffn_down.weight"] == "Q6_K"  # use_more_bits(0, 24); 4864 columns = 19 × 256
    assert types["blk.3.ffn_down.weight"] == "Q4_K"
    assert types["blk.0.attn_norm.weight"] == "F32"


def test_q2_k_attn_v_follows_gqa():
    """llama-quant.cpp: Q2_K gives attn_v Q4_K when n_gqa ≥ 4, else Q3_K."""
    t = {n: ty for n, _, ty, _, _ in gguf_tensors(get_shape("meta-llama/Llama-3.1-8B"), "q2_k")}
    assert t["blk.0.attn_v.weight"] == "Q4_K"


def test_log_lines_format():
    r = predict_llamacpp(get_shape(QWEN32), "q4_k_m", LlamaCppSettings(ctx=1792, flash_attn=True))
    lines = log_lines(r)
    assert "llama_kv_cache:      CUDA0 KV buffer size =   448.00 MiB" in lines  # 1792 cells × 262,144 B
    assert any(ln.startswith("load_tensors:        CUDA0 model buffer size = ") for ln in lines)
    assert any("CUDA0 compute buffer size" in ln for ln in lines)
    json.dumps(r.to_json())
    keys = {"model_buffer_bytes", "compute_buffer_bytes", "host_model_buffer_bytes", "kv_buffer_bytes", "kv_cells"}
    assert keys <= set(r.to_json())


def test_compute_buffer_grows_with_context_without_flash_attention():
    shape = get_shape(QWEN32)
    c = {(fa, ctx): predict_llamacpp(shape, "q4_k_m", LlamaCppSettings(ctx=ctx, flash_attn=fa, device="cpu"))
         .host_compute_buffer_bytes for fa in (False, True) for ctx in (4096, 32768)}
    assert c[(False, 32768)] - c[(False, 4096)] >= 28672 * 512 * 40 * 4  # the f32 scores
    assert c[(True, 32768)] - c[(True, 4096)] < 28672 * 512 * 40 * 4 // 4


def test_predict_is_fast_and_torch_free():
    code = ("import sys, time; t = time.perf_counter(); from formulas.catalog import get_shape; "
            "from formulas.engines.llamacpp import LlamaCppSettings, predict_llamacpp, log_lines; "
            f"r = predict_llamacpp(get_shape('{QWEN32}'), 'q4_k_m', LlamaCppSettings(ctx=8192)); log_lines(r); "
            "print(time.perf_counter() - t, 'torch' in sys.modules)")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert float(out[0]) < 0.5 and out[1] == "False", (out, time.perf_counter() - t0)


# ------------------------------------------------------------------ against the engine itself (CPU)

TINY = {"model_type": "qwen2", "hidden_size": 512, "intermediate_size": 1536, "num_attention_heads": 8,
        "num_key_value_heads": 2, "num_hidden_layers": 4, "vocab_size": 4096, "tie_word_embeddings": False,
        "max_position_embeddings": 4096, "torch_dtype": "bfloat16"}


@pytest.fixture
def engine(tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    monkeypatch.setenv("VRAMLAB_GGUF_CACHE", str(tmp_path))
    from harness.engines import llamacpp

    return llamacpp


@pytest.mark.slow
@pytest.mark.parametrize("dtype,ctx,fa,kv", [("q4_k_m", 1000, False, "f16"), ("q8_0", 2048, True, "f16"),
                                             ("q4_0", 4096, True, "q8_0")])
def test_engine_log_matches_formula(engine, monkeypatch, dtype, ctx, fa, kv):
    shape = shape_from_config(dict(TINY), name="tiny-qwen2")
    monkeypatch.setattr(engine, "cut_shape", lambda model, n: shape)
    m = engine.measure("tiny-qwen2", dtype, LlamaCppSettings(ctx=ctx, flash_attn=fa, kv_dtype=kv, device="cpu"))
    c = m["check"]
    assert c["tensor_bytes_equal"], m["logged_model_size_bytes"]
    assert c["model_buffer_equal"], (m["logged"]["model"], m["predicted"]["host_model_buffer_bytes"])
    assert c["kv_cells_equal"] and c["kv_buffer_equal"], (m["logged"], m["predicted"]["kv_cells"])
    assert c["compute_within_10pct"], (m["logged"]["compute"], m["predicted"]["host_compute_buffer_bytes"])


def test_committed_cpu_measurements_meet_the_bar():
    """results/engines/llamacpp-cpu: llama.cpp's own logs (llama-cpp-python on the CPU), re-predicted by today's
    formula. Model buffer, KV buffer and cells equal (the log prints MiB to two decimals; llama_model_size()
    equals the tensor bytes exactly), CPU compute buffer within 10 %; ≥ 5 architectures × 4 quant types ×
    3 contexts, flash attention on and off."""
    import dataclasses
    import glob

    from formulas.engines.llamacpp import MIB, LlamaCppSettings, gguf_tensors, ggml_row_bytes
    from harness.engines.llamacpp import cut_shape

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = sorted(glob.glob(os.path.join(root, "results", "engines", "llamacpp-cpu", "*.json")))
    seen = set()
    for path in paths:
        with open(path) as f:
            rec = json.load(f)
        assert rec["outcome"] == "ok", path
        e = rec["engine"]
        s = dict(e["settings"])
        s["tensor_split"] = tuple(s["tensor_split"]) if s.get("tensor_split") else None
        fields = {f.name for f in dataclasses.fields(LlamaCppSettings)}
        shape = cut_shape(e["model"], e["n_layers"])
        pred = predict_llamacpp(shape, e["dtype"], LlamaCppSettings(**{k: v for k, v in s.items() if k in fields}))
        logged = e["logged"]
        mib = lambda n: f"{n / MIB:.2f}"  # noqa: E731
        assert mib(pred.host_model_buffer_bytes) == f"{sum(float(v) for v in logged['model'].values()):.2f}", path
        assert mib(pred.host_kv_buffer_bytes) == f"{sum(float(v) for v in logged['KV'].values()):.2f}", path
        assert pred.kv_cells == logged["kv_cells"], path
        assert sum(ggml_row_bytes(t[2], t[3]) * t[4] for t in gguf_tensors(shape, e["dtype"])) == \
            e["logged_model_size_bytes"], path
        compute = sum(float(v) for v in logged["compute"].values()) * MIB
        assert abs(pred.host_compute_buffer_bytes / compute - 1) <= 0.10, path
        seen.add((e["model"], e["dtype"], s["ctx"], s["flash_attn"]))
    models = {m for m, *_ in seen}
    dtypes = {d for _, d, *_ in seen}
    ctxs = {c for _, _, c, _ in seen}
    assert len(models) >= 5 and len(dtypes) >= 4 and len(ctxs) >= 3 and {fa for *_, fa in seen} == {True, False}
