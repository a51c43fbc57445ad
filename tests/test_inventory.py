"""The general inventory (harness/inventory.py → formulas.shapes.shape_from_inventory): any causal LM
transformers builds, its weights, its cache per layer type, and predictions checked against the tracer."""

import json
import os
import subprocess
import sys

import pytest

from formulas.catalog import CONFIG_DIR, INVENTORY_DIR, find_inventory, get_shape, load_config
from formulas.kv_cache import kv_cache_bytes
from formulas.predict import predict
from formulas.shapes import FAMILIES, UnsupportedModelError, shape_from_config, shape_from_inventory
from formulas.spec import Spec, SpecError
from formulas.weights import weight_storage

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from harness.inventory import build_inventory, ensure_for_model  # noqa: E402
from harness.workload.models import transformers_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

# Small shapes of the four families the issue names: every rule they add is in them (sliding windows
# short enough to cap, linear attention, Mamba state, attention sinks, MoE), at sizes where the
# activations and the cache are a visible share of the peak.
SMALL = {
    "gemma3_text": dict(num_hidden_layers=6, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=64, vocab_size=4096, sliding_window=32),
    "gpt_oss": dict(num_hidden_layers=4, hidden_size=256, intermediate_size=256, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=64, vocab_size=4096, num_local_experts=8, num_experts_per_tok=2,
                    sliding_window=32),
    "qwen3_next": dict(num_hidden_layers=4, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                       shared_expert_intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       vocab_size=4096, num_experts=8, num_experts_per_tok=2, linear_num_key_heads=4,
                       linear_num_value_heads=8, linear_key_head_dim=32, linear_value_head_dim=32),
    "jamba": dict(num_hidden_layers=4, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=4096, num_experts=4, num_experts_per_tok=2, attn_layer_period=2,
                  attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8),
}


def _small_model(folder, mt):
    """Path of SMALL[mt]'s config.json in folder, its inventory built."""
    cfg = transformers.AutoConfig.for_model(mt, **SMALL[mt]).to_dict()
    cfg["model_type"] = mt
    path = str(folder / f"{mt}.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    ensure_for_model(path)
    return path


@pytest.fixture(scope="module")
def small_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small")
    return {mt: _small_model(folder, mt) for mt in SMALL}


@pytest.mark.slow
def test_45_popular_types_weights_within_1_percent():
    """The bar: ≥ 90% of 45 popular causal-LM types (default configs cut to 4 layers) within 1% of meta."""
    import inventory_bar

    assert len(inventory_bar.TYPES) == 45 and not set(inventory_bar.TYPES) & set(FAMILIES)
    ok = 0
    for mt in inventory_bar.TYPES:
        try:
            w, b, (mw, mb) = inventory_bar.check(mt, str(os.environ["VRAMLAB_CACHE"]))
        except UnsupportedModelError:
            continue  # transformers' own default config does not build (one line, tested below)
        assert b == mb, mt
        ok += abs(w / mw - 1) <= 0.01
    assert ok / 45 >= 0.9, ok


HAND = ("Llama-3.2-1B", "Mistral-7B-v0.1", "Qwen2.5-0.5B", "Qwen3-0.6B", "Mixtral-8x7B-v0.1", "Qwen1.5-MoE-A2.7B",
        "Qwen3-30B-A3B", "DeepSeek-V2-Lite", "DeepSeek-V3", "gpt2", "opt-350m", "pythia-160m", "gpt_bigcode-santacoder")


@pytest.mark.parametrize("name", HAND)
def test_hand_families_agree_with_the_general_inventory(name):
    """Each hand-modelled family against the inventory of the model transformers builds: parameters,
    the totals per kind the formulas act on, buffers, and the stored bytes under bitsandbytes 4-bit
    (which only nn.Linear layers get)."""
    cfg = load_config(name)
    hand = shape_from_config(cfg, name)
    general = shape_from_inventory(build_inventory(cfg, name), name)
    assert general.n_params == hand.n_params
    assert {hand.model_type} <= set(FAMILIES)

    def per_kind(shape, kinds):
        return sum(t.total_numel for t in shape.tensors if t.kind in kinds)

    for kinds in (("linear",), ("embedding",), ("experts",)):
        assert per_kind(general, kinds) == per_kind(hand, kinds), kinds
    for dtype in ("bf16", "nf4", "int8"):
        g, h = weight_storage(general, dtype), weight_storage(hand, dtype)
        assert (g.weight_bytes, g.quant_state_bytes, g.buffer_bytes) == (h.weight_bytes, h.quant_state_bytes, h.buffer_bytes), dtype
    assert general.tie_embeddings == hand.tie_embeddings


def _trace(model, **kw):
    from harness.tracing.tracer import trace

    return trace(Spec(model=model, attn="auto", **kw))


@pytest.mark.slow
@pytest.mark.parametrize("mt", list(SMALL))
def test_cache_and_state_equal_the_traced_bytes(small_models, mt):
    """KV cache and recurrent state after prefill + decode: the cache groups' bytes, to the byte."""
    batch, seq, gen = 2, 48, 3
    r = _trace(small_models[mt], batch=batch, seq=seq, gen=gen)
    shape = get_shape(small_models[mt])
    decode = [cats.get("kv_cache", 0) for _, phase, _, cats in r.timeline if phase == "decode"]
    decode = [v for i, v in enumerate(decode) if i == 0 or v != decode[i - 1]]
    while len(decode) > 1 and decode[-2] > decode[-1]:  # the cache freed layer by layer after the run
        decode.pop()
    prefill = [cats.get("kv_cache", 0) for _, phase, _, cats in r.timeline if phase == "prefill"]
    # right after the prefill (sliding layers still hold the prompt), and after the last decode step
    assert max(prefill) == kv_cache_bytes(shape, batch, seq, 2, prefill=True) > 0
    assert decode[-1] == kv_cache_bytes(shape, batch, seq + gen, 2) > 0
    kinds = {g.kind for g in shape.cache_groups}
    assert kinds == {"gemma3_text": {"sliding", "full"}, "gpt_oss": {"sliding", "full"},
                     "qwen3_next": {"state", "full"}, "jamba": {"state", "full"}}[mt]


@pytest.mark.slow
@pytest.mark.parametrize("mt", list(SMALL))
@pytest.mark.parametrize("mode", ["inference", "train"])
@pytest.mark.parametrize("seq", [64, 512])
def test_peak_within_10_percent_of_the_trace(small_models, mt, mode, seq):
    """The bar, at two lengths: at 512 tokens the activations are most of the peak (a third to two thirds)."""
    kw = dict(batch=2, seq=seq, gen=4) if mode == "inference" else dict(mode="train", precision="pure", batch=2, seq=seq)
    traced = _trace(small_models[mt], **kw).peak_allocated_bytes
    predicted = predict(Spec(model=small_models[mt], attn="auto", **kw)).peak_allocated_bytes
    assert abs(predicted / traced - 1) <= 0.10, (predicted, traced)


def test_a_tied_embedding_gradient_sum_is_predicted():
    """Trace finding #18: at the end of a full fine-tuning backward, lm_head's and the embedding's gradients
    of a tied embedding and their sum are alive at once (Llama-3.2-1B ties them)."""
    kw = dict(mode="train", precision="pure", batch=1, seq=128)
    r = _trace("Llama-3.2-1B", **kw)
    p = predict(Spec(model="Llama-3.2-1B", **kw))
    for cat in ("gradients", "activations"):
        assert abs(p.phases["backward"][cat] / r.phases["backward"][cat] - 1) < 0.01, cat


def test_eager_only_models_take_eager_and_refuse_sdpa(tmp_path):
    gpt_oss = _small_model(tmp_path, "gpt_oss")  # only the model this needs (the fixture builds every type)
    spec = Spec(model=gpt_oss, attn="auto")
    assert predict(spec).spec.attn == "eager"
    with pytest.raises(SpecError, match="--attn sdpa: gpt_oss runs only eager"):
        predict(Spec(model=gpt_oss, attn="sdpa"))


def test_inventory_is_cached_by_config_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("VRAMLAB_CACHE", str(tmp_path))
    cfg = transformers.AutoConfig.for_model("olmo2", **SMALL["gemma3_text"] | {"sliding_window": None}).to_dict()
    cfg["model_type"] = "olmo2"
    path = tmp_path / "olmo2.json"
    path.write_text(json.dumps(cfg))
    get_shape.cache_clear()
    with pytest.raises(UnsupportedModelError, match="no inventory yet"):
        get_shape(str(path))
    built = ensure_for_model(str(path))
    assert built.startswith(str(tmp_path / "inventories")) and os.path.isfile(built)
    assert find_inventory(cfg) == built
    mtime = os.path.getmtime(built)
    assert ensure_for_model(str(path)) is None and os.path.getmtime(built) == mtime  # found, not rebuilt
    assert get_shape(str(path)).n_params == transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**cfg)).num_parameters()
    cfg["hidden_size"] = 128  # another config, another hash
    assert find_inventory(cfg) is None


def test_shipped_catalog_inventories_match_the_configs():
    for fn in sorted(os.listdir(CONFIG_DIR)):
        cfg = json.load(open(os.path.join(CONFIG_DIR, fn)))
        if cfg.get("model_type") in FAMILIES:
            continue
        path = find_inventory(cfg)
        assert path and path.startswith(INVENTORY_DIR), fn
        shipped = json.load(open(path))
        with torch.device("meta"):
            fresh = transformers.AutoModelForCausalLM.from_config(transformers_config(cfg)).num_parameters()
        assert shipped["n_params"] == fresh, fn


def test_cached_prediction_stays_fast_without_torch():
    code = ("import sys, time; t = time.perf_counter()\n"
            "from harness.cli import main\n"
            "rc = main(['predict', '--model', 'Qwen/Qwen3-Next-80B-A3B-Instruct', '--seq', '4096', '--gen', '64'])\n"
            "took = time.perf_counter() - t\n"
            "assert rc == 0 and 'torch' not in sys.modules, rc\nprint(took)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "fixed state" in r.stdout and "general inventory" in r.stdout
    assert float(r.stdout.strip().splitlines()[-1]) < 0.5


@pytest.mark.slow
@pytest.mark.parametrize("model_type, message", [
    ("bert", "model_type 'bert' is an encoder-only model, not a causal LM"),
    ("t5", "model_type 't5' is an encoder-decoder model, not a causal LM"),
    ("no_such_arch", f"model_type 'no_such_arch' is not known to transformers {transformers.__version__}"),
    ("nemotron", f"transformers {transformers.__version__} cannot build model_type 'nemotron'"),
])
def test_bad_model_types_are_one_line(tmp_path, model_type, message):
    if model_type == "no_such_arch":
        cfg = {"model_type": model_type, "hidden_size": 8}
    else:
        cfg = transformers.AutoConfig.for_model(model_type).to_dict()
        cfg["model_type"] = model_type
        if model_type == "t5":
            cfg["is_encoder_decoder"] = True
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    r = subprocess.run([sys.executable, "-m", "harness", "predict", "--model", str(path)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    if model_type == "nemotron":  # refused while building: after the line that says a build started
        assert lines[0].startswith("vramlab: model_type 'nemotron' is not hand-modelled"), lines
        lines = lines[1:]
    assert r.stdout == "" and len(lines) == 1 and message in lines[0], r.stderr


def test_mxfp4_counts_the_experts_as_transformers_stores_them():
    """gpt-oss ships MXFP4: with the triton kernels transformers keeps each expert tensor as uint8 codes (two
    per byte) and a uint8 scale per 32 values, the experts' biases in fp32 (Mxfp4GptOssExperts); the rest bf16."""
    shape = get_shape("openai/gpt-oss-20b")
    bf16, mx = weight_storage(shape, "bf16"), weight_storage(shape, "mxfp4")
    experts = sum(t.total_numel for t in shape.tensors if t.kind == "experts")
    biases = sum(t.total_numel for t in shape.tensors if "experts." in t.name and t.name.endswith("_bias"))
    assert experts and biases
    assert mx.weight_bytes == bf16.weight_bytes - 2 * experts + experts // 2 + 2 * biases
    assert mx.quant_state_bytes == experts // 32
    p = predict(Spec(model="openai/gpt-oss-20b", attn="auto"))
    assert any("stored as mxfp4" in n for n in p.notes)


def _small_config(tmp_path, model_type, **kw):
    cfg = transformers.AutoConfig.for_model(model_type, **kw).to_dict()
    cfg["model_type"] = model_type
    path = tmp_path / f"{model_type}.json"
    path.write_text(json.dumps(cfg))
    return str(path), cfg


def test_the_grid_runs_generic_models_with_eager_attention():
    """Vectorised predictions of a generic model (eager per-score terms are floats) equal predict()'s."""
    from formulas.grid import expand_grid, predict_grid

    df = predict_grid(expand_grid(base=dict(mode="train", attn="eager", precision="pure"), model=["openai/gpt-oss-20b"],
                                  seq=[512, 4096], batch=[1, 4]))
    for _, row in df.iterrows():
        one = predict(Spec(model="openai/gpt-oss-20b", mode="train", attn="eager", precision="pure",
                           seq=int(row["seq"]), batch=int(row["batch"])))
        assert row["peak_allocated_bytes"] == one.peak_allocated_bytes


def test_a_damaged_inventory_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("VRAMLAB_CACHE", str(tmp_path / "cache"))
    path, cfg = _small_config(tmp_path, "olmo2", num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                              num_attention_heads=2, vocab_size=256)
    built = ensure_for_model(path)
    with open(built, "w") as f:
        f.write('{"schema": 1, "fields": ')  # cut short
    get_shape.cache_clear()
    with pytest.raises(UnsupportedModelError, match="cannot be read"):
        get_shape(path)
    assert ensure_for_model(path) == built
    assert get_shape(path).n_params > 0


def test_an_unwritable_cache_is_one_line(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("VRAMLAB_CACHE", str(blocker))
    path, _ = _small_config(tmp_path, "olmo2", num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                            num_attention_heads=2, vocab_size=256)
    get_shape.cache_clear()
    with pytest.raises(UnsupportedModelError, match="cannot write its inventory .* set VRAMLAB_CACHE"):
        ensure_for_model(path)


def test_lora_defaults_follow_peft_for_generic_models(tmp_path):
    pytest.importorskip("peft")
    path, _ = _small_config(tmp_path, "falcon", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                            vocab_size=256)
    ensure_for_model(path)
    p = predict(Spec(model=path, mode="train", method="lora", attn="auto"))
    assert any("query_key_value" in n for n in p.notes), p.notes


@pytest.mark.slow
def test_a_mamba_model_traces_and_its_state_is_the_cache(tmp_path):
    """A cache of SSM layers only holds no tokens; the workload does not ask it for a length."""
    path, _ = _small_config(tmp_path, "mamba", num_hidden_layers=2, hidden_size=64, vocab_size=256, state_size=8)
    ensure_for_model(path)
    from harness.tracing.tracer import trace

    r = trace(Spec(model=path, batch=1, seq=32, gen=2))  # attn "sdpa" by default: no attention, no matter
    assert r.peak_allocated_bytes > 0
    assert max(c.get("kv_cache", 0) for _, _, _, c in r.timeline) == kv_cache_bytes(get_shape(path), 1, 34, 2) > 0
