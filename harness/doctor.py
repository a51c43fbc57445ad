"""`vramlab doctor`: is this machine ready to measure? Every check a sweep depends on, one row each.

On a GPU: NVML (device, driver, whether the driver reports this process), torch's CUDA and its GPU
against NVML's, bitsandbytes' 4-bit and int8 kernels, peft's bitsandbytes LoRA layers, the tracer,
and three small experiments measured twice — category tracker off and on — each in a fresh
process, to show the tracker leaves the measured peak alone and what it costs. Without a GPU the GPU
rows say so and the rest still run (bitsandbytes and peft on the CPU, the tracer).

A check is `Check(name, status, detail)` with status ok | warn | fail | skip; doctor fails (exit 1)
when any check fails. Every check runs even when an earlier one failed.
"""

import json
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from importlib import metadata

from formulas.units import MiB

from .gpu import nvml

OLDEST_TRANSFORMERS = (5, 17)  # pyproject.toml's lower bound
PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "nvidia-ml-py", "pandas", "numpy", "pyyaml")
# The measured experiments: one of each kind a sweep runs, small enough for any GPU.
EXPERIMENTS = (
    dict(model="Qwen/Qwen2.5-0.5B", mode="inference", dtype="bf16", seq=256, batch=2, gen=8),
    dict(model="Qwen/Qwen2.5-0.5B", mode="train", method="lora", dtype="bf16", seq=256, batch=2),
    dict(model="Qwen/Qwen2.5-0.5B", mode="train", method="qlora", dtype="bf16", seq=256, batch=2, grad_ckpt=True),
)
# A tiny Llama for the CPU-side checks (built in a second, no download).
TINY = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 176, "vocab_size": 1000, "max_position_embeddings": 512}


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail | skip
    detail: str = ""
    data: dict = field(default_factory=dict)


def _version(pkg):
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def check_packages():
    versions = {p: _version(p) for p in PACKAGES}
    missing = [p for p, v in versions.items() if v is None and p not in ("bitsandbytes", "nvidia-ml-py")]
    tf = versions["transformers"]
    old = tf and tuple(int(x) for x in tf.split(".")[:2] if x.isdigit()) < OLDEST_TRANSFORMERS
    status = "fail" if missing or old else ("warn" if None in (versions["bitsandbytes"], versions["nvidia-ml-py"]) else "ok")
    detail = " · ".join(f"{p} {v or 'missing'}" for p, v in versions.items())
    if old:
        detail += f" · transformers older than {'.'.join(map(str, OLDEST_TRANSFORMERS))}"
    return Check("packages", status, detail, versions)


def check_nvml():
    info = nvml.device_info(0)
    if info is None:
        return Check("NVML", "skip", "no NVIDIA driver (NVML not available)")
    n = nvml.device_count()
    used = nvml.used_bytes(0)
    procs = nvml.processes(0)
    detail = (f"{n} GPU(s); GPU 0 {info['name']}, driver {info.get('driver')}, CUDA {info.get('cuda_driver')}, "
              f"{info.get('memory_total_bytes', 0) / 2**30:.1f} GiB, {used / MiB:,.0f} MiB in use by "
              f"{len(procs)} process(es)")
    return Check("NVML", "warn" if procs else "ok", detail + (" — measurements will be flagged" if procs else ""), info)


def check_cuda():
    import torch

    if not torch.cuda.is_available():
        return Check("CUDA", "skip", f"torch {torch.__version__} sees no CUDA device")
    from .gpu.measure import reconcile_index

    props = torch.cuda.get_device_properties(0)
    index, corrected = reconcile_index(0, props.uuid, nvml.device_uuid)
    detail = f"{props.name}, {props.total_memory / 2**30:.1f} GiB, torch {torch.__version__} CUDA {torch.version.cuda}"
    if corrected:
        return Check("CUDA", "warn", detail + f"; torch's GPU 0 is NVML's GPU {index} (set CUDA_DEVICE_ORDER=PCI_BUS_ID)")
    return Check("CUDA", "ok", detail)


def _tiny_spec(tmp, **fields):
    from formulas.catalog import get_shape
    from formulas.spec import Spec, validate

    path = os.path.join(tmp, "config.json")
    with open(path, "w") as f:
        json.dump(TINY, f)
    return validate(Spec(model=path, seq=16, **fields), get_shape(path))


def check_bitsandbytes(device):
    try:
        import bitsandbytes as bnb
        import torch
    except ImportError as e:
        return Check("bitsandbytes", "fail", f"cannot import: {e}")
    try:
        w = torch.randn(128, 64, device=device, dtype=torch.bfloat16)
        w4, qs = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4",
                                              quant_storage=torch.uint8)
        x = torch.randn(4, 64, device=device, dtype=torch.bfloat16)
        y = bnb.matmul_4bit(x, w4.t(), quant_state=qs)
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(w.to(torch.float16))
    except Exception as e:
        return Check("bitsandbytes", "fail", f"{bnb.__version__} on {device}: {type(e).__name__}: {e}")
    return Check("bitsandbytes", "ok", f"{bnb.__version__}: nf4 quantize + matmul {tuple(y.shape)} and int8 quantize on {device}")


def check_peft_wrappers(device):
    try:
        import peft
    except ImportError as e:
        return Check("peft LoRA layers", "fail", f"cannot import: {e}")
    from .gpu.build import build_on_device

    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method, dtype in (("qlora", "nf4"), ("lora", "int8")):
            try:
                model = build_on_device(_tiny_spec(tmp, mode="train", method=method, dtype=dtype), device=device)
            except Exception as e:
                return Check("peft LoRA layers", "fail", f"{method} {dtype}: {type(e).__name__}: {e}")
            found[dtype] = sorted({type(m).__module__.rsplit(".", 1)[-1] + "." + type(m).__name__
                                   for m in model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)})
    ok = found == {"nf4": ["bnb.Linear4bit"], "int8": ["bnb.Linear8bitLt"]}
    return Check("peft LoRA layers", "ok" if ok else "fail",
                 f"peft {peft.__version__}: nf4 → {', '.join(found['nf4'])}, int8 → {', '.join(found['int8'])}", found)


def check_tracer():
    from formulas.predict import predict

    from .tracing.tracer import trace

    with tempfile.TemporaryDirectory() as tmp:
        spec = _tiny_spec(tmp, gen=2)
        t0 = time.perf_counter()
        result = trace(spec)
        pred = predict(spec).phases["decode"]["kv_cache"]
    status = "ok" if result.phases["decode"]["kv_cache"] == pred else "fail"
    return Check("tracer", status, f"tiny Llama prefill + 2 decode steps traced in {time.perf_counter() - t0:.1f} s; "
                                   f"KV cache {result.phases['decode']['kv_cache']:,} B traced, {pred:,} B predicted")


def measure_pairs(out_dir, progress=None):
    """The experiments, measured with the tracker off and on, each in a fresh process; [(off, on)] records."""
    from .records import RecordError, read_record, record_path
    from .sweep.launcher import run_sweep
    from .sweep.schema import expand_sweep

    pairs = []
    for track in (False, True):
        exps = expand_sweep({"defaults": {"timeout_s": 300, "track_categories": track},
                             "groups": [{"set": e} for e in EXPERIMENTS]}, "doctor")
        folder = os.path.join(out_dir, "tracker-on" if track else "tracker-off")
        run_sweep(exps, folder, mode="measure", progress=False)
        recs = []
        for e in exps:
            try:
                recs.append(read_record(record_path(folder, e.spec_hash)))
            except RecordError as err:
                recs.append({"spec": e.spec.to_dict(), "outcome": "no record", "error": {"message": str(err)}})
        pairs.append(recs)
        if progress:
            progress(f"measured {len(exps)} experiments, tracker {'on' if track else 'off'}")
    return list(zip(*pairs))


def _mib(n):
    return "n/a (NVML did not say)" if n is None else f"{n / MiB:,.0f} MiB"


def check_measurements(pairs):
    """Rows for the measured experiments: tracker on vs off (peak allocated must not move), its overhead."""
    checks = []
    for off, on in pairs:
        s = off["spec"]
        name = f"measure {s['mode']} {s['method'] if s['mode'] == 'train' else ''} {s['dtype']}".replace("  ", " ")
        if off["outcome"] != "ok" or on["outcome"] != "ok":
            bad = off if off["outcome"] != "ok" else on
            checks.append(Check(name, "fail", f"{bad['outcome']}: {(bad.get('error') or {}).get('message', '')[:200]}"))
            continue
        a, b = off["measured"], on["measured"]
        moved = b["peak_allocated_bytes"] - a["peak_allocated_bytes"]
        ta, tb = a["timings"]["workload_s"], b["timings"]["workload_s"]
        flagged = a["device_figures_flagged"] or b["device_figures_flagged"]
        status = "fail" if abs(moved) > 2 * MiB else ("warn" if flagged else "ok")
        detail = (f"peak allocated {a['peak_allocated_bytes'] / MiB:,.1f} MiB (tracker off) vs "
                  f"{b['peak_allocated_bytes'] / MiB:,.1f} MiB (on), {moved / MiB:+.2f} MiB; workload {ta:.2f} s → "
                  f"{tb:.2f} s with the tracker; context {_mib(a.get('cuda_context_bytes'))}; device peak "
                  f"{_mib(a.get('peak_device_bytes'))}" + ("; other processes on the GPU" if flagged else ""))
        checks.append(Check(name, status, detail, {"moved_bytes": moved, "workload_s_off": ta, "workload_s_on": tb}))
    return checks


def run_checks(out_dir=None, progress=None):
    """Every check, in order; GPU checks are skipped without a GPU."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notices are not findings
        return _run_checks(out_dir, progress)


def _run_checks(out_dir, progress):
    checks = [check_packages(), check_nvml()]
    torch_ok = checks[0].data.get("torch") is not None
    measured = []
    if torch_ok and nvml.device_count() > 0:
        # Measured first, while this process has no CUDA context of its own: the workers would see one as
        # another process on the GPU and flag every figure.
        measured = check_measurements(measure_pairs(out_dir or tempfile.mkdtemp(prefix="vramlab-doctor-"), progress))
    if torch_ok:
        checks.append(check_cuda())
        device = "cuda" if checks[-1].status != "skip" else "cpu"
        checks += [check_bitsandbytes(device), check_peft_wrappers(device), check_tracer()]
    checks += measured or [Check("measurement", "skip", "no NVIDIA GPU: nothing to measure (`vramlab run` traces instead)")]
    return checks


def to_json(checks):
    return [asdict(c) for c in checks]