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
    """Each case in a fresh process (a cold worker), so none sees another's context or cached blocks."""
    from harness.records import iter_records
    from harness.sweep.launcher import run_sweep
    from harness.sweep.schema import expand_sweep

    (exp,) = expand_sweep({"defaults": {**fields, "timeout_s": 300}}, "gpu-test.yaml")
    run_sweep([exp], str(tmp_path), mode="measure", progress=False)
    (rec,) = iter_records(str(tmp_path))
    assert rec["outcome"] == "ok", rec["error"]
    m = rec["measured"]
    assert m["process"]["mode"] == "cold" and m["process"]["experiment_in_process"] == 1
    assert abs(m["peak_allocated_bytes"] / predict(exp.spec).peak_allocated_bytes - 1) <= UNCALIBRATED_ALLOCATED_TOLERANCE
    assert m["cuda_context_bytes"] > 0 and m["peak_device_bytes"] >= m["peak_allocated_bytes"]
    assert not m["device_figures_flagged"], m["other_processes"]


# ------------------------------------------------------------------ the measurement's pieces, on the CPU

def test_own_process_is_found_by_the_pid_that_appears_at_cuda_init():
    """In a container the driver reports host pids: the run's own pid is not among them."""
    from harness.gpu.measure import own_nvml_pids

    assert own_nvml_pids(before=[111], after=[111, 98765], pid=4242) == {98765}
    assert own_nvml_pids(before=[], after=[4242], pid=4242) == {4242}
    assert own_nvml_pids(before=[111], after=[111], pid=4242) == set()  # the driver does not say: unknown


def test_the_nvml_index_follows_the_uuid_torch_sees(monkeypatch):
    from harness.gpu import measure, nvml

    uuids = {0: "GPU-aaaa-0001", 1: "GPU-bbbb-0002"}
    monkeypatch.setattr(nvml, "device_count", lambda: 2)
    assert measure.reconcile_index(0, "aaaa-0001", uuids.get) == (0, False)
    assert measure.reconcile_index(0, "bbbb-0002", uuids.get) == (1, True)
    monkeypatch.setenv("VRAMLAB_NVML_INDEX", "3")
    assert measure.nvml_index() == 3


def test_a_cap_leaves_the_allocator_the_card_minus_the_context():
    from formulas.hardware import get_hardware
    from harness.gpu.measure import cap_fraction, cap_for
    from harness.sweep.schema import Experiment

    ctx, total = 500 * 2**20, 141 * 2**30
    fraction, limit = cap_fraction(24 * 2**30, ctx, total)
    assert limit == 24 * 2**30 - ctx and fraction == pytest.approx(limit / total)
    with pytest.raises(ValueError, match="context alone"):
        cap_fraction(400 * 2**20, ctx, total)
    exp = Experiment(spec=Spec(model="gpt2"), cap_gpu="RTX 4090")
    assert cap_for(exp) == ("RTX 4090", get_hardware("RTX 4090").usable_bytes)
    assert cap_for(Experiment(spec=Spec(model="gpt2"))) is None


class _FakeCuda:
    """torch.cuda's peak counters, driven by the test."""

    def __init__(self):
        self.allocated = self.reserved = self.peak = self.peak_reserved = 0

    def synchronize(self):
        pass

    def max_memory_allocated(self):
        return self.peak

    def max_memory_reserved(self):
        return self.peak_reserved

    def reset_peak_memory_stats(self):
        self.peak, self.peak_reserved = self.allocated, self.reserved

    def alloc(self, n):
        self.allocated += n
        self.reserved = max(self.reserved, self.allocated)
        self.peak, self.peak_reserved = max(self.peak, self.allocated), max(self.peak_reserved, self.reserved)


def test_an_oom_keeps_the_phases_before_it_and_names_the_one_that_failed():
    from types import SimpleNamespace

    from harness.gpu.measure import _PhaseStats, run_phases

    cuda = _FakeCuda()
    marks = []
    stats = _PhaseStats(SimpleNamespace(cuda=cuda), SimpleNamespace(mark=marks.append))

    def workload(mark):
        mark("load")
        cuda.alloc(1000)
        mark("prefill")
        cuda.alloc(500)
        mark("decode")
        cuda.alloc(200)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity …")

    oom, failed = run_phases(workload, stats)
    assert failed == "decode" and stats.completed == ["load", "prefill"] and marks == ["load", "prefill", "decode"]
    assert oom["requested_bytes"] == 2 * 2**30 and oom["type"] == "OutOfMemoryError"
    assert {p: v["max_allocated_bytes"] for p, v in stats.phases.items()} == {"load": 1000, "prefill": 1500,
                                                                             "decode": 1700}
    with pytest.raises(ValueError):  # any other error is not data
        run_phases(lambda mark: (_ for _ in ()).throw(ValueError("bug")), stats)


def test_the_worker_records_an_oom_with_what_was_measured(tmp_path, monkeypatch):
    from harness.gpu import measure
    from harness.records import read_record, record_path
    from harness.sweep.schema import Experiment
    from harness.sweep.worker import _process, run_and_record

    partial = {"peak_allocated_bytes": 1700, "phases": {"load": {"max_allocated_bytes": 1000}}}

    def fake_measure(exp, process=None):
        raise measure.MeasuredOOM(partial, {"type": "OutOfMemoryError", "message": "CUDA out of memory",
                                            "failed_phase": "decode", "completed_phases": ["load", "prefill"]})

    monkeypatch.setattr(measure, "measure", fake_measure)
    exp = Experiment(spec=Spec(model="gpt2", seq=64))
    assert run_and_record(exp, str(tmp_path), "measure", _process("cold", 1)) == "oom"
    rec = read_record(record_path(str(tmp_path), exp.spec_hash))
    assert rec["outcome"] == "oom" and rec["measured"] == partial and rec["error"]["failed_phase"] == "decode"


def _live_peak_while(fn):
    """Run fn() under the tracker's storage log on real CPU tensors; (its result, peak live bytes)."""
    from harness.tracing.allocator import CachingAllocatorModel
    from harness.tracing.tracker import _replay, _tracker_class

    log = _tracker_class()(vocab=-1, device_type="cpu")
    with log:
        out = fn()
    log.active = False
    (peak, *_), *_ = _replay(log, CachingAllocatorModel())
    return out, peak


def _unique_bytes(model):
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[id(t.untyped_storage())] = t.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("dtype", ["bf16", "nf4"])
def test_build_allocates_a_tied_embedding_once(tmp_path, dtype):
    """Loading a tied model holds one embedding, as from_pretrained does (defect: lm_head got its own
    weight before tying: +1 embedding at load, and its freed block stayed reserved)."""
    if dtype == "nf4":
        pytest.importorskip("bitsandbytes")
    from harness.gpu.build import build_on_device
    from tiny_configs import write

    path = write(tmp_path, "qwen2", vocab_size=32000)  # tied; the embedding dwarfs the layers
    spec = validate(Spec(model=path, dtype=dtype), get_shape(path))
    model, peak = _live_peak_while(lambda: build_on_device(spec, device="cpu"))
    embedding = 32000 * 64 * 2
    final = _unique_bytes(model)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert peak - final < embedding / 4, (peak, final)


@pytest.mark.parametrize("dtype,layer", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_peft_wraps_bitsandbytes_layers_with_its_bitsandbytes_lora(tmp_path, dtype, layer):
    """Defect: the hand-built model lacked is_loaded_in_4bit/8bit, so peft chose its generic lora.Linear."""
    pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    from harness.gpu.build import build_on_device
    from tiny_configs import write

    path = write(tmp_path, "llama")
    spec = validate(Spec(model=path, mode="train", method="qlora" if dtype == "nf4" else "lora", dtype=dtype,
                         seq=16), get_shape(path))
    model = build_on_device(spec, device="cpu")
    wrapped = {type(m).__module__ + "." + type(m).__name__ for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert wrapped == {f"peft.tuners.lora.bnb.{layer}"}, wrapped


@pytest.mark.parametrize("fields", [dict(gen=3), dict(mode="train", method="lora"), dict(mode="train")],
                         ids=["inference", "lora", "full"])
def test_the_tracker_counts_real_tensors_as_it_counts_fake_ones(tmp_path, fields):
    """Measurement runs the tracer's tracker on the GPU's real tensors; on the CPU, with kernels that do
    not differ from CUDA's (fp32, eager attention, no dropout), real and fake counts are equal."""
    from harness.tracing.tracer import trace
    from harness.tracing.tracker import CategoryTracker
    from harness.workload.models import build_model
    from harness.workload.steps import run_inference, run_training
    from tiny_configs import write

    path = write(tmp_path, "llama")
    spec = validate(Spec(model=path, dtype="fp32", attn="eager", dropout=False, seq=16, batch=2, **fields),
                    get_shape(path))
    from formulas.overhead import DEFAULT_OVERHEADS

    model = build_model(spec)
    # the tracer logs the cuBLAS workspaces a GPU run allocates; the real run here is on the CPU: log the same
    ws = DEFAULT_OVERHEADS.workspace_bytes(spec)
    with CategoryTracker(model, spec, get_shape(path).vocab, device_type="cpu", workspace_bytes=ws) as tracker:
        run_inference(model, spec, tracker.mark) if spec.mode == "inference" else run_training(model, spec, tracker.mark)
    real, fake = tracker.result(), trace(spec)
    assert real.phases == fake.phases and real.peak_allocated_bytes == fake.peak_allocated_bytes
    assert real.breakdown == fake.breakdown


@pytest.mark.slow
@pytest.mark.parametrize("method,dtype", [("qlora", "nf4"), ("lora", "int8")], ids=["qlora", "int8-lora"])
@pytest.mark.parametrize("kbit", [True, False], ids=["kbit-prep", "no-kbit-prep"])
@pytest.mark.parametrize("ckpt", [True, False], ids=["ckpt", "no-ckpt"])
def test_quantized_lora_prediction_against_real_tensors(tmp_path, method, dtype, kbit, ckpt):
    """LoRA over bitsandbytes, built as a GPU run builds it (bitsandbytes layers, peft's bitsandbytes LoRA,
    kbit prep), run on real CPU tensors under the category tracker, against the predictor: the weights to
    the byte (kbit prep's fp32 embeddings, lm_head and norms included) and so the quantization state, the
    checkpointed activations to the byte (int8 layers keep their inputs outside checkpointing), the peak
    within 5%. (bitsandbytes' own
    dequantization buffers live inside its ops, where the tracker does not look.)"""
    pytest.importorskip("bitsandbytes")
    from harness.gpu.build import build_on_device
    from harness.tracing.tracker import CategoryTracker
    from harness.workload.steps import run_training
    from tiny_configs import write

    path = write(tmp_path, "llama", hidden_size=256, intermediate_size=704, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=4000)
    spec = validate(Spec(model=path, mode="train", method=method, dtype=dtype, seq=128, batch=2, kbit_prep=kbit,
                         grad_ckpt=ckpt, dropout=False, attn="eager"), get_shape(path))
    model = build_on_device(spec, device="cpu")
    with CategoryTracker(model, spec, get_shape(path).vocab, device_type="cpu") as tracker:
        run_training(model, spec, tracker.mark)
    real, pred = tracker.result(), predict(spec)
    assert real.phases["load"]["weights"] == pred.phases["load"]["weights"]
    assert real.phases["load"]["quant_state"] == pred.phases["load"]["quant_state"]
    if ckpt:
        assert real.phases["backward"]["activations"] == pytest.approx(pred.phases["backward"]["activations"], abs=8)
    assert real.peak_phase == pred.peak_phase
    # the CPU run allocates no cuBLAS workspace: its tensors against the prediction's
    tensors = pred.peak_allocated_bytes - pred.breakdown["workspaces"]
    assert abs(real.peak_allocated_bytes / tensors - 1) < 0.05
