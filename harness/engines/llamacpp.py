"""llama.cpp measured on the CPU: a GGUF of a real architecture, loaded by the engine, its log read.

llama.cpp prints the same model and KV buffer sizes on the CPU as on a GPU (only the device names
differ), and its CPU compute buffer comes from the same ggml-gallocr reserve. So a CPU run checks
formulas/engines/llamacpp.py without a GPU:

1. `write_random_gguf`: the GGUF header formulas/engines/convert.py derives from a config.json (every
   per-layer shape real, layers cut), written with gguf-py; the weights are zeros stored sparse (F16, F32
   norms, biases, routers) — values change no buffer llama.cpp allocates —, tokenizer "no_vocab" with the
   model's vocabulary size, so no tokenizer is needed;
2. `quantize`: llama.cpp's own quantizer (llama_model_quantize) makes the Q4_K_M/Q8_0/… file — the types it
   picks are llama.cpp's, not the formula's;
3. `load_and_log`: llama_model_load_from_file + llama_init_from_model with the settings, every log
   line captured (llama_log_set); `parse_buffers` reads the buffer lines into bytes.
4. `dry_run`: a header-only file of a full-size model (no tensor data), loaded with no_alloc as common/fit.cpp
   measures — the KV, RS and compute sizes of 671 B models on a small disk.

A loader that accepts the file checks the tensor list and shapes against the architecture's
load_arch_tensors (a missing, extra or mis-shaped tensor is an error there).

Files are cached under $VRAMLAB_GGUF_CACHE (default ~/.cache/vramlab/gguf; a quantized 4-layer file is up to a
few GiB); nothing is downloaded. Needs the `engines` extra (llama-cpp-python, gguf, numpy).
"""

import ctypes
import dataclasses
import hashlib
import json
import os
import re
import time

from formulas.engines.convert import convert_config
from formulas.engines.gguf import GGUF_DEFAULT_ALIGNMENT
from formulas.engines.llamacpp import MIB, LlamaCppSettings, cut_config, model_for, predict_model
from formulas.engines.quantize import FTYPES, ftype_of

KV_GGML = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "bf16": 30,
           "iq4_nl": 20}  # ggml.h GGML_TYPE_*
_BUFFER = re.compile(r"^(\w+):\s+(\S+) (model|KV|RS|compute) buffer size =\s+([\d.]+) MiB", re.M)
_CELLS = re.compile(r"llama_context: n_ctx\s+= (\d+)")
_KV_SIZE = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells")
_GGUF_TYPES = {"F32": "F32", "F16": "F16", "BF16": "F16"}  # random sources are written F32 / F16


def cache_dir():
    """Where generated GGUF files are kept."""
    d = os.environ.get("VRAMLAB_GGUF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vramlab", "gguf")
    os.makedirs(d, exist_ok=True)
    return d


def experiment_config(model, n_layers=0, config=None):
    """(config dict, label) of a catalog model or config file, cut to its first `n_layers` layers (0 = all)."""
    from formulas.catalog import load_config

    cfg = dict(config) if config is not None else dict(load_config(model))
    if n_layers:
        cfg = cut_config(cfg, n_layers)
    return cfg, model


def _kv_value(writer, key, value):
    import gguf

    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, list):
        if value and isinstance(value[0], bool):
            writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.BOOL)
        elif value and isinstance(value[0], int):
            writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
        else:
            writer.add_array(key, value)
    else:
        raise TypeError(f"GGUF metadata {key}: {type(value).__name__} not written")


def write_random_gguf(model, path, seed=0):
    """Write `model` (a float GGUFModel) as a GGUF file whose weights are zeros, stored sparse.

    The header (metadata, tensor infos, offsets) is gguf-py's; the data section is left as a hole of the
    right length (the file is truncated to its size), so a 20 GB layer costs no disk and no write time.
    The values change no buffer llama.cpp allocates; the quantizer turns the zeros into real blocks."""
    import gguf
    import numpy as np

    tmp = f"{path}.{os.getpid()}.tmp"  # concurrent workers may make the same file: each its own temp, one rename
    w = gguf.GGUFWriter(tmp, model.arch)
    for key, value in model.metadata.items():
        if key in ("general.architecture", "general.alignment"):
            continue
        if key == "general.file_type":
            w.add_file_type(1)  # MOSTLY_F16
            continue
        _kv_value(w, key, value)
    w.add_tokenizer_model("no_vocab")
    end = 0
    for t in model.tensors:
        typ = _GGUF_TYPES.get(t.ggml_type)
        if typ is None:
            raise ValueError(f"{t.name}: source type {t.ggml_type} is not written by this writer")
        dt = np.float32 if typ == "F32" else np.float16
        nbytes = t.numel * np.dtype(dt).itemsize
        w.add_tensor_info(t.name, tuple(reversed(t.shape)), np.dtype(dt), nbytes)
        end += -(-nbytes // GGUF_DEFAULT_ALIGNMENT) * GGUF_DEFAULT_ALIGNMENT
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.fout[0].flush()
    start = w.fout[0].tell()
    w.close()
    with open(tmp, "r+b") as f:
        f.truncate(-(-start // GGUF_DEFAULT_ALIGNMENT) * GGUF_DEFAULT_ALIGNMENT + end)
    os.replace(tmp, path)
    return path


def quantize(src, dst, dtype, threads=2):
    """Quantize `src` to `dst` with llama.cpp's quantizer at GGUF `dtype` (q4_k_m, q8_0, iq4_xs …)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype_of(dtype)][0]
    params.nthread = threads
    tmp = f"{dst}.{os.getpid()}.tmp"
    rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {src} → {dtype} failed with {rc}")
    os.replace(tmp, dst)
    return dst


def source_model(cfg, label):
    """The F16 GGUFModel the random writer makes for a config (convert_hf_to_gguf at --outtype f16)."""
    cfg = dict(cfg)
    cfg.pop("quantization_config", None)  # gpt-oss: experts written F16 here, quantized by llama.cpp below
    return convert_config(cfg, "f16", label)


def cached_gguf(cfg, label, dtype):
    """Path of a quantized random GGUF of config `cfg` at `dtype`, made once (keyed by the config's hash)."""
    src = source_model(cfg, label)
    # keyed by the header written (metadata and tensors), so a changed conversion never reuses a stale file
    header = json.dumps([sorted((k, repr(v)) for k, v in src.metadata.items()), [list(map(str, (t.name, t.ggml_type,
                                                                                              t.shape))) for t in src.tensors]])
    key = hashlib.sha256(header.encode()).hexdigest()[:12]
    stem = f"{label.replace('/', '--')}-L{src.key('block_count')}-{key}"
    d = cache_dir()
    f16 = os.path.join(d, stem + "-f16.gguf")
    out = os.path.join(d, f"{stem}-{ftype_of(dtype)}.gguf")
    if not os.path.exists(out):
        if not os.path.exists(f16):
            write_random_gguf(src, f16)
        with _quiet():
            quantize(f16, out, dtype)
    return out


class _quiet:
    """Capture llama.cpp's log (all levels) while in the block; `.text` holds it."""

    def __enter__(self):
        import llama_cpp

        self.parts = []

        def cb(level, text, user):
            self.parts.append(text.decode("utf-8", "replace") if text else "")

        self._cb = llama_cpp.llama_log_callback(cb)  # kept alive while set
        llama_cpp.llama_log_set(self._cb, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc):
        self.text = "".join(self.parts)
        return False


def load_and_log(path, settings, threads=1, no_alloc=False):
    """Load `path` on the CPU with `settings` (LlamaCppSettings) and return llama.cpp's log and the model size.

    no_alloc: llama.cpp's dry run (the one common/fit.cpp uses): nothing allocated, buffer sizes still computed."""
    import llama_cpp

    s = settings
    with _quiet() as q:
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP if s.use_mmap else llama_cpp.LLAMA_LOAD_MODE_NONE
        mp.use_extra_bufts = False  # no CPU_REPACK copies: one host model buffer, as on a GPU machine's host
        mp.no_alloc = bool(no_alloc)
        model = llama_cpp.llama_model_load_from_file(path.encode(), mp)
        if not model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        model_size = llama_cpp.llama_model_size(model)
        try:
            cp = llama_cpp.llama_context_default_params()
            cp.n_ctx = s.ctx
            cp.n_batch = s.batch
            cp.n_ubatch = s.ubatch
            cp.n_seq_max = max(s.parallel, 1)
            cp.n_threads = cp.n_threads_batch = threads
            cp.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if s.flash_attn
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
            cp.type_k = KV_GGML[s.kv_dtype]
            cp.type_v = KV_GGML[s.kv_dtype_v or s.kv_dtype]
            cp.kv_unified = bool(s.kv_unified)
            cp.swa_full = bool(s.swa_full)  # the library's default is true; llama-server's and vramlab's false
            ctx = llama_cpp.llama_init_from_model(model, cp)
            if not ctx:
                raise RuntimeError(f"llama.cpp refused the context ({s})")
            llama_cpp.llama_free(ctx)
        finally:
            llama_cpp.llama_model_free(model)
    return q.text, model_size


def parse_buffers(log):
    """{model|KV|RS|compute: {buffer name: MiB as printed, summed over lines}} and the KV cells, off a llama.cpp log.

    A model with sliding-window layers prints two KV caches (the full and the SWA one) on the same buffer."""
    out = {"model": {}, "KV": {}, "RS": {}, "compute": {}}
    for _, buf, kind, mib in _BUFFER.findall(log):
        prev = out[kind].get(buf)
        out[kind][buf] = f"{float(prev) + float(mib):.2f}" if prev else mib
    m = _CELLS.search(log)
    out["kv_cells"] = int(m.group(1)) if m else None
    out["kv_sizes"] = [(float(a), int(b)) for a, b in _KV_SIZE.findall(log)]
    return out


def _mib(n):
    return f"{n / MIB:.2f}"


def _printed_sum(values):
    """Sum of printed MiB values, each rounded as printed (what a sum of the log lines gives)."""
    return sum(float(v) for v in values)


def measure(model, dtype, settings, n_layers=0, config=None):
    """One CPU experiment: predicted and logged buffers side by side, with the comparisons of the bar."""
    if settings.device != "cpu":
        settings = dataclasses.replace(settings, device="cpu")
    cfg, label = experiment_config(model, n_layers, config)
    src = source_model(cfg, label)
    gguf_model = model_for(src, None) if dtype in ("f16", "stored") else None
    t0 = time.perf_counter()
    path = cached_gguf(cfg, label, dtype)
    t1 = time.perf_counter()
    log, model_size = load_and_log(path, settings)
    t2 = time.perf_counter()
    if gguf_model is None:
        from formulas.engines.llamacpp import hparams_of, quant_facts
        from formulas.engines.quantize import quantize_model

        gguf_model = quantize_model(src, dtype, quant_facts(hparams_of(src)))
    pred = predict_model(gguf_model, settings)
    logged = parse_buffers(log)
    logged_model = _printed_sum(logged["model"].values())
    logged_kv = _printed_sum(logged["KV"].values())
    logged_rs = _printed_sum(logged["RS"].values())
    logged_compute = _printed_sum(logged["compute"].values())
    compute_ratio = (pred.host_compute_buffer_bytes / MIB) / logged_compute if logged_compute else None
    from formulas.engines.gguf import parse_header

    with open(path, "rb") as f:
        file_model, _ = parse_header(f.read(64 << 20), path)
    type_mismatch = [t.name for t, u in zip(sorted(file_model.tensors, key=lambda t: t.name),
                                            sorted(gguf_model.tensors, key=lambda t: t.name))
                     if t.ggml_type != u.ggml_type or t.name != u.name]
    kv_pred = pred.host_kv_buffer_bytes
    return {
        "engine": "llama.cpp", "device": "cpu", "source": "measured-on-cpu (llama-cpp-python log)",
        "model": model, "arch": gguf_model.arch, "n_layers": int(src.key("block_count")), "dtype": dtype,
        "gguf": os.path.basename(path), "config": cfg,
        "settings": dataclasses.asdict(settings),
        "logged": logged, "logged_model_size_bytes": model_size,
        "predicted": pred.to_json(),
        "check": {
            "tensor_types_equal": not type_mismatch, "tensor_type_mismatches": type_mismatch[:10],
            "tensor_bytes_equal": model_size == pred.model_tensor_bytes,
            "model_buffer_equal": _mib(pred.host_model_buffer_bytes) == f"{logged_model:.2f}",
            "kv_buffer_equal": abs(kv_pred / MIB - logged_kv) < 0.0051 * max(1, len(logged["kv_sizes"])),
            "rs_buffer_equal": _mib(pred.host_rs_buffer_bytes) == f"{logged_rs:.2f}",
            "kv_cells_equal": pred.kv_cells == logged["kv_cells"],
            "compute_ratio": compute_ratio,
            "compute_within_10pct": compute_ratio is not None and abs(compute_ratio - 1) <= 0.10,
        },
        "timings": {"gguf_s": round(t1 - t0, 3), "load_s": round(t2 - t1, 3)},
        "log_tail": [ln for ln in log.splitlines() if "buffer size" in ln or "n_ctx" in ln
                     or "llama_kv_cache: size" in ln][:24],
    }


def write_header_only(model, path):
    """A GGUF file of `model` with its real tensor types and shapes and no data (a hole of the right length):
    enough for llama.cpp's no_alloc dry run, which reads the header and never the weights."""
    import struct

    from formulas.engines.gguf import GGML_TYPES

    def kv(key, value):
        k = key.encode()
        out = struct.pack("<Q", len(k)) + k
        if isinstance(value, bool):
            return out + struct.pack("<I?", 7, value)
        if isinstance(value, int):
            return out + struct.pack("<II", 4, value)
        if isinstance(value, float):
            return out + struct.pack("<If", 6, value)
        if isinstance(value, str):
            v = value.encode()
            return out + struct.pack("<IQ", 8, len(v)) + v
        if value and isinstance(value[0], bool):
            return out + struct.pack("<IIQ", 9, 7, len(value)) + struct.pack(f"<{len(value)}?", *value)
        return out + struct.pack("<IIQ", 9, 5, len(value)) + struct.pack(f"<{len(value)}i", *value)

    meta = dict(model.metadata)
    meta["tokenizer.ggml.model"] = "no_vocab"
    body = b"".join(kv(k, v) for k, v in meta.items() if not hasattr(v, "n"))
    off, infos = 0, b""
    for t in model.tensors:
        n = t.name.encode()
        infos += struct.pack("<Q", len(n)) + n + struct.pack("<I", len(t.shape))
        infos += b"".join(struct.pack("<Q", d) for d in t.shape) + struct.pack("<IQ", GGML_TYPES[t.ggml_type][0], off)
        off += -(-t.nbytes // GGUF_DEFAULT_ALIGNMENT) * GGUF_DEFAULT_ALIGNMENT
    head = b"GGUF" + struct.pack("<IQQ", 3, len(model.tensors), len(meta)) + body + infos
    head += b"\0" * (-len(head) % GGUF_DEFAULT_ALIGNMENT)
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + off)
    return path


def dry_run(model, settings, path):
    """llama.cpp's own no_alloc dry run (what common/fit.cpp measures with) of a header-only file of `model`, on
    the CPU: (KV MiB as logged by `llama_kv_cache: size =`, RS MiB, compute MiB, cells), next to nothing allocated."""
    write_header_only(model, path)
    try:
        log, size = load_and_log(path, settings, no_alloc=True)
    finally:
        os.remove(path)
    b = parse_buffers(log)
    rs = re.findall(r"llama_memory_recurrent: size = +([\d.]+) MiB", log)
    return {"kv_mib": sum(x for x, _ in b["kv_sizes"]), "rs_mib": sum(float(x) for x in rs),
            "compute_mib": _printed_sum(b["compute"].values()), "kv_cells": b["kv_cells"], "model_size_bytes": size,
            "log_tail": [ln for ln in log.splitlines() if "size =" in ln][:12]}


def run_experiment(exp):
    """The `engine` figures of a sweep experiment with `engine: llama.cpp` (harness.sweep.worker)."""
    if exp.engine != "llama.cpp":
        raise NotImplementedError(f"engine {exp.engine!r}: only llama.cpp is measured (on the CPU)")
    settings = LlamaCppSettings(engine="llama.cpp", ctx=exp.ctx or exp.spec.seq, parallel=exp.parallel,
                                ubatch=exp.ubatch, flash_attn=exp.flash_attn, kv_dtype=exp.engine_kv_dtype, device="cpu")
    return measure(exp.spec.model, exp.spec.dtype, settings, n_layers=exp.cut_layers)


# ------------------------------------------------------------------ a sweep of its own: any config, any file type

def _grid(group, defaults):
    import itertools

    base = dict(defaults)
    base.update(group.get("set") or {})
    grid = group.get("grid") or {}
    keys = sorted(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        d = dict(base)
        d.update(zip(keys, values))
        yield d


def run_sweep(yaml_path, out_dir, only=None):
    """Run every experiment of an architecture sweep (experiments/llamacpp_arch.yaml), one record file each.

    A record is written atomically (temp file + rename) and named by the experiment's hash, so a rerun skips
    what is done; a failure is a record too (outcome "error", the reason in one line)."""
    import yaml

    from ..env import fingerprint

    with open(yaml_path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    os.makedirs(out_dir, exist_ok=True)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = fingerprint()
    done = 0
    for group in doc["groups"]:
        if only and group["name"] not in only:
            continue
        for d in _grid(group, doc.get("defaults") or {}):
            fields = {f.name for f in dataclasses.fields(LlamaCppSettings)}
            st = {k: v for k, v in d.items() if k in fields}
            st["device"] = "cpu"
            settings = LlamaCppSettings(**st)
            ident = json.dumps({"model": d["model"], "config": d.get("config"), "dtype": d["dtype"],
                                "layers": d.get("cut_layers", 0), "settings": dataclasses.asdict(settings)},
                               sort_keys=True)
            h = hashlib.sha256(ident.encode()).hexdigest()[:12]
            path = os.path.join(out_dir, f"{h}.json")
            if os.path.exists(path):
                continue
            config = None
            if d.get("config"):
                with open(os.path.join(root, d["config"]), encoding="utf-8") as f:
                    config = json.load(f)
            rec = {"schema": "vramlab-llamacpp-cpu-1", "id": h, "group": group["name"], "env": env}
            t0 = time.perf_counter()
            try:
                rec["engine"] = measure(d["model"], d["dtype"], settings, d.get("cut_layers", 0), config)
                rec["outcome"] = "ok"
            except Exception as e:  # noqa: BLE001 - one experiment's failure is its record
                rec["outcome"] = "error"
                rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                rec["experiment"] = json.loads(ident)
            rec["seconds"] = round(time.perf_counter() - t0, 2)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(rec, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
            done += 1
            c = rec.get("engine", {}).get("check", {})
            print(f"{h} {d['model']} {d['dtype']} ctx={settings.ctx} fa={settings.flash_attn}: {rec['outcome']} "
                  f"model={c.get('model_buffer_equal')} kv={c.get('kv_buffer_equal')} rs={c.get('rs_buffer_equal')} "
                  f"types={c.get('tensor_types_equal')} compute={c.get('compute_ratio')} {rec.get('error', '')}",
                  flush=True)
    return done


DRY_RUN_MODELS = (  # full size, as published: (model, dtype); dtype None = the engine's default for the config
    ("DeepSeek-R1", "ud-iq1_s"), ("DeepSeek-R1", "q4_k_m"), ("deepseek-ai/DeepSeek-V2-Lite", "q4_k_m"),
    ("openai/gpt-oss-20b", "mxfp4_moe"), ("openai/gpt-oss-120b", "mxfp4_moe"), ("Qwen/Qwen3-30B-A3B", "q4_k_m"),
    ("Qwen/Qwen3.5-35B-A3B", "q4_k_m"), ("Qwen/Qwen3.5-27B", "q4_k_m"), ("Qwen/Qwen3-Next-80B-A3B-Instruct", "q4_k_m"),
    ("nvidia/Nemotron-H-56B-Base-8K", "q4_k_m"), ("mistralai/Mixtral-8x7B-v0.1", "q4_k_m"),
    ("meta-llama/Llama-3.1-70B", "q4_k_m"), ("DeepSeek-R1-Distill-Qwen-32B", "q4_k_m"), ("Qwen/Qwen3-32B", "q4_k_m"),
    ("experiments/llamacpp_configs/google--gemma-3-12b-it.text.json", "q4_k_m"),
    ("experiments/llamacpp_configs/google--gemma-2-9b.json", "q4_k_m"),
    ("experiments/llamacpp_configs/THUDM--GLM-4-9B-0414.json", "q4_k_m"),
    ("experiments/llamacpp_configs/microsoft--Phi-3-mini-4k-instruct.json", "q4_k_m"),
    ("EleutherAI/pythia-12b", "q4_k_m"), ("HuggingFaceTB/SmolLM3-3B", "q4_k_m"),
)


def run_dry_sweep(out_dir, contexts=(4096, 32768)):
    """llama.cpp's no_alloc dry run (common/fit.cpp's measurement) of full-size models on the CPU: header-only
    files with the formula's tensor types; the KV, RS and compute sizes llama.cpp computes, one record each."""
    from formulas.catalog import load_config

    from ..env import fingerprint

    os.makedirs(out_dir, exist_ok=True)
    env = fingerprint()
    for name, dtype in DRY_RUN_MODELS:
        cfg = load_config(name)
        model = model_for(cfg, dtype, name)
        for ctx in contexts:
            for fa in (False, True):
                s = LlamaCppSettings(ctx=ctx, flash_attn=fa, device="cpu")
                h = hashlib.sha256(json.dumps([name, dtype, dataclasses.asdict(s)], sort_keys=True).encode()).hexdigest()[:12]
                path = os.path.join(out_dir, f"{h}.json")
                if os.path.exists(path):
                    continue
                d = dry_run(model, s, os.path.join(cache_dir(), f"dry-{h}.gguf"))
                pred = predict_model(model, s)
                rec = {"schema": "vramlab-llamacpp-dryrun-1", "id": h, "env": env, "model": name, "dtype": dtype,
                       "arch": model.arch, "settings": dataclasses.asdict(s), "logged": d,
                       "predicted": {"kv_bytes": pred.host_kv_buffer_bytes, "rs_bytes": pred.host_rs_buffer_bytes,
                                     "compute_bytes": pred.host_compute_buffer_bytes, "kv_cells": pred.kv_cells,
                                     "tensor_bytes": pred.model_tensor_bytes}}
                tmp = f"{path}.{os.getpid()}.tmp"
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(rec, f, indent=1, sort_keys=True)
                os.replace(tmp, path)
                print(f"{h} {name} {dtype} ctx={ctx} fa={fa}: KV {d['kv_mib']} / {pred.host_kv_buffer_bytes / MIB:.2f}"
                      f", compute {d['compute_mib']} / {pred.host_compute_buffer_bytes / MIB:.2f}", flush=True)


def summarize(folder):
    """Markdown table of a folder of engine records: per model × dtype, how many matched the bar."""
    import glob

    from formulas.documents import load_json

    rows, worst = {}, {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):  # llama.cpp's records (engine_record.schema.json)
        rec = load_json(path)
        eng = rec.get("engine")
        if rec.get("outcome") != "ok" or not eng:
            exp = rec.get("experiment") or rec.get("spec") or {}
            key = ("?", exp.get("model", "?"), exp.get("dtype", "?"))
            rows.setdefault(key, [0, 0, 0, 0, 0])[4] += 1
            continue
        c = eng["check"]
        key = (eng.get("arch", "?"), eng["model"], eng["dtype"])
        r = rows.setdefault(key, [0, 0, 0, 0, 0])
        r[0] += 1
        r[1] += c["model_buffer_equal"] and c["tensor_bytes_equal"]
        r[2] += c["kv_buffer_equal"] and c["kv_cells_equal"] and c.get("rs_buffer_equal", True)
        r[3] += c["compute_within_10pct"]
        w = worst.setdefault(key, [c["compute_ratio"], c["compute_ratio"]])
        w[0], w[1] = min(w[0], c["compute_ratio"]), max(w[1], c["compute_ratio"])
    lines = ["| arch | model (layers cut) | dtype | runs | model buffer equal | KV/RS buffers + cells equal "
             "| compute within 10% | compute predicted/logged (min–max) | failed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (arch, model, dtype), (n, mb, kv, cb, bad) in sorted(rows.items()):
        lo, hi = worst.get((arch, model, dtype), (float("nan"), float("nan")))
        lines.append(f"| {arch} | {model} | {dtype} | {n} | {mb}/{n} | {kv}/{n} | {cb}/{n} | {lo:.3f}–{hi:.3f} | {bad} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    args = sys.argv[1:]
    if len(args) == 2 and args[0] == "summary" and os.path.isdir(args[1]):
        print(summarize(args[1]))
        sys.exit(0)
    if len(args) == 2 and args[0] == "dry-run":
        run_dry_sweep(args[1])
        sys.exit(0)
    if len(args) >= 3 and args[0] == "sweep":
        if not os.path.isfile(args[1]):
            print(f"{args[1]}: no such sweep file", file=sys.stderr)
            sys.exit(2)
        run_sweep(args[1], args[2], set(args[3:]) or None)
        sys.exit(0)
    print("usage: python -m harness.engines.llamacpp summary RECORD_FOLDER\n"
          "       python -m harness.engines.llamacpp sweep SWEEP.yaml RECORD_FOLDER [GROUP …]\n"
          "       python -m harness.engines.llamacpp dry-run RECORD_FOLDER", file=sys.stderr)
    sys.exit(2)
