"""The workloads themselves (harness/workload/), run on real CPU tensors with tiny models of every model type."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from formulas.spec import Spec  # noqa: E402
from harness.workload import steps  # noqa: E402
from harness.workload.models import build_model  # noqa: E402
from tiny_configs import TINY, write  # noqa: E402


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_decode_grows_the_cache_by_one_token_per_step(tmp_path, model_type):
    """Prefill then three decode steps; run_inference checks the cache after every forward (defect: a
    `cache=` keyword the installed transformers drops silently gave a fresh one-token cache per step)."""
    spec = Spec(model=write(tmp_path, model_type), seq=8, gen=3, batch=2, dtype="fp32")
    model = build_model(spec)
    seen = []
    orig = steps.check_cache_length

    def spy(cache, expected, step):
        seen.append(cache.get_seq_length())
        orig(cache, expected, step)

    steps.check_cache_length = spy
    try:
        steps.run_inference(model, spec)
    finally:
        steps.check_cache_length = orig
    assert seen == [8, 9, 10, 11], f"transformers {transformers.__version__}"


def test_a_cache_the_model_ignores_is_caught(tmp_path, monkeypatch):
    spec = Spec(model=write(tmp_path, "llama"), seq=8, gen=2, dtype="fp32")
    model = build_model(spec)
    monkeypatch.setattr(steps, "cache_keyword", lambda m: "kv_cache_the_model_does_not_take")
    with pytest.raises(RuntimeError, match="prefill: the KV cache holds 0 tokens, expected 8"):
        steps.run_inference(model, spec)


def test_cache_keyword_follows_the_signature():
    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, **kwargs):
            pass

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None, **kwargs):
            pass

    assert steps.cache_keyword(Old()) == "past_key_values" and steps.cache_keyword(New()) == "cache"
    with pytest.raises(ValueError, match="neither"):
        steps.cache_keyword(torch.nn.Linear(2, 2))
