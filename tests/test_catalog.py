"""Catalog lookup, and exact parameter counts against transformers on the meta device."""

import json
import os

import pytest

from formulas.catalog import CONFIG_DIR, UnknownModelError, catalog_names, get_shape, resolve_config_path
from formulas.shapes import UnsupportedModelError, shape_from_config

REQUIRED = [
    "deepseek-ai/DeepSeek-R1", "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B",
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B",
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "deepseek-ai/DeepSeek-R1-Distill-Llama-70B",
    "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-13b-hf", "meta-llama/Llama-2-70b-hf",
    "meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-70B", "meta-llama/Llama-3.1-405B",
    "meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-3B", "mistralai/Mistral-7B-v0.1", "mistralai/Mixtral-8x7B-v0.1",
    *[f"Qwen/Qwen2.5-{s}" for s in ("0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B")],
    *[f"Qwen/Qwen3-{s}" for s in ("0.6B", "1.7B", "4B", "8B", "14B", "32B", "30B-A3B")],
    "openai-community/gpt2", "openai-community/gpt2-xl", "facebook/opt-125m", "facebook/opt-66b",
    "EleutherAI/pythia-70m", "EleutherAI/pythia-12b",
]


def test_required_models_are_shipped():
    names = set(catalog_names())
    missing = [m for m in REQUIRED if m not in names]
    assert not missing


@pytest.mark.parametrize("alias", ["Llama-3.1-8B", "meta-llama/Llama-3.1-8B", "llama-3.1-8b", "meta-llama--Llama-3.1-8B"])
def test_aliases_resolve_to_one_file(alias):
    assert resolve_config_path(alias).endswith("meta-llama--Llama-3.1-8B.json")


def test_unknown_model_suggests_close_names():
    with pytest.raises(UnknownModelError) as e:
        resolve_config_path("Llama-3.1-8")
    msg = str(e.value)
    assert "--model Llama-3.1-8" in msg and "Llama-3.1-8B" in msg


def test_path_and_directory(tmp_path):
    cfg = json.load(open(os.path.join(CONFIG_DIR, "openai-community--gpt2.json")))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert get_shape(str(tmp_path)).n_params == get_shape("gpt2").n_params
    assert get_shape(str(tmp_path / "config.json")).n_params == 124_439_808


def test_unsupported_architecture_names_what_is_supported():
    with pytest.raises(UnsupportedModelError) as e:
        shape_from_config({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}, "t5-small")
    assert "t5" in str(e.value) and "llama" in str(e.value) and "gpt_neox" in str(e.value)


def test_missing_field_is_named():
    with pytest.raises(UnsupportedModelError) as e:
        shape_from_config({"model_type": "llama", "hidden_size": 64}, "broken")
    assert "num_attention_heads" in str(e.value) or "intermediate_size" in str(e.value)


@pytest.mark.parametrize("name,expected", [
    ("meta-llama/Llama-3.1-8B", 8_030_261_248),
    ("meta-llama/Llama-2-70b-hf", 68_976_648_192),
    ("openai-community/gpt2", 124_439_808),
    ("deepseek-ai/DeepSeek-R1", 671_026_404_352),  # without the MTP layer, which transformers does not build
])
def test_published_sizes(name, expected):
    assert get_shape(name).n_params == expected


def _transformers_count(path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from harness.workload.models import transformers_config

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers_config(json.load(open(path))))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.transformers
# remote-code models, which transformers does not build, are checked against their checkpoints' sizes instead
# (tests/test_remote_code.py)
@pytest.mark.parametrize("name", [n for n in catalog_names() if not get_shape(n).remote_code])
def test_param_count_equals_transformers_meta(name):
    path = resolve_config_path(name)
    assert get_shape(name).n_params == _transformers_count(path)
