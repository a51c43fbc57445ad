"""The worked examples of ../shared/seeds/ (audited in docs/formulas.md, "The seed documents").

Each test reproduces what a seed gets right, or pins the correct value beside the seed's
wrong one, with the reason in the assertion message. Ids are those of the audit.
"""

import pytest

from formulas.catalog import get_shape
from formulas.kv_cache import kv_cache_bytes, kv_cache_bytes_per_token
from formulas.predict import predict
from formulas.spec import Spec
from formulas.units import GB, GiB
from formulas.weights import weight_storage

L2_70 = "meta-llama/Llama-2-70b-hf"
D_L70 = "deepseek-ai/DeepSeek-R1-Distill-Llama-70B"
D_Q7 = "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
D_Q32 = "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"


def _w(model, dtype):
    st = weight_storage(get_shape(model), dtype)
    return st.weight_bytes + st.quant_state_bytes


def test_S0_6_70b_fp16_weights_is_gib_not_gb():
    w = _w(L2_70, "fp16")
    assert w == 137_953_296_384
    # "70B × 2 bytes = 130 GB" is 128.5 GiB printed as GB: the ×1.86 factor is 2 / 1.0737.
    assert round(w / GiB) == 128 and round(w / GB) == 138


def test_S0_11_kv_cache_needs_gqa():
    kv = kv_cache_bytes(get_shape(L2_70), 1, 2048, 2)
    assert kv == 671_088_640
    seed = 2 * 1 * 80 * 64 * 128 * 2048 * 2  # the seed's formula: 64 heads instead of 8 KV heads
    assert seed == 8 * kv, "the seed ignores grouped-query attention (8 KV heads), 8x too large"


def test_S0_9_adam_states_are_fp32():
    p = predict(Spec(model=L2_70, mode="train", seq=512, precision="master", optimizer_impl="fused"))
    opt = p.phases["optimizer_step"]
    n = get_shape(L2_70).n_params
    assert opt["optimizer_states"] == 551_813_185_536 == 8 * n  # m and v in fp32, not 2 × fp16 weights (260.8 GB)
    assert opt["master_weights"] == 275_906_592_768


def test_S0_13_70b_full_finetune_model_states_alone_exceed_600gb():
    p = predict(Spec(model=L2_70, mode="train", seq=512, batch=32, precision="master", optimizer_impl="fused"))
    opt = p.phases["optimizer_step"]
    states = opt["weights"] + opt["gradients"] + opt["optimizer_states"] + opt["master_weights"]
    assert states == 1_103_626_371_072  # 16 bytes/param; the seed's "≈600 GB" total cannot hold
    assert p.peak_allocated_bytes > 1_400 * GB  # with batch 32 × 512 activations


def test_S0_19_70b_inference_weights_plus_kv():
    p = predict(Spec(model=D_L70, dtype="fp16", batch=1, seq=2048, gen=0))
    assert p.phases["prefill"]["weights"] + p.phases["prefill"]["kv_cache"] == 141_778_501_632


def test_S1_1_32b_fp16_weights():
    assert _w(D_Q32, "fp16") == 65_527_752_704  # "64 GB": real size is 32.76B params


def test_S1_2_32b_q4_k_m_is_not_half_a_byte_per_param():
    w = _w(D_Q32, "q4_k_m")
    assert w == pytest.approx(19_845_357_568, rel=1e-3)
    assert w > 16 * GB * 1.2, "Q4_K_M averages ~4.85 bits/weight, not 4"


@pytest.mark.parametrize("model,file_bytes", [(D_Q7, 4_683_075_271), ("deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", 8_988_112_040)])
def test_S1_2b_q4_k_m_matches_published_gguf_file_sizes(model, file_bytes):
    assert _w(model, "q4_k_m") == pytest.approx(file_bytes, rel=2e-3)  # file adds ~6 MB of metadata


def test_S1_5_32b_q4_on_one_24gb_card_is_plausible():
    # Seed measured 21.1 GB (Ollama, 24 GB card, context 2048). Weights + KV alone come to ~20.4 GB.
    p = predict(Spec(model=D_Q32, dtype="q4_k_m", batch=1, seq=2048, gen=1))
    assert 19 * GB < p.peak_allocated_bytes < 21.1 * GB < p.peak_device_bytes * 1.1


def test_S1_4_deepseek_r1_native_fp8_vs_bf16():
    r1 = get_shape("deepseek-ai/DeepSeek-R1")
    assert _w("deepseek-ai/DeepSeek-R1", "bf16") == 2 * r1.n_params + 2 * 58 * 256 * 7168  # router kept fp32
    assert _w("deepseek-ai/DeepSeek-R1", "fp8") == pytest.approx(r1.n_params, rel=0.02)


def test_S2_2_to_S2_4_bytes_per_param():
    n = get_shape(D_Q7).n_params
    assert _w(D_Q7, "fp32") == 4 * n == 30_462_466_048
    assert _w(D_Q7, "bf16") == 2 * n == 15_231_233_024
    assert _w(D_Q7, "int8") == 8_711_506_944  # LLM.int8 keeps embeddings and lm_head in fp16: not "7 GB", not 3.5


def test_S2_6_kv_cache_omitted_by_seed():
    assert kv_cache_bytes(get_shape("deepseek-ai/DeepSeek-R1-Distill-Llama-8B"), 16, 2048, 2) == 4_294_967_296


def test_S2_9_mixed_precision_adam():
    p = predict(Spec(model=D_Q7, mode="train", seq=512, precision="master", optimizer_impl="fused"))
    opt = p.phases["optimizer_step"]
    assert opt["optimizer_states"] + opt["master_weights"] == 91_387_398_144  # seed: 56 GB


def test_S2_16_lora_keeps_the_frozen_base():
    p = predict(Spec(model=D_Q7, mode="train", method="lora", dtype="bf16", lora_rank=8,
                     lora_targets=("all-linear",), seq=256))
    assert p.phases["load"]["weights"] > 15 * GB, "LoRA shrinks trainable state, not the resident base (seed: 0.14 GB)"


def test_S3_4_concurrent_users_add_kv_not_weights():
    s = get_shape(D_L70)
    one = predict(Spec(model=D_L70, dtype="fp16", batch=1, seq=4096))
    three = predict(Spec(model=D_L70, dtype="fp16", batch=3, seq=4096))
    assert three.phases["prefill"]["weights"] == one.phases["prefill"]["weights"]
    assert kv_cache_bytes(s, 3, 4096, 2) == 4_026_531_840


def test_S3_4b_mla_latent_cache_per_token():
    assert kv_cache_bytes_per_token(get_shape("deepseek-ai/DeepSeek-R1"), 2, "compressed") == 70_272


def test_S3_7a_r1_bf16_does_not_fit_16_a100_80g():
    p = predict(Spec(model="deepseek-ai/DeepSeek-R1", dtype="bf16", gpus=16, tp=16, seq=2048, mla_cache="compressed"))
    assert p.peak_device_bytes * 16 > 16 * 80 * GiB  # 1.34 TB of bf16 weights on 1.37 TB leaves no room


def test_S4_2_llama2_13b_fp16():
    assert _w("meta-llama/Llama-2-13b-hf", "fp16") == 26_031_728_640


def test_S4_3_7b_full_amp_adam_does_not_fit_a100_40g():
    p = predict(Spec(model=D_Q7, mode="train", seq=512))
    assert p.peak_device_bytes > 40 * GiB
    opt = p.phases["optimizer_step"]
    assert opt["weights"] + opt["optimizer_states"] == 12 * get_shape(D_Q7).n_params  # fp32 params + m + v


@pytest.mark.parametrize("model,expected", [(D_L70, 42_512_531_456), (L2_70, 41_422_143_488),
                                            ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", 4_912_898_048)])
def test_q4_k_m_llama_family_including_llama_cpp_70b_rule(model, expected):
    assert _w(model, "q4_k_m") == expected
