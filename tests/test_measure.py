"""GPU measurement: the model-building path on the CPU, and (marked gpu) real measurements."""

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from formulas.catalog import get_shape  # noqa: E402
from formulas.lora import lora_params, resolve_targets  # noqa: E402
from formulas.predict import predict  # noqa: E402
from formulas.spec import Spec, validate  # noqa: E402

LLAMA = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 176, "vocab_size": 1000, "max_position_embeddings": 512}
BIGCODE = {"model_type": "gpt_bigcode", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 1000, "n_positions": 128,
           "bos_token_id": 0, "eos_token_id": 0}

# Uncalibrated predictions of peak allocated bytes against a GPU's max_memory_allocated.
UNCALIBRATED_ALLOCATED_TOLERANCE = 0.15


def _path(tmp_path, cfg):
    p = tmp_path / f"{cfg['model_type']}.json"
    p.write_text(json.dumps(cfg))
    return str(p)


@pytest.mark.parametrize("cfg", [LLAMA, BIGCODE], ids=["llama", "gpt_bigcode"])
def test_meta_build_materializes_like_a_normal_build(tmp_path, cfg):
    from harness.gpu.build import _materialize_meta
    from harness.workload.models import hf_config

    spec = validate(Spec(model=_path(tmp_path, cfg)), get_shape(_path(tmp_path, cfg)))
    ref = transformers.AutoModelForCausalLM.from_config(hf_config(spec), dtype=torch.bfloat16)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config(spec), dtype=torch.bfloat16)
    _materialize_meta(model, "cpu")
    assert not [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    ref_buffers, buffers = dict(ref.named_buffers()), dict(model.named_buffers())
    assert sorted(ref_buffers) == sorted(buffers)
    assert all(torch.equal(ref_buffers[k], buffers[k]) for k in ref_buffers)  # rotary inv_freq, causal masks
    assert sum(p.numel() for p in model.parameters()) == get_shape(spec.model).n_params  # ties kept


@pytest.mark.parametrize("fields", [dict(), dict(mode="train", method="lora"),
                                    dict(mode="train", method="freeze", trainable_layers=1)])
def test_build_applies_the_training_setup(tmp_path, fields):
    from harness.gpu.build import build_on_device

    path = _path(tmp_path, LLAMA)
    shape = get_shape(path)
    spec = validate(Spec(model=path, **fields), shape)
    model = build_on_device(spec, device="cpu")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if spec.mode == "inference":
        assert trainable == 0
    elif spec.method == "lora":
        assert trainable == lora_params(resolve_targets(shape, ()), spec.lora_rank)
    else:
        layer = sum(t.numel * t.count for t in shape.tensors if t.name.startswith("layers.")) // shape.n_layers
        assert trainable == layer


@pytest.mark.gpu
@pytest.mark.parametrize("fields", [
    dict(model="Qwen/Qwen2.5-0.5B", seq=512, gen=16),
    dict(model="Qwen/Qwen2.5-0.5B", seq=512, gen=16, dtype="nf4"),
    dict(model="Qwen/Qwen2.5-0.5B", mode="train", method="lora", seq=512),
])
def test_measured_allocated_peak_against_prediction(tmp_path, fields):
    from harness.gpu.measure import measure
    from harness.sweep.schema import Experiment

    spec = Spec(**fields)
    measured = measure(Experiment(spec=spec, steps=2, timeout_s=300))
    predicted = predict(spec).peak_allocated_bytes
    assert abs(measured["peak_allocated_bytes"] / predicted - 1) <= UNCALIBRATED_ALLOCATED_TOLERANCE
    assert measured["cuda_context_bytes"] > 0 and measured["peak_device_bytes"] >= measured["peak_allocated_bytes"]
