"""Models by Hub id (the Hugging Face cache, then the Hub) and weights from safetensors headers.

Nothing here reaches the internet: the cache is a folder the test builds, and the Hub is
tests/hub_fixtures.HubServer on 127.0.0.1. `vramlab` runs in a subprocess where the environment
(HF_HOME, HF_ENDPOINT, HF_HUB_OFFLINE, HF_TOKEN) matters, because huggingface_hub reads it on import.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from formulas.catalog import load_config, resolve_config_path
from formulas.checkpoint import CheckpointError, stored_weights
from formulas.predict import predict
from formulas.spec import Spec
from hub_fixtures import (
    HubServer,
    NotHttpServer,
    VirtualSafetensors,
    build_cache,
    commit_of,
    meta_checkpoint,
    split_shards,
    write_sparse_safetensors,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Five catalog models the formula counts exactly at bf16: untied (Llama, Mistral), tied with biases
# (Qwen2.5), MoE with per-expert tensors whose headers need a second range request (Qwen3-MoE), and
# GPT-2's tied Conv1D layout with position embeddings.
CATALOG = ["meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-0.5B", "mistralai/Mistral-7B-v0.1", "Qwen/Qwen3-30B-A3B",
           "openai-community/gpt2"]


def vramlab(*argv, env=None, timeout=60):
    """Run the CLI in a fresh process with a clean Hugging Face environment plus `env`."""
    e = {k: v for k, v in os.environ.items()
         if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "XDG_CACHE", "VRAMLAB_"))}
    e.update({"HF_HUB_DISABLE_TELEMETRY": "1", "VRAMLAB_HUB_TIMEOUT": "3", "PYTHONPATH": ROOT, **(env or {})})
    e.setdefault("HF_HOME", os.path.join(ROOT, ".no-such-hf-home"))
    return subprocess.run([sys.executable, "-m", "harness", *argv], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=timeout)


def weights_of(out):
    """weights + quant_state bytes of a `predict --json` output."""
    d = json.loads(out)
    return d["breakdown"]["weights"] + d["breakdown"].get("quant_state", 0)


def formula_weights(model, dtype="bf16"):
    p = predict(Spec(model=model, dtype=dtype))
    return p.breakdown["weights"] + p.breakdown.get("quant_state", 0)


def config_bytes(model):
    with open(resolve_config_path(model), "rb") as f:
        return f.read()


# ------------------------------------------------------------------ the cache, offline

@pytest.mark.parametrize("var", ["HF_HOME", "HF_HUB_CACHE"])
def test_offline_cache_gives_the_same_weights_as_the_path(tmp_path, var):
    """The issue's bar: HF_HUB_OFFLINE=1 and a cache holding config.json → the weights of the same file as a path."""
    build_cache(str(tmp_path), "acme/llama-8b", {"config.json": config_bytes("Llama-3.1-8B")})
    path = os.path.join(tmp_path, "config.json")
    shutil.copy(resolve_config_path("Llama-3.1-8B"), path)
    env = {"HF_HUB_OFFLINE": "1", var: str(tmp_path) if var == "HF_HOME" else str(tmp_path / "hub")}
    by_id = vramlab("predict", "--model", "acme/llama-8b", "--dtype", "bf16", "--json", env=env)
    by_path = vramlab("predict", "--model", path, "--dtype", "bf16", "--json", env=env)
    assert by_id.returncode == 0, by_id.stderr
    assert weights_of(by_id.stdout) == weights_of(by_path.stdout) == formula_weights("Llama-3.1-8B")
    text = vramlab("predict", "--model", "acme/llama-8b@main", env=env)
    assert text.returncode == 0 and text.stdout.startswith(f"acme/llama-8b@{commit_of('acme/llama-8b')[:12]} · ")


def test_offline_and_not_cached_is_one_line(tmp_path):
    r = vramlab("predict", "--model", "acme/unknown-model", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "HF_HUB_OFFLINE" in r.stderr and "pass a path" in r.stderr
    assert str(tmp_path) in r.stderr  # says which cache it looked in


def test_not_a_hub_id_keeps_the_catalog_error():
    r = vramlab("predict", "--model", "Llama-3.1-8", env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "did you mean meta-llama/Llama-3.1-8B" in r.stderr


def test_cached_snapshot_checkpoint_is_read_locally(tmp_path):
    """A snapshot that holds its safetensors is read from disk, offline."""
    cfg = load_config("Qwen2.5-0.5B")
    snap = build_cache(str(tmp_path), "acme/qwen", {"config.json": json.dumps(cfg).encode()})
    write_sparse_safetensors(os.path.join(snap, "model.safetensors"), meta_checkpoint(cfg))
    r = vramlab("predict", "--model", "acme/qwen", "--weights-from-checkpoint", "--json",
                env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["weights_source"] == "checkpoint" and d["checkpoint"]["read_from"].startswith(str(tmp_path))
    assert d["checkpoint"]["weights_bytes"] == weights_of(r.stdout) == formula_weights("Qwen2.5-0.5B")


def test_offline_checkpoint_not_cached_is_one_line(tmp_path):
    build_cache(str(tmp_path), "acme/llama-8b", {"config.json": config_bytes("Llama-3.1-8B")})
    r = vramlab("predict", "--model", "acme/llama-8b", "--weights-from-checkpoint",
                env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "HF_HUB_OFFLINE" in r.stderr and "drop --weights-from-checkpoint" in r.stderr


# ------------------------------------------------------------------ the Hub on 127.0.0.1

def _repo(model, shards):
    cfg = load_config(model)
    files, index = split_shards(meta_checkpoint(cfg), shards)
    repo = {"config.json": json.dumps(cfg).encode(), "model.safetensors.index.json": index}
    repo.update({fn: VirtualSafetensors(ts) for fn, ts in files.items()})
    return repo


@pytest.fixture(scope="module")
def hub():
    pytest.importorskip("transformers")
    pytest.importorskip("huggingface_hub")
    repos = {m: _repo(m, 3) for m in CATALOG}
    single = _repo("Qwen2.5-0.5B", 1)
    repos["acme/qwen-single"] = {"config.json": single["config.json"],
                                 "model.safetensors": next(v for k, v in single.items() if k.endswith(".safetensors"))}
    repos["acme/gated-llama"] = {"config.json": config_bytes("Llama-3.2-1B")}
    repos["acme/config-only"] = {"config.json": config_bytes("Llama-3.2-1B")}
    with HubServer(repos, gated={"acme/gated-llama"}) as server:
        yield server


@pytest.mark.parametrize("model", CATALOG)
def test_header_weights_equal_the_formula_to_the_byte(hub, tmp_path, model):
    """The issue's bar: safetensors headers served over HTTP give the formula's weights exactly, reading
    only the headers (range requests), never the weights."""
    before = len(hub.requests)
    r = vramlab("predict", "--model", model, "--weights-from-checkpoint", "--json",
                env={"HF_HOME": str(tmp_path), "HF_ENDPOINT": hub.url})
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    ck = d["checkpoint"]
    assert d["weights_source"] == "checkpoint" and ck["used"] and ck["dtype"] == "bf16"
    assert ck["read_from"].startswith(f"{hub.url}/{model}@main (range requests of 3 headers")
    assert ck["weights_bytes"] == formula_weights(model) == weights_of(r.stdout)
    mine = hub.requests[before:]
    assert not [q for q in mine if q[1].endswith(".safetensors") and not q[2]]  # no whole-file GET, no HEAD
    sent = sum(q[3] for q in mine if q[1].endswith(".safetensors"))
    shards = [f for n, f in hub.repos[model].items() if n.endswith(".safetensors")]
    assert 0 < sent <= sum(100_001 + len(f.head) for f in shards)  # the first 100 kB, then the rest of a long header
    assert sent < ck["stored_bytes"] / 100  # headers, not weights
    if model == "Qwen/Qwen3-30B-A3B":  # 18k per-expert tensors: a header past the first 100 kB
        assert any(q[2] and not q[2].startswith("bytes=0-") for q in mine)


def test_hub_id_outside_the_catalog_fetches_config_only_and_caches_it(hub, tmp_path):
    env = {"HF_HOME": str(tmp_path), "HF_ENDPOINT": hub.url}
    before = len(hub.requests)
    r = vramlab("predict", "--model", "acme/qwen-single", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert weights_of(r.stdout) == formula_weights("Qwen2.5-0.5B")
    assert {q[1].rsplit("/", 1)[1] for q in hub.requests[before:]} == {"config.json"}
    snap = os.path.join(tmp_path, "hub", "models--acme--qwen-single", "snapshots", commit_of("acme/qwen-single"))
    assert os.path.isfile(os.path.join(snap, "config.json"))
    again = vramlab("predict", "--model", "acme/qwen-single", "--json",
                    env={**env, "HF_ENDPOINT": "http://127.0.0.1:9"})  # the cache answers: no request at all
    assert again.returncode == 0 and weights_of(again.stdout) == weights_of(r.stdout)
    ck = vramlab("predict", "--model", "acme/qwen-single", "--weights-from-checkpoint", env=env)
    assert ck.returncode == 0, ck.stderr  # the cached snapshot lacks the weights: read from the Hub at its commit
    assert "weights source: the checkpoint's safetensors headers" in ck.stdout
    assert f"acme/qwen-single@{commit_of('acme/qwen-single')} (range requests of 1 header)" in ck.stdout


def test_gated_repo_needs_a_token(hub, tmp_path):
    env = {"HF_HOME": str(tmp_path), "HF_ENDPOINT": hub.url}
    r = vramlab("predict", "--model", "acme/gated-llama", env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "gated" in r.stderr and "HF_TOKEN" in r.stderr
    wrong = vramlab("predict", "--model", "acme/gated-llama", env={**env, "HF_TOKEN": "hf_wrong"})
    assert wrong.returncode == 2 and "your token does not give access" in wrong.stderr
    with open(tmp_path / "token", "w") as f:  # a saved token (`hf auth login`) counts as a token too
        f.write("hf_saved_but_wrong")
    saved = vramlab("predict", "--model", "acme/gated-llama", env=env)
    assert saved.returncode == 2 and "your token does not give access" in saved.stderr
    ok = vramlab("predict", "--model", "acme/gated-llama", "--json", env={**env, "HF_TOKEN": hub.token})
    assert ok.returncode == 0, ok.stderr
    assert weights_of(ok.stdout) == formula_weights("Llama-3.2-1B")


@pytest.mark.parametrize("model, expect", [
    ("acme/no-such-model", "no such model on"),
    ("acme/config-only@v9", "has no revision 'v9'"),
])
def test_hub_misses_are_one_line(hub, tmp_path, model, expect):
    r = vramlab("predict", "--model", model, env={"HF_HOME": str(tmp_path), "HF_ENDPOINT": hub.url})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and expect in r.stderr, r.stderr


def test_no_safetensors_on_the_hub_is_one_line(hub, tmp_path):
    r = vramlab("predict", "--model", "acme/config-only", "--weights-from-checkpoint",
                env={"HF_HOME": str(tmp_path), "HF_ENDPOINT": hub.url})
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "has no model.safetensors (not a safetensors checkpoint)" in r.stderr


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_hub_is_one_line_and_quick(tmp_path):
    t0 = time.monotonic()
    r = vramlab("predict", "--model", "acme/anything",
                env={"HF_HOME": str(tmp_path), "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "cannot reach http://127.0.0.1" in r.stderr and "HF_HUB_OFFLINE=1" in r.stderr
    assert time.monotonic() - t0 < 20


def test_a_hub_that_never_answers_times_out(tmp_path):
    with HubServer({}, stall=True) as stalled:
        t0 = time.monotonic()
        r = vramlab("predict", "--model", "acme/anything", env={"HF_HOME": str(tmp_path), "HF_ENDPOINT": stalled.url})
        took = time.monotonic() - t0
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot reach" in r.stderr, r.stderr
    assert took < 30  # VRAMLAB_HUB_TIMEOUT=3 per request


def test_without_huggingface_hub_the_hub_is_one_line(tmp_path, monkeypatch):
    from harness import hub

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(hub.HubError, match=r"needs huggingface_hub \(pip install huggingface_hub"):
        hub.resolve_model("acme/anything")


def test_catalog_prediction_stays_fast_and_light():
    """The issue's bar: a catalog prediction under 0.5 s, importing neither torch nor huggingface_hub."""
    code = ("import sys, time, io, contextlib\nt0 = time.perf_counter()\nfrom harness.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    main(['predict', '--model', 'Llama-3.1-8B'])\n"
            "took = time.perf_counter() - t0\n"
            "assert not {'torch', 'huggingface_hub'} & set(sys.modules), sys.modules.keys()\nprint(took)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout) < 0.5


# ------------------------------------------------------------------ real checkpoints, every model type

@pytest.mark.transformers
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe",
                                        "deepseek_v2", "deepseek_v3", "gpt2", "gpt_bigcode", "opt", "gpt_neox"])
def test_saved_checkpoints_match_the_formula(tmp_path, model_type, capsys):
    """save_pretrained's files (tied weights once, MoE experts as the Hub stores them, persistent buffers)
    against the formula, for every model type the predictor knows."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from harness.cli import main
    from tiny_configs import TINY

    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**TINY[model_type]),
                                                          dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert main(["predict", "--model", str(tmp_path), "--json"]) == 0
    formula = weights_of(capsys.readouterr().out)
    assert main(["predict", "--model", str(tmp_path), "--weights-from-checkpoint", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["weights_source"] == "checkpoint" and d["checkpoint"]["dtype"] == "bf16"
    assert d["checkpoint"]["weights_bytes"] == weights_of(json.dumps(d)) == formula


# ------------------------------------------------------------------ formulas.checkpoint on hand-made headers

def _llama_like(n_layers=2, dtype="BF16", tied=False, extra=()):
    t = [("model.embed_tokens.weight", dtype, (100, 8)), ("model.norm.weight", dtype, (8,))]
    for i in range(n_layers):
        t += [(f"model.layers.{i}.self_attn.q_proj.weight", dtype, (8, 8)),
              (f"model.layers.{i}.input_layernorm.weight", dtype, (8,))]
    if not tied:
        t.append(("lm_head.weight", dtype, (100, 8)))
    return t + list(extra)


class _Shape:  # what stored_weights reads of a ModelShape
    def __init__(self, n_layers=2, tie=False, buffers=()):
        self.n_layers, self.tie_embeddings, self.buffers = n_layers, tie, buffers


def test_layers_past_the_config_are_not_weights():
    """DeepSeek-V3 stores its MTP module as layer 61 of 61: stored, reported, not loaded."""
    mtp = [("model.layers.2.eh_proj.weight", "BF16", (8, 16)), ("model.layers.2.shared_head.head.weight", "BF16", (100, 8))]
    sw = stored_weights(_llama_like(extra=mtp), _Shape())
    assert sw.layer_bytes == 2 * (64 + 8) * 2 and sw.total_bytes == sw.stored_bytes - (128 + 800) * 2
    assert [(k, n) for _, n, k in sw.unused] == [(2, (128 + 800) * 2)] and "MTP" in sw.unused[0][0]


def test_a_stored_head_of_a_tied_model_counts_once():
    sw = stored_weights(_llama_like(), _Shape(tie=True))
    assert sw.head_bytes == 0 and sw.embed_bytes == 1600 and sw.unused[0][1:] == (1600, 1)


def test_mask_buffers_and_quantization_state():
    fp8 = [("model.layers.0.self_attn.q_proj.weight_scale_inv", "F32", (1, 1)),
           ("model.layers.0.attn.masked_bias", "F32", ()), ("transformer.h.0.attn.bias", "BOOL", (1, 1, 4, 4))]
    sw = stored_weights(_llama_like(2, "F8_E4M3", extra=fp8), _Shape(),
                        {"quantization_config": {"quant_method": "fp8"}})
    assert sw.dtype == "fp8" and sw.layer_quant_bytes == 4 and sw.quant_bytes == 4
    assert sw.unused[0][1:] == (4 + 16, 2)
    assert dict(sw.by_dtype)["F8_E4M3"] == 100 * 8 * 2 + 8 + 2 * (64 + 8)


@pytest.mark.parametrize("qc, dtype", [
    ({"quant_method": "gptq"}, "gptq-int4"), ({"quant_method": "awq"}, "awq-int4"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "nf4"),
    ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "int8"), ({"quant_method": "mxfp4"}, "mxfp4"),
    ({"quant_method": "compressed-tensors"}, None),
])
def test_checkpoint_dtype_from_the_quantization_config(qc, dtype):
    assert stored_weights(_llama_like(), _Shape(), {"quantization_config": qc}).dtype == dtype


def test_unknown_or_empty_headers_are_refused():
    with pytest.raises(CheckpointError, match="'F9'"):
        stored_weights([("x", "F9", (1,))])
    with pytest.raises(CheckpointError, match="no tensors"):
        stored_weights([])


def test_prediction_uses_the_checkpoint_only_as_loaded():
    """Stored bf16 bytes stand in for bf16 weights; loaded as nf4 or trained with fp32 amp parameters they do not."""
    t = meta_checkpoint_or_skip("Qwen2.5-0.5B")
    from formulas.catalog import get_shape

    sw = stored_weights(t, get_shape("Qwen2.5-0.5B"), load_config("Qwen2.5-0.5B"))
    doubled = type(sw)(**{**sw.__dict__, "layer_bytes": 2 * sw.layer_bytes})  # a checkpoint the formula would not give
    p = predict(Spec(model="Qwen2.5-0.5B", dtype="bf16"), checkpoint=doubled)
    assert p.weights_source == "checkpoint" and p.breakdown["weights"] == doubled.total_bytes
    nf4 = predict(Spec(model="Qwen2.5-0.5B", dtype="nf4"), checkpoint=doubled)
    assert nf4.weights_source == "formula" and nf4.breakdown["weights"] == predict(
        Spec(model="Qwen2.5-0.5B", dtype="nf4")).breakdown["weights"]
    assert "stored as bf16, loaded as nf4 (--dtype bf16 loads it as stored)" in nf4.notes[0]
    amp = predict(Spec(model="Qwen2.5-0.5B", dtype="bf16", mode="train", precision="amp"), checkpoint=doubled)
    assert amp.weights_source == "formula" and "recast on loading" in amp.notes[0]


def meta_checkpoint_or_skip(model):
    pytest.importorskip("transformers")
    return meta_checkpoint(load_config(model))


def test_configs_as_newer_transformers_save_them():
    """save_pretrained of transformers 5.2x writes sliding_window 0 for a Qwen2-MoE without one, and Qwen3-MoE's
    num_experts as num_local_experts: both are the same model as the Hub's configs."""
    from formulas.shapes import shape_from_config
    from tiny_configs import TINY

    qwen3 = dict(TINY["qwen3_moe"])
    renamed = {**{k: v for k, v in qwen3.items() if k != "num_experts"}, "num_local_experts": qwen3["num_experts"]}
    assert shape_from_config(renamed, "a").n_params == shape_from_config(qwen3, "b").n_params
    no_window = shape_from_config({**TINY["qwen2_moe"], "sliding_window": 0, "use_sliding_window": False}, "c")
    assert no_window.sliding_window == 0


# ------------------------------------------------------------------ what a review of this module found

def test_a_failing_hub_is_one_line_without_retries(tmp_path):
    """A Hub answering 503 (an outage, a proxy): one line at once, not minutes of huggingface_hub's backoff."""
    with HubServer({}, status=503) as down:
        t0 = time.monotonic()
        r = vramlab("predict", "--model", "acme/anything", env={"HF_HOME": str(tmp_path), "HF_ENDPOINT": down.url})
        took = time.monotonic() - t0
        asked = len(down.requests)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "answered 503 for config.json; try again later" in r.stderr
    assert asked == 1 and took < 15


def test_an_endpoint_that_is_not_http_is_one_line(tmp_path):
    with NotHttpServer() as ssh:
        r = vramlab("predict", "--model", "acme/anything", env={"HF_HOME": str(tmp_path), "HF_ENDPOINT": ssh.url})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot reach" in r.stderr, r.stderr


def test_a_server_that_ignores_ranges_is_refused(tmp_path):
    pytest.importorskip("transformers")
    repo = _repo("Qwen2.5-0.5B", 1)
    single = {"config.json": repo["config.json"],
              "model.safetensors": next(v for k, v in repo.items() if k.endswith(".safetensors"))}
    with HubServer({"acme/q": single}, ignore_range=True) as hub:
        r = vramlab("predict", "--model", "acme/q", "--weights-from-checkpoint",
                    env={"HF_HOME": str(tmp_path), "HF_ENDPOINT": hub.url})
    assert r.returncode == 2 and "ignored the byte range" in r.stderr and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.parametrize("env", [{"TRANSFORMERS_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "yes"}])
def test_offline_as_huggingface_hub_reads_it(tmp_path, env):
    r = vramlab("predict", "--model", "acme/unknown", env={"HF_HOME": str(tmp_path), **env,
                                                           "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"})
    assert r.returncode == 2 and "offline" in r.stderr and "cannot reach" not in r.stderr, r.stderr


@pytest.mark.parametrize("var", ["HUGGINGFACE_HUB_CACHE", "HF_HOME"])
def test_the_cache_is_found_as_huggingface_hub_finds_it(tmp_path, var):
    """The legacy HUGGINGFACE_HUB_CACHE, and $VARIABLES inside the paths, as huggingface_hub expands them."""
    build_cache(str(tmp_path), "acme/llama-8b", {"config.json": config_bytes("Llama-3.1-8B")})
    value = "$VRAMLAB_TEST_ROOT/hub" if var == "HUGGINGFACE_HUB_CACHE" else "$VRAMLAB_TEST_ROOT"
    r = vramlab("predict", "--model", "acme/llama-8b", "--json",
                env={var: value, "VRAMLAB_TEST_ROOT": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert weights_of(r.stdout) == formula_weights("Llama-3.1-8B")
    assert json.loads(r.stdout)["model_label"] == f"acme/llama-8b@{commit_of('acme/llama-8b')[:12]}"


def test_revisions_are_commits_refs_or_branches_never_paths(tmp_path):
    snap = build_cache(str(tmp_path), "acme/llama-8b", {"config.json": config_bytes("Llama-3.1-8B")}, "refs/pr/1")
    env = {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    for rev in ("refs/pr/1", commit_of("acme/llama-8b")):
        assert vramlab("predict", "--model", f"acme/llama-8b@{rev}", env=env).returncode == 0
    for rev in ("..", "../../x", "/etc"):
        r = vramlab("predict", "--model", f"acme/llama-8b@{rev}", env=env)
        assert r.returncode == 2 and "not in the catalog and not a path" in r.stderr, r.stderr
    assert os.path.isdir(snap)


def test_a_local_folder_without_config_is_not_a_hub_id(tmp_path):
    os.makedirs(tmp_path / "acme" / "q")
    r = subprocess.run([sys.executable, "-m", "harness", "predict", "--model", "acme/q"], cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"},
                       capture_output=True, text=True)
    assert r.returncode == 2 and "directory has no config.json" in r.stderr, r.stderr


def test_a_bad_timeout_setting_is_one_line_and_spares_the_catalog(tmp_path):
    env = {"VRAMLAB_HUB_TIMEOUT": "abc", "HF_HOME": str(tmp_path)}
    assert vramlab("predict", "--model", "Llama-3.1-8B", env=env).returncode == 0
    r = vramlab("predict", "--model", "acme/anything", env=env)
    assert r.returncode == 2 and "VRAMLAB_HUB_TIMEOUT=abc" in r.stderr and r.stderr.count("\n") == 1


def _predict_from_checkpoint_file(folder, name, body):
    """`predict --weights-from-checkpoint` on a model folder holding a config.json and one checkpoint file."""
    with open(folder / "config.json", "wb") as f:
        f.write(config_bytes("Qwen2.5-0.5B"))
    with open(folder / name, "wb") as f:
        f.write(body)
    return vramlab("predict", "--model", str(folder), "--weights-from-checkpoint")


@pytest.mark.parametrize("header, why", [
    (b"[1, 2]", "not a JSON object"),
    (b'{"a": 5}', "needs a dtype string"),
    (b'{"a": {"dtype": "F32"}}', "needs a dtype string"),
    (b'{"a": {"dtype": "F32", "shape": null}}', "needs a dtype string"),
    (b'{"a": {"dtype": "F32", "shape": "12"}}', "needs a dtype string"),
    (b'{"a": {"dtype": "F32", "shape": [-1000000000, 1]}}', "non-negative integers"),
    (b'{"a": {"dtype": "F32", "shape": [1.5]}}', "non-negative integers"),
    (b'{"a": {"dtype": "F9", "shape": [1]}}', "'F9' is not one this reader knows"),
    (b"\xff\xfe", "not JSON"),
])
def test_malformed_local_headers_are_one_line(tmp_path, header, why):
    r = _predict_from_checkpoint_file(tmp_path, "model.safetensors", len(header).to_bytes(8, "little") + header)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and why in r.stderr, r.stderr


@pytest.mark.parametrize("index, why", [
    (b'{"weight_map": {"a": 5}}', "not a file inside the checkpoint"),
    (b'{"weight_map": {"a": "/etc/passwd"}}', "not a file inside the checkpoint"),
    (b'{"weight_map": {"a": "../x.safetensors"}}', "not a file inside the checkpoint"),
    (b'{"weights": {}}', "without a weight_map"),
])
def test_malformed_indexes_are_one_line(tmp_path, index, why):
    r = _predict_from_checkpoint_file(tmp_path, "model.safetensors.index.json", index)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and why in r.stderr, r.stderr


def test_a_quantization_the_formula_does_not_model_is_used_as_stored_only_for_a_float_dtype():
    t = meta_checkpoint_or_skip("Qwen2.5-0.5B")
    from formulas.catalog import get_shape

    cfg = {**load_config("Qwen2.5-0.5B"), "quantization_config": {"quant_method": "compressed-tensors"}}
    sw = stored_weights(t, get_shape("Qwen2.5-0.5B"), cfg)
    assert sw.dtype is None and sw.quant_method == "compressed-tensors"
    bf16 = predict(Spec(model="Qwen2.5-0.5B", dtype="bf16"), checkpoint=sw)
    assert bf16.weights_source == "checkpoint" and "compressed-tensors (not modelled by the formula)" in bf16.notes[0]
    nf4 = predict(Spec(model="Qwen2.5-0.5B", dtype="nf4"), checkpoint=sw)
    assert nf4.weights_source == "formula" and "a float --dtype loads it as stored" in nf4.notes[0]
    amp = predict(Spec(model="Qwen2.5-0.5B", dtype="bf16", mode="train", precision="amp"), checkpoint=sw)
    assert amp.weights_source == "formula" and "recast on loading" in amp.notes[0]
    assert stored_weights(t, None, {"quantization_config": {"quant_method": "gptq", "bits": 8}}).dtype is None
