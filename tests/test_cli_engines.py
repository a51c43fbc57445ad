"""`vramlab predict --engine` and `vramlab plan --engine`: the engine's own budget, through the CLI."""

import json
import subprocess
import sys

import pytest

from harness.cli import main


def _json(capsys, *argv):
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_vllm_json_carries_the_engine_object(capsys):
    d = _json(capsys, "predict", "--model", "Llama-3.1-8B", "--engine", "vllm", "--gpu", "RTX 4090", "--seq", "8192")
    e = d["engine"]
    for key in ("weights_bytes", "activation_peak_bytes", "non_torch_bytes", "cudagraph_bytes", "kv_cache_bytes",
                "kv_cache_tokens", "num_gpu_blocks", "max_concurrency"):
        assert isinstance(e[key], (int, float)), key
    assert e["kv_cache_tokens"] == e["num_gpu_blocks"] * 16
    assert d["peak_device_bytes"] == e["peak_device_bytes"]
    # fp8 KV halves the bytes per token: about twice the tokens
    f = _json(capsys, "predict", "--model", "Llama-3.1-8B", "--engine", "vllm", "--gpu", "RTX 4090", "--seq", "8192",
              "--kv-dtype", "fp8")["engine"]
    assert f["kv_cache_bytes_per_token"] * 2 == e["kv_cache_bytes_per_token"]
    assert f["kv_cache_tokens"] > 1.9 * e["kv_cache_tokens"]


def test_llamacpp_json_lists_one_entry_per_gpu(capsys):
    e = _json(capsys, "predict", "--model", "Llama-3.1-70B", "--dtype", "q4_k_m", "--engine", "llama.cpp",
              "--gpus", "2", "--ctx", "8192")["engine"]
    assert len(e["model_buffer_bytes"]) == len(e["kv_buffer_bytes"]) == len(e["compute_buffer_bytes"]) == 2
    assert e["host_model_buffer_bytes"] > 0  # token_embd stays in host RAM
    assert e["kv_cells"] >= 8192
    one = _json(capsys, "predict", "--model", "Llama-3.1-70B", "--dtype", "q4_k_m", "--engine", "llama.cpp",
                "--ctx", "8192")["engine"]
    assert sum(e["kv_buffer_bytes"]) == sum(one["kv_buffer_bytes"])


def test_text_prints_the_engines_log_lines(capsys):
    assert main(["predict", "--model", "Llama-3.1-8B", "--engine", "vllm", "--gpu", "RTX 4090"]) == 0
    out = capsys.readouterr().out
    assert "GPU KV cache size:" in out and "Maximum concurrency for" in out
    assert main(["predict", "--model", "Llama-3.1-8B", "--dtype", "q4_k_m", "--engine", "llama.cpp"]) == 0
    out = capsys.readouterr().out
    assert "KV buffer size" in out and "model buffer size" in out and "compute buffer size" in out


@pytest.mark.parametrize("argv,words", [
    (["--engine", "vllm"], "--gpu NAME or --gpu-total"),
    (["--engine", "llama.cpp", "--dtype", "q4_k_m", "--kv-dtype", "fp8"], "--kv-dtype fp8"),
    (["--engine", "vllm", "--gpu", "RTX 4090", "--kv-dtype", "q8_0"], "--kv-dtype q8_0"),
    (["--engine", "llama.cpp", "--dtype", "q4_k_m", "--gpu-layers", "many"], "--gpu-layers many"),
])
def test_bad_engine_input_is_one_line(capsys, argv, words):
    assert main(["predict", "--model", "Llama-3.1-8B", *argv]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1


def test_plan_engine_answers_are_consistent(capsys):
    d = _json(capsys, "plan", "--model", "Llama-3.1-8B", "--engine", "vllm", "--gpu", "RTX 4090", "--users", "8",
              "--ctx", "8192")
    f = d["fewest"]
    assert f["gpus"] >= 1 and f["engine"]["kv_cache_tokens"] >= 8 * 8192
    assert d["most_users"] >= 8 and d["largest_ctx_per_user"] >= 8192
    o = _json(capsys, "plan", "--model", "DeepSeek-R1-Distill-Qwen-32B", "--dtype", "q4_k_m", "--engine", "ollama",
              "--gpu", "RTX 4090", "--users", "1", "--ctx", "2048")
    assert o["fewest"]["gpus"] == 1 and o["fewest"]["peak_device_bytes"] <= o["usable_bytes_per_gpu"]


@pytest.mark.parametrize("engine", ["vllm", "llama.cpp"])
def test_engine_predict_is_fast_and_imports_no_torch(engine):
    """The answer (flags to printed JSON, the engine module imported on first use) in under 0.5 s, the fastest of
    three fresh processes (CI shares two cores), and torch never imported."""
    dtype = "q4_k_m" if engine == "llama.cpp" else "bf16"
    code = ("import sys, time; from harness.cli import main; t = time.perf_counter(); "
            f"rc = main(['predict', '--model', 'Llama-3.1-8B', '--dtype', '{dtype}', '--engine', '{engine}', "
            "'--gpu', 'RTX 4090', '--json']); "
            "assert rc == 0; assert 'torch' not in sys.modules, 'torch imported'; "
            "print('elapsed', time.perf_counter() - t, file=sys.stderr)")
    times = []
    for _ in range(3):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        times.append(float(r.stderr.split("elapsed")[-1]))
    assert min(times) < 0.5, times


@pytest.mark.parametrize("engine", ["vllm", "sglang", "ollama"])
def test_measured_sweeps_of_gpu_engines_are_refused_in_one_line(engine):
    from harness.sweep.schema import SweepError, expand_sweep

    with pytest.raises(SweepError) as e:
        expand_sweep({"name": "x", "defaults": {"model": "Llama-3.1-8B", "engine": engine}}, "x.yaml")
    assert f"engine: '{engine}'" in str(e.value) and "not built" in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------ issue #26 item 9: no silent wrong answers

def test_weights_that_do_not_fit_are_a_failed_start_up_never_fits(capsys):
    """Llama-3.1-70B bf16 on one RTX 4090 used to read 'fits, margin +1.90 GiB' with 0 KV tokens."""
    assert main(["predict", "--model", "Llama-3.1-70B", "--engine", "vllm", "--gpu", "RTX 4090"]) == 0
    out = capsys.readouterr().out
    assert "does not fit" in out and "start-up fails at 'load weights'" in out and "fits, margin" not in out
    d = _json(capsys, "predict", "--model", "Llama-3.1-70B", "--engine", "sglang", "--gpu", "RTX 4090")
    assert d["engine"]["startup"] == {"ok": False, "step": "load weights", "message": d["engine"]["startup"]["message"]}
    assert d["engine"]["max_total_num_tokens"] == 0


def test_kv_below_one_request_is_a_failed_start_up(capsys):
    d = _json(capsys, "predict", "--model", "Llama-3.1-8B", "--engine", "vllm", "--gpu", "RTX 4090",
              "--max-model-len", "131072")
    assert d["engine"]["startup"]["step"] == "allocate KV cache"
    assert "estimated maximum model length" in d["engine"]["startup"]["message"]


def test_max_model_len_auto_prints_the_length_chosen(capsys):
    assert main(["predict", "--model", "Llama-3.1-8B", "--engine", "vllm", "--gpu", "RTX 4090",
                 "--max-model-len", "auto"]) == 0
    out = capsys.readouterr().out
    assert "Auto-fit max_model_len:" in out and "fits, margin" in out


def test_gpt_oss_kv_per_token_is_bf16_on_both_engines(capsys):
    """gpt-oss-20b's config has no torch_dtype: 2 · 8 · 64 · 2 B · 24 layers, not fp32; --model-dtype is honoured."""
    for engine in ("vllm", "sglang"):
        d = _json(capsys, "predict", "--model", "gpt-oss-20b", "--dtype", "mxfp4", "--engine", engine, "--gpu",
                  "H100 SXM")
        assert d["engine"]["kv_cache_bytes_per_token"] == 49152, engine
        f = _json(capsys, "predict", "--model", "gpt-oss-20b", "--dtype", "mxfp4", "--engine", engine, "--gpu",
                  "H100 SXM", "--model-dtype", "float32")
        assert f["engine"]["kv_cache_bytes_per_token"] == 2 * 49152, engine


@pytest.mark.parametrize("argv,words", [
    # --tp must divide the attention heads (Llama-3.1-8B: 32)
    (["--engine", "vllm", "--gpu", "H100 SXM", "--tp", "3"], "--tp 3"),
    (["--engine", "sglang", "--gpu", "H100 SXM", "--tp", "5"], "--tp 5"),
    # numbers out of range
    (["--engine", "vllm", "--gpu", "H100 SXM", "--max-model-len", "-5"], "--max-model-len -5"),
    (["--engine", "vllm", "--gpu", "H100 SXM", "--max-model-len", "1000000000000"], "--max-model-len 1000000000000"),
    (["--engine", "vllm", "--gpu", "H100 SXM", "--max-model-len", "200000"], "--max-model-len 200000"),
    (["--engine", "vllm", "--gpu", "H100 SXM", "--max-num-seqs", "0"], "--max-num-seqs 0"),
    (["--engine", "vllm", "--gpu", "H100 SXM", "--max-num-batched-tokens", "-1"], "--max-num-batched-tokens -1"),
    (["--engine", "vllm", "--gpu-total", "1e30GiB"], "--gpu-total 1e30GiB"),
    (["--engine", "vllm", "--gpu-total=-3GiB"], "--gpu-total -3GiB"),
    (["--engine", "vllm", "--gpu", "H100 SXM", "--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization 1.5"),
    (["--engine", "vllm", "--gpu", "H100 SXM", "--kv-cache-memory", "100GiB"], "--kv-cache-memory 100GiB"),
    (["--engine", "sglang", "--gpu", "H100 SXM", "--max-total-tokens", "-1"], "--max-total-tokens -1"),
    (["--engine", "sglang", "--gpu", "H100 SXM", "--mem-fraction-static", "1"], "--mem-fraction-static 1"),
    (["--engine", "llama.cpp", "--dtype", "q4_k_m", "--ctx", "1000000000000"], "--ctx 1000000000000"),
    # flags of another engine
    (["--engine", "vllm", "--gpu", "H100 SXM", "--ubatch", "256"], "--ubatch: applies to --engine llama.cpp"),
    (["--engine", "vllm", "--gpu", "H100 SXM", "--mem-fraction-static", "0.8"], "--mem-fraction-static: applies"),
    (["--engine", "sglang", "--gpu", "H100 SXM", "--max-num-seqs", "64"], "--max-num-seqs: applies to --engine vllm"),
    (["--engine", "transformers", "--max-num-seqs", "64"], "--max-num-seqs: applies to --engine vllm"),
    (["--engine", "llama.cpp", "--dtype", "q4_k_m", "--enforce-eager"], "--enforce-eager: applies"),
    (["--engine", "vllm", "--gpu", "H100 SXM", "--gpus", "2"], "--gpus 2"),
    (["--engine", "llama.cpp", "--dtype", "q4_k_m", "--tp", "2"], "--tp 2"),
    (["--engine", "vllm", "--gpu", "H100 SXM", "--vllm-version", "0.34.0"], "newer than the newest"),
    (["--engine", "vllm", "--gpu", "H100 SXM", "--vllm-version", "0.11.0", "--vllm-engine", "v0"], "V1 only"),
])
def test_engine_flags_are_checked_in_one_line(capsys, argv, words):
    assert main(["predict", "--model", "Llama-3.1-8B", *argv]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and "does not fit" not in err
