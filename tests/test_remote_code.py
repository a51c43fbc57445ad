"""Remote-code configs (Qwen 1.0, ChatGLM2/3 and GLM-4, InternLM2, Baichuan 2) predicted without running their code.

Parameter counts are checked against the sizes the checkpoints themselves declare (the safetensors /
pytorch_model.bin index's metadata.total_size, all bf16/fp16: 2 bytes a parameter, plus the persistent
buffers the checkpoint stores); the family mapping against the transformers-native equivalent the
models' own conversion scripts describe."""

import json
import os
import subprocess
import sys

import pytest

from formulas.catalog import REMOTE_CONFIG_DIR, get_shape, load_config
from formulas.checkpoint import stored_weights
from formulas.predict import predict
from formulas.remote_code import REMOTE_CODE, shape_from_remote_config
from formulas.shapes import UnsupportedModelError, shape_from_config
from formulas.spec import Spec, SpecError
from formulas.weights import weight_storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# metadata.total_size of each checkpoint's index (bytes), from the Hub repos as mirrored on GitHub
# (formulas/catalog/SOURCES.md lists where each was read)
CHECKPOINT_BYTES = {
    "Qwen/Qwen-7B": 15_442_649_088,  # model.safetensors.index.json, bf16
    "Qwen/Qwen-72B": 144_575_840_256,  # mapengAdam/qianwen-72B@3334bfe3 model.safetensors.index.json, bf16
    "internlm/internlm2-chat-7b": 15_475_417_088,  # NanSang2000/S1mpleAgent@4275caa2 model.safetensors.index.json
    "baichuan-inc/Baichuan2-13B-Chat": 27_793_336_320,  # jrd77/Baichuan2-13B-Chat@d022d726 pytorch_model.bin.index.json
    # ChatGLM2-6B's pytorch_model.bin.index.json (fp16): the same module tree and sizes as chatglm3-6b, and the
    # persistent rotary inv_freq (32 fp16 values) stored beside the parameters
    "THUDM/chatglm3-6b": 12_487_168_064,
}


def _persistent_buffer_bytes(shape):
    return 2 * sum(b.numel * b.count for b in shape.buffers if shape.model_type == "chatglm")


@pytest.mark.parametrize("name", sorted(CHECKPOINT_BYTES))
def test_parameters_match_the_checkpoints_size(name):
    shape = get_shape(name)
    assert 2 * shape.n_params + _persistent_buffer_bytes(shape) == CHECKPOINT_BYTES[name]


def test_every_shipped_remote_code_config_is_a_mapped_type():
    names = sorted(fn for fn in os.listdir(REMOTE_CONFIG_DIR) if fn.endswith(".json"))
    assert len(names) == len(CHECKPOINT_BYTES)
    assert {load_config(os.path.join(REMOTE_CONFIG_DIR, n))["model_type"] for n in names} == set(REMOTE_CODE)


def test_qwen_1_is_predicted_from_its_config():
    """The issue's bar: a model_type `qwen` config is predicted (Qwen-7B: 7,721,324,544 parameters)."""
    cfg = load_config("Qwen/Qwen-7B")
    assert cfg["model_type"] == "qwen" and "auto_map" in cfg
    p = predict(Spec(model="Qwen/Qwen-7B", seq=2048, gen=128))
    assert p.n_params == 7_721_324_544
    # KV cache after the 2,048-token prompt: 32 layers × 32 heads × 128 × (K and V) × 2 bytes per token
    assert p.phases["prefill"]["kv_cache"] == 32 * 32 * 128 * 2 * 2 * 2048
    assert any("modeling_qwen.py" in n for n in p.notes)


def test_the_cli_predicts_a_qwen_1_config_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(load_config("Qwen/Qwen-7B")))
    r = subprocess.run([sys.executable, "-m", "harness", "predict", "--model", str(tmp_path), "--json"],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n_params"] == 7_721_324_544


def _as_qwen2(cfg):
    """Qwen 1.0 in Qwen2's terms: biased q/k/v, an unbiased o_proj, no GQA, MLP width intermediate_size / 2."""
    return {"model_type": "qwen2", "hidden_size": cfg["hidden_size"], "num_attention_heads": cfg["num_attention_heads"],
            "num_key_value_heads": cfg["num_attention_heads"], "num_hidden_layers": cfg["num_hidden_layers"],
            "intermediate_size": cfg["intermediate_size"] // 2, "vocab_size": cfg["vocab_size"],
            "max_position_embeddings": cfg["max_position_embeddings"], "tie_word_embeddings": False,
            "torch_dtype": "bfloat16"}


def _as_llama(cfg):
    """InternLM2 in Llama's terms, as InternLM's tools/convert2llama.py converts it (bias → attention_bias)."""
    return {"model_type": "llama", **{k: cfg[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                                           "num_hidden_layers", "intermediate_size", "vocab_size",
                                                           "max_position_embeddings", "tie_word_embeddings")},
            "attention_bias": cfg["bias"], "torch_dtype": "bfloat16"}


@pytest.mark.parametrize("name, native, mlp_remote, mlp_native", [
    ("Qwen/Qwen-7B", _as_qwen2, ("w1", "w2", "h.mlp.c_proj"), ("up_proj", "gate_proj", "down_proj")),
    ("internlm/internlm2-chat-7b", _as_llama, ("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj")),
])
@pytest.mark.parametrize("spec", [
    dict(seq=4096, gen=256, batch=2),
    dict(mode="train", method="full", seq=2048, grad_ckpt=True),
    dict(mode="train", method="qlora", dtype="nf4", seq=2048),
])
def test_same_memory_as_the_native_equivalent(name, native, mlp_remote, mlp_native, spec, tmp_path):
    """Fused q/k/v changes the module names, not the bytes: every category but the buffers (the remote code's own
    rotary and logn tables) equals the transformers-native equivalent's; QLoRA on the MLP's three linears alike."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(native(load_config(name))))
    lora = spec.get("method") == "qlora"
    remote = predict(Spec(model=name, **spec, **({"lora_targets": mlp_remote} if lora else {})))
    plain = predict(Spec(model=str(path), **spec, **({"lora_targets": mlp_native} if lora else {})))
    assert remote.n_params == plain.n_params
    for cat in ("weights", "gradients", "optimizer_states", "kv_cache", "logits", "activations"):
        assert remote.breakdown[cat] == plain.breakdown[cat], cat
    # bitsandbytes keeps a few constants per quantized tensor (its code, the nested absmax's): one fused wqkv holds
    # one set where q, k and v hold three
    assert remote.breakdown["quant_state"] == pytest.approx(plain.breakdown["quant_state"], rel=1e-3)
    assert remote.breakdown["buffers"] > plain.breakdown["buffers"]


def test_lora_on_a_fused_projection_is_one_adapter():
    """LoRA on Qwen's c_attn is one adapter of rank r on a (3·4096 × 4096) linear: r·(4096 + 12288) per layer."""
    p = predict(Spec(model="Qwen/Qwen-7B", mode="train", method="lora", lora_targets=("c_attn",), lora_rank=8))
    assert any(f"{32 * 8 * (4096 + 3 * 4096):,} trainable" in n for n in p.notes), p.notes


def test_peft_defaults_or_one_line():
    """peft maps chatglm to query_key_value; it has no default for qwen, so the user is asked for targets."""
    assert predict(Spec(model="THUDM/chatglm3-6b", mode="train", method="lora")).n_params == 6_243_584_000
    with pytest.raises(SpecError, match=r"--lora-targets: peft has no default LoRA targets for qwen.*c_attn"):
        predict(Spec(model="Qwen/Qwen-7B", mode="train", method="lora"))


GLM4_9B_CHAT = {  # THUDM/glm-4-9b-chat config.json's dimension fields
    "model_type": "chatglm", "auto_map": {"AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
    "add_bias_linear": False, "add_qkv_bias": True, "ffn_hidden_size": 13696, "hidden_size": 4096, "kv_channels": 128,
    "multi_query_attention": True, "multi_query_group_num": 2, "num_attention_heads": 32, "num_layers": 40,
    "padded_vocab_size": 151552, "post_layer_norm": True, "rmsnorm": True, "rope_ratio": 500, "seq_length": 131072,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}


def test_glm_4_remote_config():
    shape = shape_from_remote_config(GLM4_9B_CHAT, "glm-4-9b-chat")
    assert (shape.n_layers, shape.n_kv_heads, shape.head_dim, shape.vocab) == (40, 2, 128, 151552)
    # the multi-query groups are what is cached: 40 layers × 2 groups × 128 × (K, V) × 2 bytes per token
    from formulas.kv_cache import kv_cache_bytes

    assert kv_cache_bytes(shape, 1, 1, 2) == 40 * 2 * 128 * 2 * 2


def test_baichuan_13b_alibi_mask_inference_only():
    p = predict(Spec(model="baichuan-inc/Baichuan2-13B-Chat", seq=1024))
    assert p.breakdown["buffers"] == 40 * 4096 * 4096 * 2  # future_mask (heads, model_max_length²) at bf16
    with pytest.raises(SpecError, match="ALiBi mask"):
        predict(Spec(model="baichuan-inc/Baichuan2-13B-Chat", mode="train", method="lora"))


def test_internlm2_rotary_caches_are_buffers():
    """Every InternLM2 attention layer holds cos and sin tables of max_position_embeddings × head_dim."""
    shape = get_shape("internlm/internlm2-chat-7b")
    st = weight_storage(shape, "bf16")
    assert st.buffer_bytes == 32 * (2 * 32768 * 128 * 2 + 64 * 4)


def test_chatglm_checkpoint_names_sort_like_the_formula():
    """--weights-from-checkpoint: ChatGLM's stored names (transformer.embedding…, transformer.output_layer) land in
    the embedding and head parts, byte for byte what the formula counts."""
    shape = get_shape("THUDM/chatglm3-6b")
    names = {"layers.": "transformer.encoder.layers.{i}.", "embedding.": "transformer.embedding.",
             "final_layernorm": "transformer.encoder.final_layernorm", "output_layer": "transformer.output_layer"}
    tensors = []
    for t in shape.tensors:
        for generic, real in names.items():
            if t.name.startswith(generic):
                base = real + t.name[len(generic):]
                break
        tensors += [(base.format(i=i), "F16", t.shape) for i in range(t.count)]
    tensors.append(("transformer.rotary_pos_emb.inv_freq", "F16", (32,)))
    sw = stored_weights(tensors, shape, load_config("THUDM/chatglm3-6b"))
    st = weight_storage(shape, "fp16")
    assert (sw.embed_bytes, sw.head_bytes, sw.layer_bytes) == (st.embed_bytes, st.head_bytes, st.layer_bytes)
    assert sw.total_bytes == st.weight_bytes


def test_chatglm_first_generation_is_one_line():
    cfg = {"model_type": "chatglm", "auto_map": {"AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"},
           "hidden_size": 4096, "inner_hidden_size": 16384, "num_layers": 28, "num_attention_heads": 32,
           "vocab_size": 130528, "position_encoding_2d": True}
    with pytest.raises(UnsupportedModelError, match="ChatGLM-6B .first generation.*not mapped") as e:
        shape_from_remote_config(cfg, "chatglm-6b")
    assert "\n" not in str(e.value)


def test_an_unmapped_remote_code_config_is_one_line(tmp_path, capsys):
    cfg = {"model_type": "xverse", "architectures": ["XverseForCausalLM"], "hidden_size": 4096,
           "auto_map": {"AutoConfig": "configuration_xverse.XverseConfig",
                        "AutoModelForCausalLM": "modeling_xverse.XverseForCausalLM"},
           "num_attention_heads": 32, "num_hidden_layers": 32, "intermediate_size": 11008, "vocab_size": 100534}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    from harness.cli import main

    assert main(["predict", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "remote code" in err and "modeling_xverse.XverseForCausalLM" in err, err
    assert "does not fit" not in err
    # without torch (a wheel with no extras) it is one line too, naming the remote code
    with pytest.raises(UnsupportedModelError, match="names remote code .*modeling_xverse"):
        get_shape(str(tmp_path))


def test_a_remote_code_model_is_not_traced():
    pytest.importorskip("transformers")
    from harness.workload.models import transformers_config

    with pytest.raises(UnsupportedModelError, match="remote code.*not\\s+built, traced or measured"):
        transformers_config(load_config("Qwen/Qwen-7B"))


def test_a_bad_dimension_is_named():
    cfg = load_config("internlm/internlm2-chat-7b")
    with pytest.raises(UnsupportedModelError, match="num_key_value_heads: 0"):
        shape_from_remote_config(dict(cfg, num_key_value_heads=0), "internlm2")
    with pytest.raises(UnsupportedModelError, match="lacks the field 'intermediate_size'"):
        shape_from_remote_config({k: v for k, v in cfg.items() if k != "intermediate_size"}, "internlm2")


def test_shape_from_config_still_refuses_remote_types():
    """shape_from_config is transformers' families only: remote code goes through the catalog's dispatch."""
    with pytest.raises(UnsupportedModelError):
        shape_from_config(load_config("Qwen/Qwen-7B"), "qwen")
