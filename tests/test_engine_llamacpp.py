"""llama.cpp / Ollama buffers: hand-worked numbers (docs/seeds.md), the engine's rules per architecture, GGUF
headers (local, split, served by a Hub on 127.0.0.1), --fit, Ollama's schedulers, and — where llama-cpp-python
is installed — the engine's own log on the CPU, to the printed byte."""

import glob
import json
import os
import struct
import subprocess
import sys
import time

import pytest

from formulas.catalog import get_shape, load_config
from formulas.engines.convert import CONVERTED_MODEL_TYPES, NOT_CONVERTED, convert_config
from formulas.engines.gguf import GGML_TYPES, GGUFModel, GGUFTensor, NeedMoreBytes, parse_header, split_names
from formulas.engines.llamacpp import (
    MIB,
    LlamaCppSettings,
    cut_config,
    hparams_of,
    kv_cells,
    layer_devices,
    log_lines,
    model_for,
    ollama_defaults,
    predict_llamacpp,
    predict_model,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN32 = "DeepSeek-R1-Distill-Qwen-32B"
LLAMA70 = "DeepSeek-R1-Distill-Llama-70B"


def _ollama(**kw):
    return LlamaCppSettings(engine="ollama", ollama_version="0.6.6", **kw)


def _types(model):
    return {t.name: t.ggml_type for t in model.tensors}


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
    assert sum(r.model_buffer_bytes) == 41_921_527_808 + 2 * 256  # + rope_freqs (Llama 3 scaling) on each card
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
    for kw, word in ((dict(ctx=0), "ctx"), (dict(ctx=512, kv_dtype="q5_k"), "kv_dtype"),
                     (dict(ctx=512, gpu_layers=-1), "gpu_layers"), (dict(ctx=512, engine="vllm"), "engine"),
                     (dict(ctx=512, overrides=(("exps", "CUDA3"),)), "CUDA3"),
                     (dict(ctx=512, overrides=(("exps(", "CPU"),)), "regular expression"),
                     (dict(ctx=512, split_mode="tensor"), "split_mode")):
        with pytest.raises(ValueError, match=word):
            predict_llamacpp(shape, "q4_k_m", LlamaCppSettings(**kw))
    with pytest.raises(ValueError, match="not a llama.cpp file type"):
        predict_llamacpp(shape, "nf4", LlamaCppSettings(ctx=512))


# ------------------------------------------------------------------ llama-quantize's choices

def test_fallback_types_for_rows_not_multiple_of_256():
    """Qwen2.5-0.5B (hidden 896): Q4_K → Q5_0 and Q6_K → Q8_0 (llama-quant.cpp tensor_type_fallback)."""
    types = _types(model_for(load_config("Qwen/Qwen2.5-0.5B"), "q4_k_m"))
    assert types["blk.0.attn_q.weight"] == "Q5_0"
    assert types["token_embd.weight"] == "Q8_0"  # tied: takes the output's Q6_K, which falls back
    assert types["blk.0.ffn_down.weight"] == "Q6_K"  # use_more_bits(0, 24); 4864 columns = 19 × 256
    assert types["blk.3.ffn_down.weight"] == "Q4_K"
    assert types["blk.0.attn_norm.weight"] == "F32"


def test_q2_k_attn_v_follows_gqa():
    """llama-quant.cpp: Q2_K gives attn_v Q4_K when n_gqa ≥ 4, else Q3_K."""
    assert _types(model_for(load_config("meta-llama/Llama-3.1-8B"), "q2_k"))["blk.0.attn_v.weight"] == "Q4_K"
    assert _types(model_for(load_config("Qwen/Qwen2.5-7B"), "q2_k"))["blk.0.attn_v.weight"] == "Q4_K"  # 28/4 = 7


def test_moe_rules_per_ftype():
    """Mixtral (8 experts): attn_v and attn_k Q8_0, attn_output Q5_K; experts follow the base type; the router
    stays F32; MXFP4_MOE: 3-D expert tensors MXFP4, everything else Q8_0."""
    t = _types(model_for(load_config("mistralai/Mixtral-8x7B-v0.1"), "q4_k_m"))
    assert (t["blk.0.attn_v.weight"], t["blk.0.attn_k.weight"], t["blk.0.attn_output.weight"]) == ("Q8_0", "Q8_0", "Q5_K")
    assert t["blk.0.ffn_gate_exps.weight"] == "Q4_K" and t["blk.0.ffn_gate_inp.weight"] == "F32"
    assert t["blk.0.ffn_down_exps.weight"] == "Q6_K"  # use_more_bits(0, 32) read from the name
    t = _types(model_for(load_config("openai/gpt-oss-20b"), "mxfp4_moe"))
    assert t["blk.0.ffn_up_exps.weight"] == "MXFP4" and t["blk.0.attn_q.weight"] == "Q8_0"
    assert t["output.weight"] == "Q8_0" and t["blk.0.attn_sinks.weight"] == "F32"


def test_iq1_s_rules_and_mla_tensors():
    """IQ1_S: token_embd Q2_K, output Q5_K, attn_output IQ2_XXS, the first 1/8 of ffn_down counted Q2_K;
    DeepSeek's MLA k_b / v_b are 3-D and not experts: the base type."""
    t = _types(model_for(load_config("DeepSeek-R1"), "iq1_s"))
    assert t["token_embd.weight"] == "Q2_K" and t["output.weight"] == "Q5_K"
    assert t["blk.0.attn_output.weight"] == "IQ2_XXS"
    assert t["blk.0.ffn_down.weight"] == "Q2_K"  # i_ffn_down 0 < 61 / 8
    assert t["blk.20.ffn_down_exps.weight"] == "IQ1_S"
    assert t["blk.1.attn_k_b.weight"] == "IQ4_NL"  # 128 columns: not whole 256-blocks → tensor_type_fallback
    assert t["blk.1.attn_kv_a_mqa.weight"] == "IQ1_S"  # no category of its own: the base type
    v = _types(model_for(load_config("deepseek-ai/DeepSeek-V2-Lite"), "iq1_s"))
    assert v["blk.0.ffn_down.weight"] == "Q4_0"  # 10,944 columns: Q2_K's 256-blocks do not divide it


# ------------------------------------------------------------------ every architecture vramlab can describe

CAUSAL_TYPES = sorted({load_config(p)["model_type"] for p in glob.glob(os.path.join(ROOT, "formulas", "catalog",
                                                                                     "configs", "*.json"))})


def test_catalog_model_types_converted():
    """≥ 90 % of the catalog's causal-LM model types answer; the rest name what is missing in one line."""
    answered = [mt for mt in CAUSAL_TYPES if mt in CONVERTED_MODEL_TYPES]
    assert len(answered) >= 0.9 * len(CAUSAL_TYPES), (answered, CAUSAL_TYPES)
    assert set(CAUSAL_TYPES) - set(answered) <= set(NOT_CONVERTED)
    for name in ("DeepSeek-R1", "Qwen3-30B-A3B", "gpt-oss-20b", "gpt-oss-120b", "Mixtral-8x7B-v0.1", "pythia-1b"):
        r = predict_llamacpp(load_config(name), "q4_k_m", LlamaCppSettings(ctx=4096))
        assert r.model_buffer_bytes[0] > 0 and r.kv_buffer_bytes[0] > 0
    for path in glob.glob(os.path.join(ROOT, "experiments", "llamacpp_configs", "*.json")):  # Gemma 2/3, GLM-4, Phi-3
        with open(path) as f:
            r = predict_llamacpp(json.load(f), "q4_k_m", LlamaCppSettings(ctx=4096))
        assert r.model_buffer_bytes[0] > 0
    with pytest.raises(ValueError, match="no OPT architecture"):
        predict_llamacpp(load_config("facebook/opt-125m"), "q4_k_m", LlamaCppSettings(ctx=4096))


@pytest.mark.parametrize("name", ["meta-llama/Llama-3.1-8B", "Qwen/Qwen3-30B-A3B", "mistralai/Mixtral-8x7B-v0.1",
                                  "deepseek-ai/DeepSeek-V2-Lite", "openai/gpt-oss-20b", "EleutherAI/pythia-1b",
                                  "openai-community/gpt2", "bigcode/gpt_bigcode-santacoder", "Qwen/Qwen1.5-MoE-A2.7B",
                                  "HuggingFaceTB/SmolLM3-3B", "Qwen/Qwen3.5-27B", "nvidia/Nemotron-H-56B-Base-8K"])
def test_gguf_holds_every_parameter(name):
    """The converted GGUF holds the model's parameters (transformers' count, tested against the meta model in
    test_catalog), less what llama.cpp computes instead of storing: rope_freqs and gpt2's absent lm_head."""
    m = convert_config(load_config(name))
    extra = sum(t.numel for t in m.tensors if t.name.startswith("rope_"))
    # DeepSeek's e_score_correction_bias is a buffer in transformers, a tensor (exp_probs_b) in the GGUF
    buffers = sum(t.total_numel for t in get_shape(name).buffers if "e_score_correction_bias" in t.name)
    assert sum(t.numel for t in m.tensors) - extra - buffers == get_shape(name).n_params


def test_names_are_gguf_pys():
    """Every tensor name is one gguf-py's MODEL_TENSORS allows for the architecture (the committed table,
    scripts/gen_gguf_tables.py)."""
    import re

    with open(os.path.join(ROOT, "formulas", "engines", "gguf_tensor_names.json")) as f:
        table = json.load(f)["architectures"]
    for name in ("DeepSeek-R1", "Qwen3-30B-A3B", "gpt-oss-20b", "Qwen/Qwen3.5-35B-A3B", "nvidia/Nemotron-H-56B-Base-8K",
                 "Qwen/Qwen3-Next-80B-A3B-Instruct", "EleutherAI/pythia-1b"):
        m = convert_config(load_config(name))
        pats = [re.compile("^" + re.escape(a).replace(r"\{bid\}", r"\d+") + r"(\.weight|\.bias)?$")
                for a in table[m.arch]]
        assert all(any(p.match(t.name) for p in pats) for t in m.tensors), m.arch


def test_mla_cache_is_one_compressed_row():
    """DeepSeek-R1 (MLA): one K row of kv_lora_rank + rope = 576 per token per layer, no V (llama-kv-cache.cpp:
    has_v = !is_mla); a GGUF with the unsplit kv_b (no key_length_mla) caches full heads."""
    cfg = load_config("DeepSeek-R1")
    r = predict_llamacpp(cfg, "q4_k_m", LlamaCppSettings(ctx=8192, flash_attn=True))
    assert r.kv_buffer_bytes[0] == 61 * 576 * 2 * 8192
    m = model_for(cfg, "q4_k_m")
    meta = {k: v for k, v in m.metadata.items() if "mla" not in k}
    meta["deepseek2.attention.head_count_kv"] = 128
    meta["deepseek2.attention.key_length"] = 192
    meta["deepseek2.attention.value_length"] = 128
    legacy = GGUFModel(m.arch, meta, m.tensors)
    r = predict_model(legacy, LlamaCppSettings(ctx=8192, flash_attn=True))
    assert r.kv_buffer_bytes[0] == 61 * 128 * (192 + 128) * 2 * 8192


def test_sliding_window_cache_and_swa_full():
    """gpt-oss: even layers slide over 128 tokens: GGML_PAD(min(n_ctx, 128 + n_ubatch), 256) = 768 cells, the odd
    ones keep n_ctx; --swa-full gives every layer n_ctx (llama-kv-cache-iswa.cpp L69-81)."""
    cfg = load_config("openai/gpt-oss-20b")
    per_cell = 2 * 8 * 64 * 2  # K + V, 8 KV heads × 64, f16
    r = predict_llamacpp(cfg, "mxfp4_moe", LlamaCppSettings(ctx=32768, flash_attn=True))
    assert r.swa_cells == 768
    assert r.kv_buffer_bytes[0] == 12 * per_cell * 32768 + 12 * per_cell * 768
    full = predict_llamacpp(cfg, "mxfp4_moe", LlamaCppSettings(ctx=32768, flash_attn=True, swa_full=True))
    assert full.kv_buffer_bytes[0] == 24 * per_cell * 32768


def test_recurrent_states_one_per_sequence():
    """Qwen3.5 (gated delta net every 3 of 4 layers): conv (d_conv − 1) × conv_dim and state head_k² × v_heads
    f32 per sequence per recurrent layer, whatever the context."""
    cfg = load_config("Qwen/Qwen3.5-27B")
    a = predict_llamacpp(cfg, "q4_k_m", LlamaCppSettings(ctx=4096, parallel=2, flash_attn=True))
    b = predict_llamacpp(cfg, "q4_k_m", LlamaCppSettings(ctx=65536, parallel=2, flash_attn=True))
    conv = 3 * (2 * 16 * 128 + 48 * 128)
    state = 128 * 128 * 48
    assert a.rs_buffer_bytes[0] == b.rs_buffer_bytes[0] == 48 * (conv + state) * 4 * 2
    assert b.kv_buffer_bytes[0] == 16 * 2 * 4 * 256 * 2 * 65536  # 16 attention layers, 4 KV heads × 256


def test_placement_flags():
    """--cpu-moe, --n-cpu-moe, -ot and -ngl move exactly the tensors they name; the total is unchanged."""
    cfg = load_config("Qwen/Qwen3-30B-A3B")
    m = model_for(cfg, "q4_k_m")
    base = predict_model(m, LlamaCppSettings(ctx=4096, flash_attn=True))
    exps = sum(t.nbytes for t in m.tensors if "_exps" in t.name)
    moe = predict_model(m, LlamaCppSettings(ctx=4096, flash_attn=True, cpu_moe=True, op_offload=False))
    assert moe.host_model_buffer_bytes - base.host_model_buffer_bytes == exps
    ncm = predict_model(m, LlamaCppSettings(ctx=4096, flash_attn=True, n_cpu_moe=10, op_offload=False))
    first10 = sum(t.nbytes for t in m.tensors if "_exps" in t.name and t.layer < 10)
    assert ncm.host_model_buffer_bytes - base.host_model_buffer_bytes == first10
    two0 = predict_model(m, LlamaCppSettings(ctx=4096, flash_attn=True, gpus=2))
    ot = predict_model(m, LlamaCppSettings(ctx=4096, flash_attn=True, gpus=2, overrides=((r"blk\.[0-3]\.", "CUDA1"),)))
    assert ot.layers_per_gpu == two0.layers_per_gpu == [25, 23]  # -ot moves weights; the layer (its KV) stays
    moved = two0.model_buffer_bytes[0] - ot.model_buffer_bytes[0]
    assert moved == ot.model_buffer_bytes[1] - two0.model_buffer_bytes[1] > 0 and ot.kv_buffer_bytes == two0.kv_buffer_bytes
    two = predict_model(m, LlamaCppSettings(ctx=4096, flash_attn=True, gpus=2, tensor_split=(1, 3)))
    assert two.layers_per_gpu[0] < two.layers_per_gpu[1]
    assert sum(two.model_buffer_bytes) == sum(base.model_buffer_bytes) and sum(two.kv_buffer_bytes) == sum(base.kv_buffer_bytes)


def test_scheduler_copies_on_gpus():
    """ggml-backend's scheduler on GPUs (llama.cpp @0c1e57098): the graph inputs live in the host's compute buffer
    (the KQ mask among them); with op offload a host layer is computed on CUDA0, which holds its cache views and
    one host weight at a time; with several GPUs and every layer on them, 4 copies of each input (pipeline
    parallelism), none with a tensor override."""
    m = model_for(load_config("meta-llama/Llama-3.1-8B"), "q4_k_m")
    s = dict(ctx=32768, flash_attn=False)
    one = predict_model(m, LlamaCppSettings(**s))
    mask = 32768 * 512 * 4
    assert one.host_compute_buffer_bytes > mask
    part = predict_model(m, LlamaCppSettings(gpu_layers=16, **s))
    assert part.host_compute_buffer_bytes < one.host_compute_buffer_bytes + 16 * MIB  # inputs only: CUDA0 computes
    assert part.compute_buffer_bytes[0] > one.compute_buffer_bytes[0]  # + the host caches' views, the weight copy
    slow = predict_model(m, LlamaCppSettings(gpu_layers=16, op_offload=False, **s))
    assert slow.host_compute_buffer_bytes > 32768 * 512 * 32 * 4  # the CPU computes its layers' scores
    two = predict_model(m, LlamaCppSettings(gpus=2, **s))
    assert two.host_compute_buffer_bytes - 4 * mask > 0 and any("pipeline" in n for n in two.notes)
    assert min(two.compute_buffer_bytes) > 4 * mask
    ot = predict_model(m, LlamaCppSettings(gpus=2, overrides=((r"blk\.0\.ffn_up", "CUDA1"),), **s))
    assert not any("pipeline" in n for n in ot.notes) and ot.host_compute_buffer_bytes < 2 * mask


def test_log_lines_format():
    r = predict_llamacpp(get_shape(QWEN32), "q4_k_m", LlamaCppSettings(ctx=1792, flash_attn=True))
    lines = log_lines(r)
    assert "llama_kv_cache:      CUDA0 KV buffer size =   448.00 MiB" in lines  # 1792 cells × 262,144 B
    assert any(ln.startswith("load_tensors:        CUDA0 model buffer size = ") for ln in lines)
    assert any("CUDA0 compute buffer size" in ln for ln in lines)
    json.dumps(r.to_json())


def test_compute_buffer_grows_with_context_without_flash_attention():
    shape = get_shape(QWEN32)
    c = {(fa, ctx): predict_llamacpp(shape, "q4_k_m", LlamaCppSettings(ctx=ctx, flash_attn=fa, device="cpu"))
         .host_compute_buffer_bytes for fa in (False, True) for ctx in (4096, 32768)}
    assert c[(False, 32768)] - c[(False, 4096)] >= 28672 * 512 * 40 * 4  # the f32 scores
    assert c[(True, 32768)] - c[(True, 4096)] < 28672 * 512 * 40 * 4 // 4


def test_predict_is_fast_and_torch_free():
    code = ("import sys, time; t = time.perf_counter(); from formulas.catalog import load_config; "
            "from formulas.engines.llamacpp import LlamaCppSettings, predict_llamacpp, log_lines; "
            "r = predict_llamacpp(load_config('DeepSeek-R1'), 'q4_k_m', LlamaCppSettings(ctx=8192)); log_lines(r); "
            "print(time.process_time(), 'torch' in sys.modules, 'gguf' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()
    assert float(out[0]) < 0.5 and out[1] == "False" and out[2] == "False", out


# ------------------------------------------------------------------ GGUF headers

def _kv(key, value):
    k = key.encode()
    out = struct.pack("<Q", len(k)) + k
    if isinstance(value, str):
        v = value.encode()
        return out + struct.pack("<I", 8) + struct.pack("<Q", len(v)) + v
    if isinstance(value, list):
        return out + struct.pack("<I", 9) + struct.pack("<IQ", 5, len(value)) + struct.pack(f"<{len(value)}i", *value)
    if isinstance(value, float):
        return out + struct.pack("<I", 6) + struct.pack("<f", value)
    return out + struct.pack("<I", 4) + struct.pack("<I", value)


def write_gguf_header(model, split=None):
    """Bytes of a GGUF v3 header for `model` (no data: offsets only), in the layout of ggml/src/gguf.cpp."""
    meta = dict(model.metadata)
    if split:
        meta.update({"split.no": split[0], "split.count": split[1], "split.tensors.count": split[2]})
    head = b"GGUF" + struct.pack("<IQQ", 3, len(model.tensors), len(meta))
    body = b"".join(_kv(k, v) for k, v in meta.items())
    off = 0
    for t in model.tensors:
        n = t.name.encode()
        body += struct.pack("<Q", len(n)) + n + struct.pack("<I", len(t.shape))
        body += b"".join(struct.pack("<Q", d) for d in t.shape)
        body += struct.pack("<IQ", GGML_TYPES[t.ggml_type][0], off)
        off += -(-t.nbytes // 32) * 32
    blob = head + body
    return blob + b"\0" * (-len(blob) % 32)


def test_header_roundtrip_and_short_buffer():
    m = model_for(cut_config(load_config("Qwen/Qwen3-30B-A3B"), 2), "q4_k_m")
    blob = write_gguf_header(m)
    parsed, n = parse_header(blob, "t.gguf")
    assert n == len(blob) and parsed.tensors == m.ordered() or sorted(parsed.tensors, key=lambda t: t.name) == \
        sorted(m.tensors, key=lambda t: t.name)
    with pytest.raises(NeedMoreBytes):
        parse_header(blob[:100])
    with pytest.raises(ValueError, match="not a GGUF"):
        parse_header(b"PK\3\4" + blob[4:])
    s = LlamaCppSettings(ctx=4096, device="cpu")
    assert predict_model(parsed, s).host_model_buffer_bytes == predict_model(m, s).host_model_buffer_bytes


def test_split_files_local(tmp_path):
    """A model split in three (gguf-split: metadata in the first file) reads as one from any of its parts."""
    from harness.engines.gguf_io import read_local

    m = model_for(cut_config(load_config("meta-llama/Llama-3.2-1B"), 3), "q8_0")
    ts = list(m.tensors)
    thirds = [ts[:len(ts) // 3], ts[len(ts) // 3: 2 * len(ts) // 3], ts[2 * len(ts) // 3:]]
    names = split_names(str(tmp_path / "m-00002-of-00003.gguf"))
    for i, (name, part) in enumerate(zip(names, thirds)):
        meta = m.metadata if i == 0 else {}
        with open(name, "wb") as f:
            f.write(write_gguf_header(GGUFModel(m.arch, meta, tuple(part)), split=(i, 3, len(ts))))
    got = read_local(names[1])
    assert got.tensor_bytes == m.tensor_bytes and len(got.tensors) == len(ts) and got.arch == "llama"
    (tmp_path / "m-00003-of-00003.gguf").unlink()
    with pytest.raises(ValueError, match="missing"):
        read_local(names[0])


def test_hub_header_by_range_requests(monkeypatch):
    """A GGUF served by a Hub on 127.0.0.1: the header alone is read (range requests), the prediction equals the
    local file's."""
    pytest.importorskip("huggingface_hub")
    from harness.engines.gguf_io import read_hub
    from tests.hub_fixtures import HubServer

    m = model_for(cut_config(load_config("Qwen/Qwen2.5-0.5B"), 4), "q4_k_m")
    blob = write_gguf_header(m) + b"\0" * (3 << 20)  # the "data": more than the first read
    with HubServer({"org/m-GGUF": {"m-Q4_K_M.gguf": blob}}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        got = read_hub("org/m-GGUF", "m-Q4_K_M.gguf")
        sent = hub.bytes_sent(".gguf")
    assert sent < len(blob) and got.tensor_bytes == m.tensor_bytes
    s = LlamaCppSettings(ctx=2048, device="cpu")
    assert predict_model(got, s).host_model_buffer_bytes == predict_model(m, s).host_model_buffer_bytes


# ------------------------------------------------------------------ --fit and Ollama

GIB = 1 << 30
FREE_4090 = 24 * GIB - 512 * MIB


def test_fit_leaves_a_fitting_model_alone_and_cuts_context_first():
    """common/fit.cpp steps 1-2: a model that fits is unchanged; with -c unset the context drops toward --fit-ctx
    (rounded to 256) before any layer leaves the GPU."""
    from formulas.engines.fit import fit_params

    m = model_for(load_config("Qwen/Qwen3-8B"), "q4_k_m")
    r = fit_params(m, LlamaCppSettings(ctx=4096, flash_attn=True), [FREE_4090])
    assert not r.changed and r.flags() == "-c 4096 -ngl -1"
    r = fit_params(m, LlamaCppSettings(ctx=0, flash_attn=True, parallel=1), [9 * GIB])
    assert r.changed and 4096 <= r.n_ctx < 40960 and r.n_ctx % 256 == 0 and r.n_gpu_layers == -1
    assert r.device_bytes[0] <= 9 * GIB - 1024 * MIB


def test_fit_moe_on_small_cards_moves_experts():
    """A MoE model too big for the card: whole layers, experts of the rest on the CPU (the -ot llama-fit-params
    prints), each device within its margin."""
    from formulas.engines.fit import fit_params

    m = model_for(load_config("Qwen/Qwen3-30B-A3B"), "q4_k_m")
    r = fit_params(m, LlamaCppSettings(ctx=8192, flash_attn=True), [12 * GIB, 8 * GIB])
    assert r.overrides and all(b in ("CPU", "CUDA1") for _, b in r.overrides)
    assert all(d <= f - 1024 * MIB for d, f in zip(r.device_bytes, r.free_bytes))
    assert r.flags().startswith("-c 8192 -ngl 49 -ts ")


@pytest.mark.parametrize("n", [1, 2, 4])
def test_fit_deepseek_r1_ud_iq1_s_on_4090s(n):
    """The issue's bar: R1 at Unsloth's smallest dynamic quant on 1, 2, 4 × RTX 4090 with 192 GiB of host RAM."""
    from formulas.engines.fit import fit_params

    m = model_for(load_config("DeepSeek-R1"), "ud-iq1_s")
    r = fit_params(m, LlamaCppSettings(ctx=0, flash_attn=True), [FREE_4090] * n, host_free_bytes=192 * GIB)
    assert r.n_ctx >= 4096 and r.n_gpu_layers == 62 and any("exps" in p for p, _ in r.overrides)
    assert all(d <= FREE_4090 - 1024 * MIB for d in r.device_bytes)
    assert r.host_bytes < 192 * GIB
    assert len(r.tensor_split) == (n if n > 1 else 0)


def test_ollama_releases():
    from formulas.engines.ollama import OllamaEnv, default_num_ctx, ollama_plan, release

    assert release("0.6.6")[1:] == (2048, 0, False, "estimate") and release("0.9.7")[2] == 1
    assert release("0.33.0")[4] == "fit" and release(None)[4] == "fit"
    env = OllamaEnv()
    assert default_num_ctx("0.33.0", 24 * GIB, env) == 32768 and default_num_ctx("0.33.0", 16 * GIB, env) == 4096
    assert default_num_ctx("0.33.0", 48 * GIB, env, n_ctx_train=40960) == 40960
    m = model_for(load_config(QWEN32), "q4_k_m")
    old = ollama_plan(m, [FREE_4090], [24 * GIB], "0.6.6")
    assert old.scheduler == "estimate" and old.num_ctx == 2048 and old.n_gpu_layers == 65
    new = ollama_plan(m, [FREE_4090], [24 * GIB], "0.33.0")
    assert new.scheduler == "fit" and new.num_ctx == 32768 and new.device_bytes[0] <= FREE_4090 - 1024 * MIB
    spread = ollama_plan(m, [FREE_4090] * 2, [24 * GIB] * 2, "0.33.0", OllamaEnv(sched_spread=True))
    single = ollama_plan(model_for(load_config("Qwen/Qwen3-8B"), "q4_k_m"), [FREE_4090] * 2, [24 * GIB] * 2, "0.33.0")
    assert spread.gpus_used == (0, 1) and single.gpus_used == (0,)
    # the 32B's file + f16 KV is above 80 % of one card's free memory (server/sched.go bestSingleGPUFit): both cards
    assert ollama_plan(m, [FREE_4090] * 2, [24 * GIB] * 2, "0.33.0", num_ctx=2048).gpus_used == (0, 1)
    q8 = ollama_plan(m, [FREE_4090], [24 * GIB], "0.6.6", OllamaEnv(kv_cache_type="q8_0"))
    assert q8.kv_type == "f16"  # needs OLLAMA_FLASH_ATTENTION on the old runner


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
def test_engine_log_matches_formula(engine, dtype, ctx, fa, kv):
    m = engine.measure("tiny-qwen2", dtype, LlamaCppSettings(ctx=ctx, flash_attn=fa, kv_dtype=kv, device="cpu"),
                       config=TINY)
    c = m["check"]
    assert c["tensor_types_equal"] and c["tensor_bytes_equal"], m["logged_model_size_bytes"]
    assert c["model_buffer_equal"], (m["logged"]["model"], m["predicted"]["host_model_buffer_bytes"])
    assert c["kv_cells_equal"] and c["kv_buffer_equal"], (m["logged"], m["predicted"]["kv_cells"])
    assert c["compute_within_10pct"], (m["logged"]["compute"], m["predicted"]["host_compute_buffer_bytes"])


def test_hub_gguf_model_buffer_equals_llama_cpp_log(engine, monkeypatch):
    """The bar: a GGUF header served by a Hub on 127.0.0.1 gives model-buffer bytes equal to llama.cpp's log
    for the same file (a real file quantized by llama.cpp, loaded by it)."""
    pytest.importorskip("huggingface_hub")
    from harness.engines.gguf_io import read_hub
    from tests.hub_fixtures import HubServer

    path = engine.cached_gguf(dict(TINY), "tiny-qwen2", "q4_k_m")
    with open(path, "rb") as f:
        blob = f.read()
    s = LlamaCppSettings(ctx=2048, flash_attn=True, device="cpu")
    log, size = engine.load_and_log(path, s)
    logged = engine.parse_buffers(log)["model"]["CPU"]
    with HubServer({"org/tiny-GGUF": {"tiny-Q4_K_M.gguf": blob}}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        m = read_hub("org/tiny-GGUF", "tiny-Q4_K_M.gguf")
        assert hub.bytes_sent(".gguf") < len(blob)
    r = predict_model(m, s)
    assert f"{r.host_model_buffer_bytes / MIB:.2f}" == logged and r.model_tensor_bytes == size


def test_committed_cpu_measurements_meet_the_bar():
    """results/engines/llamacpp-cpu: llama.cpp's own logs (llama-cpp-python on the CPU), re-predicted by today's
    formula. Model buffer, KV/RS buffers and cells equal (the log prints MiB to two decimals; llama_model_size()
    equals the tensor bytes exactly), the quantizer's types equal, the CPU compute buffer within 10 %;
    ≥ 12 architectures, MoE, MLA, sliding-window and recurrent among them."""
    import dataclasses

    paths = sorted(glob.glob(os.path.join(ROOT, "results", "engines", "llamacpp-cpu", "*.json")))
    archs = set()
    fields = {f.name for f in dataclasses.fields(LlamaCppSettings)}
    for path in paths:
        with open(path) as f:
            rec = json.load(f)
        assert rec["outcome"] == "ok", path
        e = rec["engine"]
        s = dict(e["settings"])
        s["tensor_split"] = tuple(s["tensor_split"]) if s.get("tensor_split") else None
        s["overrides"] = tuple(tuple(o) for o in s.get("overrides") or ())
        settings = LlamaCppSettings(**{k: v for k, v in s.items() if k in fields})
        src = convert_config({k: v for k, v in e["config"].items() if k != "quantization_config"}, "f16", e["model"])
        model = model_for(src, None) if e["dtype"] in ("f16", "stored") else None
        if model is None:
            from formulas.engines.llamacpp import quant_facts
            from formulas.engines.quantize import quantize_model

            model = quantize_model(src, e["dtype"], quant_facts(hparams_of(src)))
        pred = predict_model(model, settings)
        logged = e["logged"]
        total = lambda kind: sum(float(v) for v in logged[kind].values())  # noqa: E731
        assert f"{pred.host_model_buffer_bytes / MIB:.2f}" == f"{total('model'):.2f}", path
        assert abs(pred.host_kv_buffer_bytes / MIB - total("KV")) < 0.0051 * max(1, len(logged["kv_sizes"])), path
        assert f"{pred.host_rs_buffer_bytes / MIB:.2f}" == f"{total('RS'):.2f}", path
        assert pred.kv_cells == logged["kv_cells"], path
        assert pred.model_tensor_bytes == e["logged_model_size_bytes"], path
        assert e["check"]["tensor_types_equal"], path
        # MLA's known gap (docs/engines.md): where the logits are the peak, llama.cpp's gallocr leaves them ~32 MiB
        # higher in its address range than this replay does (−14 % in 4 of 8 DeepSeek-V2-Lite runs)
        tolerance = 0.15 if e["arch"] == "deepseek2" else 0.10
        assert abs(pred.host_compute_buffer_bytes / (total("compute") * MIB) - 1) <= tolerance, path
        archs.add(e["arch"])
    assert len(archs) >= 12, sorted(archs)
    assert {"deepseek2", "gpt-oss", "qwen3moe"} <= archs and archs & {"gemma2", "gemma3"}


# the known compute-buffer gaps of the full-size dry runs (docs/engines.md "Where the replay misses"): where the
# logits are the peak, llama.cpp's gallocr leaves them higher in its address range than the replay does
DRY_RUN_GAPS = {("deepseek2", True): 0.15, ("deepseek2", False): 0.15, ("phi3", True): 0.20}


def test_committed_dry_runs_are_re_predicted():
    """results/engines/llamacpp-dryrun: llama.cpp's own no_alloc dry run (what common/fit.cpp measures with) of
    full-size header-only files, on the CPU — DeepSeek-R1 at 671 B, gpt-oss-120b, Llama-3.1-70B … at 4 k and 32 k
    context, flash attention off and on. Re-predicted by today's formula: the tensor bytes, KV and recurrent
    buffers and cells equal; the compute buffer within 10 % (the documented gaps excepted)."""
    paths = sorted(glob.glob(os.path.join(ROOT, "results", "engines", "llamacpp-dryrun", "*.json")))
    assert len(paths) >= 40
    models, archs = {}, set()
    for path in paths:
        with open(path) as f:
            rec = json.load(f)
        name, dtype = rec["model"], rec["dtype"]
        if (name, dtype) not in models:
            src = os.path.join(ROOT, name) if name.startswith("experiments/") else name
            models[name, dtype] = model_for(load_config(src), dtype, name)
        model = models[name, dtype]
        s = dict(rec["settings"])
        s["overrides"] = tuple(tuple(o) for o in s.get("overrides") or ())
        s["tensor_split"] = tuple(s["tensor_split"]) if s.get("tensor_split") else None
        pred = predict_model(model, LlamaCppSettings(**s))
        logged = rec["logged"]
        assert pred.model_tensor_bytes == logged["model_size_bytes"], path
        assert f"{pred.host_kv_buffer_bytes / MIB:.2f}" == f"{logged['kv_mib']:.2f}", path
        assert f"{pred.host_rs_buffer_bytes / MIB:.2f}" == f"{logged['rs_mib']:.2f}", path
        assert pred.kv_cells == logged["kv_cells"], path
        tolerance = DRY_RUN_GAPS.get((model.arch, rec["settings"]["flash_attn"]), 0.10)
        assert abs(pred.host_compute_buffer_bytes / MIB / logged["compute_mib"] - 1) <= tolerance, path
        archs.add(model.arch)
    assert {"deepseek2", "gpt-oss", "qwen3moe", "qwen35moe", "nemotron_h", "gemma3"} <= archs, sorted(archs)


def test_the_committed_summary_is_what_the_records_say():
    """results/engines/llamacpp-cpu/SUMMARY.md is harness.engines.llamacpp.summarize of the committed records (the
    module's reading of its own records needs no llama.cpp installed)."""
    from harness.engines.llamacpp import summarize

    folder = os.path.join(ROOT, "results", "engines", "llamacpp-cpu")
    table = summarize(folder)
    with open(os.path.join(folder, "SUMMARY.md"), encoding="utf-8") as f:
        committed = f.read()
    assert table.count("\n") > 20 and table.strip() in committed
