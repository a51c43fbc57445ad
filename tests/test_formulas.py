"""Hand-worked values for each memory category (arithmetic written out in the test)."""

import pytest

from formulas.activations import ActContext, layer_saved_per_token
from formulas.catalog import get_shape
from formulas.dtypes import GGML_BLOCKS
from formulas.kv_cache import kv_cache_bytes, kv_cache_bytes_per_token
from formulas.lora import lora_params, resolve_targets
from formulas.predict import predict
from formulas.shapes import shape_from_config
from formulas.spec import Spec
from formulas.training import optimizer_memory
from formulas.weights import weight_storage

L8 = "meta-llama/Llama-3.1-8B"
P8 = 8_030_261_248
# Llama-3.1-8B per layer: q 4096², k,v 1024×4096, o 4096², gate/up/down 14336×4096
LIN_PER_LAYER = 4096 * 4096 * 2 + 1024 * 4096 * 2 + 3 * 14336 * 4096
ROWS_PER_LAYER = 4096 + 1024 + 1024 + 4096 + 14336 + 14336 + 4096  # out_features summed
EMBED = 128256 * 4096
NORMS = 2 * 4096 * 32 + 4096


def test_llama8b_parts_add_up():
    assert LIN_PER_LAYER * 32 + 2 * EMBED + NORMS == P8


@pytest.mark.parametrize("dtype,bpp", [("fp32", 4), ("bf16", 2), ("fp16", 2)])
def test_float_weights(dtype, bpp):
    st = weight_storage(get_shape(L8), dtype)
    assert st.weight_bytes == P8 * bpp and st.quant_state_bytes == 0
    assert st.buffer_bytes == 2 * 64 * 4  # inv_freq + original_inv_freq, fp32, head_dim/2 each


def test_bnb_int8_keeps_lm_head_and_adds_row_scales():
    st = weight_storage(get_shape(L8), "int8")
    assert st.weight_bytes == LIN_PER_LAYER * 32 + 2 * (2 * EMBED + NORMS)
    assert st.quant_state_bytes == ROWS_PER_LAYER * 32 * 4


def test_bnb_nf4_double_quant():
    st = weight_storage(get_shape(L8), "nf4")
    assert st.weight_bytes == LIN_PER_LAYER * 32 // 2 + 2 * (2 * EMBED + NORMS)
    per_layer = 0
    for n in (4096 * 4096, 1024 * 4096, 1024 * 4096, 4096 * 4096, 14336 * 4096, 14336 * 4096, 14336 * 4096):
        blocks = n // 64
        # uint8 absmax, fp32 nested absmax, offset, the NF4 code and the nested dynamic map (fp32 16 and 256)
        per_layer += blocks + -(-blocks // 256) * 4 + 4 + 64 + 1024
    assert st.quant_state_bytes == per_layer * 32
    no_dq = weight_storage(get_shape(L8), "nf4", double_quant=False)
    assert no_dq.quant_state_bytes == (LIN_PER_LAYER // 64 * 4 + 7 * 64) * 32


def test_gptq_int4_group_128():
    st = weight_storage(get_shape(L8), "gptq-int4")
    q = s = 0
    for o, i in ((4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)):
        q += i * o // 2
        s += (i // 128) * (o // 8) * 4 + (i // 128) * o * 2 + i * 4  # qzeros, scales, g_idx
    assert st.weight_bytes == 32 * q + 2 * (2 * EMBED + NORMS)
    assert st.quant_state_bytes == 32 * s


def _bits_per_weight(ggml_type):
    nbytes, n = GGML_BLOCKS[ggml_type]
    return 8 * nbytes / n


def test_gguf_block_sizes():
    assert _bits_per_weight("Q8_0") == 8.5
    assert _bits_per_weight("Q4_K") == 4.5
    assert _bits_per_weight("Q6_K") == 6.5625
    assert _bits_per_weight("Q2_K") == 2.625
    st = weight_storage(get_shape(L8), "q8_0")
    assert st.weight_bytes == (LIN_PER_LAYER * 32 + 2 * EMBED) // 32 * 34 + 4 * NORMS  # 1-D tensors stay F32


def test_fp8_block_scales_deepseek():
    s = get_shape("deepseek-ai/DeepSeek-R1")
    st = weight_storage(s, "fp8")
    # Embedding and lm_head stay bf16; fp32 router; every other matrix 1 byte + fp32 per 128×128 block.
    assert st.weight_bytes < s.n_params * 1.02
    kv_b = next(t for t in s.tensors if t.module == "kv_b_proj")
    assert kv_b.shape == (128 * (128 + 128), 512)


def test_kv_cache_gqa_and_mla():
    assert kv_cache_bytes_per_token(get_shape(L8), 2) == 2 * 8 * 128 * 32 * 2  # 131,072
    assert kv_cache_bytes(get_shape("meta-llama/Llama-2-70b-hf"), 1, 2048, 2) == 2 * 8 * 128 * 80 * 2048 * 2
    r1 = get_shape("deepseek-ai/DeepSeek-R1")
    assert kv_cache_bytes_per_token(r1, 2, "compressed") == (512 + 64) * 61 * 2
    assert kv_cache_bytes_per_token(r1, 2, "expanded") == 128 * (192 + 128) * 61 * 2
    mistral = get_shape("mistralai/Mistral-7B-v0.1")
    assert kv_cache_bytes(mistral, 1, 10_000, 2) == kv_cache_bytes(mistral, 1, 4096, 2)


def test_lora_params_llama8b_r16_qv():
    t = resolve_targets(get_shape(L8), ("q_proj", "v_proj"))
    assert lora_params(t, 16) == 32 * 16 * ((4096 + 4096) + (4096 + 1024))  # 6,815,744


def test_lora_unknown_target_is_named():
    with pytest.raises(ValueError, match="--lora-targets qkv"):
        resolve_targets(get_shape(L8), ("qkv",))


def test_optimizer_states():
    tr = [(1000 * 8192, (1000, 8192), 1), (100, (100,), 3)]
    n = 1000 * 8192 + 300
    m = optimizer_memory(tr, 4, "adamw", "foreach")
    assert (m.state_bytes, m.step_temp_bytes) == (8 * n, 4 * n)
    assert optimizer_memory(tr, 2, "adamw", "fused").state_bytes == 4 * n + 4 * 4  # + fp32 `step` per tensor on the device
    assert optimizer_memory(tr, 2, "adamw", "fused", master=True).master_bytes == 4 * n
    eight = optimizer_memory(tr, 2, "adamw8bit")
    assert eight.state_bytes == 2 * (1000 * 8192 + 4 * (1000 * 8192 // 256)) + 3 * 2 * 4 * 100  # small → fp32
    assert optimizer_memory(tr, 2, "paged_adamw8bit").paged
    assert optimizer_memory(tr, 2, "sgd").state_bytes == 0
    assert optimizer_memory(tr, 2, "sgd_momentum").state_bytes == 2 * n
    assert optimizer_memory(tr, 2, "lion").state_bytes == 4 * n
    assert optimizer_memory(tr, 4, "adafactor").state_bytes == 4 * (1000 + 8192) + 3 * 4 * 100 + 4 * 4  # + RMS scalars
    # A parameter the model pins to fp32 keeps fp32 grads and Adam state in a bf16 model.
    pinned = [(1000 * 8192, (1000, 8192), 1, 2), (256 * 64, (256, 64), 2, 4)]
    assert optimizer_memory(pinned, 2, "adamw", "fused").state_bytes == 2 * (2 * 8_192_000 + 4 * 2 * 16384) + 4 * 3


def _tiny(**over):
    cfg = dict(model_type="llama", hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512, torch_dtype="bfloat16")
    cfg.update(over)
    return shape_from_config(cfg, "tiny")


def test_activation_terms_llama_layer_pure_bf16_sdpa():
    s = _tiny()
    H, I, nH, nKV, hd, b = 64, 176, 4, 2, 16, 2
    ctx = ActContext(b=b, r=b, amp=False, attn="sdpa", linears_trainable=True, norms_trainable=True)
    norms = 2 * (4 * H + 4 + b * H) + 2 * H * b  # fp32 input copy, rsqrt, x·rsqrt cast; the norm outputs
    # q, k, v, out, lse; o_proj's input is a view of the kernel output (laid out like q: (B, S, H, D))
    attn = nH * hd * b + 2 * nKV * hd * b + nH * hd * b + 4 * nH
    mlp = 4 * I * b  # silu input, act, up, down input
    assert layer_saved_per_token(ctx, s, 128) == norms + attn + mlp


def test_activation_eager_adds_quadratic_scores():
    s = _tiny()
    ctx = dict(b=2, r=2, amp=False, linears_trainable=True, norms_trainable=True)
    sdpa = layer_saved_per_token(ActContext(attn="sdpa", **ctx), s, 256)
    eager = layer_saved_per_token(ActContext(attn="eager", **ctx), s, 256)
    # eager adds probs (b) + fp32 softmax (4) per score and repeat_kv copies of k and v (4 heads, not 2);
    # it loses the kernel's saved output and logsumexp (matmul(probs, v)'s output is not saved), and its
    # (B, H, S, D) output makes transpose(1, 2).contiguous() a real copy for o_proj.
    assert eager - sdpa == 4 * 256 * (4 + 2) + 2 * (4 - 2) * 16 * 2 - 4 * 16 * 2 - 4 * 4 + 4 * 16 * 2


def test_lora_saves_less_than_full():
    s = get_shape(L8)
    full = ActContext(b=2, r=2, amp=False, attn="sdpa", linears_trainable=True, norms_trainable=True)
    lora = ActContext(b=2, r=2, amp=False, attn="sdpa", linears_trainable=False, norms_trainable=False,
                      lora={"q_proj": (4096, 4096), "v_proj": (4096, 1024)}, lora_rank=16, lora_x_bytes=4)
    assert layer_saved_per_token(lora, s, 2048) < layer_saved_per_token(full, s, 2048)


def test_inference_prediction_parts():
    p = predict(Spec(model=L8, dtype="bf16", batch=2, seq=1000, gen=24))
    bd = p.phases["decode"]
    assert bd["weights"] == P8 * 2
    assert bd["kv_cache"] == 2 * 1024 * 131_072
    assert p.peak_allocated_bytes == max(sum(v.values()) for v in p.phases.values())
    assert p.peak_device_bytes > p.peak_allocated_bytes


def test_training_full_amp_single_gpu():
    p = predict(Spec(model=L8, mode="train", batch=1, seq=512))
    opt = p.phases["optimizer_step"]
    assert opt["weights"] == 4 * P8  # autocast trains fp32 parameters
    assert opt["gradients"] == 4 * P8
    assert opt["optimizer_states"] == 8 * P8
    assert opt["temporaries"] == 4 * P8  # foreach AdamW: one exp_avg_sq-sized buffer
    assert p.spec.precision == "amp"


def test_training_master_weights_is_16_bytes_per_param():
    p = predict(Spec(model=L8, mode="train", seq=512, precision="master", optimizer_impl="fused"))
    opt = p.phases["optimizer_step"]
    assert opt["weights"] + opt["gradients"] + opt["optimizer_states"] + opt["master_weights"] == 16 * P8


def test_qlora_base_is_nf4_and_adapters_fp32():
    p = predict(Spec(model=L8, mode="train", method="qlora", dtype="bf16", seq=512, kbit_prep=False))
    st = weight_storage(get_shape(L8), "nf4")
    assert p.spec.dtype == "nf4" and p.spec.compute_dtype == "bf16"
    assert p.phases["load"]["weights"] == st.weight_bytes + 6_815_744 * 4
    assert p.phases["load"]["quant_state"] == st.quant_state_bytes


def test_kbit_prep_casts_the_unquantized_weights_to_fp32():
    """peft's prepare_model_for_kbit_training: embeddings, lm_head and the 65 norms of Llama-3.1-8B go from
    bf16 to fp32, about 2 GB more weights; the quantized layers and their state stay as they are."""
    plain = predict(Spec(model=L8, mode="train", method="qlora", seq=512, kbit_prep=False))
    prepped = predict(Spec(model=L8, mode="train", method="qlora", seq=512))  # the default
    unquantized = 2 * 128_256 * 4096 + 65 * 4096
    assert prepped.phases["load"]["weights"] - plain.phases["load"]["weights"] == 2 * unquantized == 2_101_878_784
    assert prepped.phases["load"]["quant_state"] == plain.phases["load"]["quant_state"]
    # the residual stream and every activation become fp32: more activations, fp32 logits
    assert prepped.breakdown["activations"] > plain.breakdown["activations"]
    assert "kbit" in " ".join(prepped.notes)
    lora = Spec(model=L8, mode="train", method="lora", seq=512)  # a float base: nothing to prepare
    assert predict(lora).breakdown == predict(lora.replace(kbit_prep=False)).breakdown


def test_paged_optimizer_not_in_allocated():
    p = predict(Spec(model="Qwen/Qwen2.5-0.5B", mode="train", method="full", optimizer="paged_adamw8bit", seq=256,
                     precision="pure"))
    assert p.peak_device_bytes > p.peak_allocated_bytes + p.breakdown["cuda_context"]
