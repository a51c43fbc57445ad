"""llama.cpp measured on the CPU: a random-weight GGUF of a real architecture, loaded by the engine, its log read.

llama.cpp prints the same model and KV buffer sizes on the CPU as on a GPU (only the device names
differ), and its CPU compute buffer comes from the same ggml-gallocr reserve. So a CPU run checks
formulas/engines/llamacpp.py without a GPU:

1. `write_random_gguf`: a GGUF (F16 matrices, F32 norms and biases) with the tensor list and
   hyper-parameters of a catalog model (layers may be cut; every per-layer shape is the real one),
   tokenizer "no_vocab" with the model's vocabulary size, so no tokenizer is needed;
2. `quantize`: llama.cpp's own quantizer (llama_model_quantize) makes the Q4_K_M/Q8_0/… file;
3. `load_and_log`: llama_model_load_from_file + llama_init_from_model with the settings, every log
   line captured (llama_log_set); `parse_buffers` reads the buffer lines into bytes.

Files are cached under $VRAMLAB_GGUF_CACHE (default ~/.cache/vramlab/gguf); nothing is downloaded.
Needs the `engines` extra (llama-cpp-python, gguf, numpy).
"""

import ctypes
import dataclasses
import os
import re
import time

from formulas.catalog import get_shape, load_config
from formulas.engines.llamacpp import MIB, LlamaCppSettings, gguf_tensors, predict_llamacpp
from formulas.shapes import shape_from_config

GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
FTYPES = {"q8_0": 7, "q4_0": 2, "q2_k": 10, "q3_k_m": 12, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}  # llama.h LLAMA_FTYPE_*
KV_GGML = {"f16": 1, "q4_0": 2, "q8_0": 8}  # ggml.h GGML_TYPE_*
_BUFFER = re.compile(r"^(\w+):\s+(\S+) (model|KV|compute) buffer size =\s+([\d.]+) MiB", re.M)
_CELLS = re.compile(r"llama_context: n_ctx\s+= (\d+)")
_MODEL_SIZE_NOTE = "llama_model_size(): sum of ggml_nbytes over the model's tensors"


def cache_dir():
    """Where generated GGUF files are kept."""
    d = os.environ.get("VRAMLAB_GGUF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vramlab", "gguf")
    os.makedirs(d, exist_ok=True)
    return d


def cut_shape(model, n_layers=0):
    """ModelShape of a catalog model with its first `n_layers` layers (0 = all), every shape otherwise real."""
    if not n_layers:
        return get_shape(model)
    cfg = dict(load_config(model))
    cfg["num_hidden_layers"] = n_layers
    if "layer_types" in cfg:
        cfg["layer_types"] = cfg["layer_types"][:n_layers]
    cfg.pop("max_window_layers", None)
    return shape_from_config(cfg, name=f"{get_shape(model).name}[:{n_layers}]")


def write_random_gguf(shape, path, seed=0):
    """Write an F16 GGUF of `shape` with random weights (llama.cpp tensor names, no tokenizer)."""
    import gguf
    import numpy as np

    arch = GGUF_ARCH.get(shape.model_type)
    if arch is None:
        raise ValueError(f"model_type {shape.model_type!r}: no GGUF writer (supported: {', '.join(GGUF_ARCH)})")
    rng = np.random.default_rng(seed)
    chunk = (rng.standard_normal(1 << 20, dtype=np.float32) * 0.02).astype(np.float16)  # tiled: sizes, not values, matter
    tmp = f"{path}.{os.getpid()}.tmp"  # concurrent workers may make the same file: each its own temp, one rename
    w = gguf.GGUFWriter(tmp, arch)
    w.add_context_length(max(shape.max_positions, 4096))
    w.add_embedding_length(shape.hidden)
    w.add_block_count(shape.n_layers)
    w.add_feed_forward_length(shape.intermediate)
    w.add_head_count(shape.n_heads)
    w.add_head_count_kv(shape.n_kv_heads)
    w.add_key_length(shape.head_dim)
    w.add_value_length(shape.head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(shape.vocab)
    w.add_tokenizer_model("no_vocab")
    w.add_file_type(1)  # MOSTLY_F16
    for name, _, typ, ne0, ne1 in gguf_tensors(shape, "q8_0"):  # names and shapes only; data is F16/F32 here
        if ne1 == 1:
            w.add_tensor(name, np.ones(ne0, dtype=np.float32))
        else:
            w.add_tensor(name, np.resize(chunk, (ne1, ne0)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return path


def quantize(src, dst, dtype, threads=2):
    """Quantize `src` to `dst` with llama.cpp's quantizer at GGUF `dtype` (q4_k_m, q8_0, …)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[dtype]
    params.nthread = threads
    tmp = f"{dst}.{os.getpid()}.tmp"
    rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {src} → {dtype} failed with {rc}")
    os.replace(tmp, dst)
    return dst


def cached_gguf(shape, dtype):
    """Path of a quantized random GGUF of `shape` at `dtype`, made once."""
    key = f"{shape.name.replace('/', '--')}-L{shape.n_layers}"
    d = cache_dir()
    f16 = os.path.join(d, key + "-f16.gguf")
    out = os.path.join(d, f"{key}-{dtype}.gguf")
    if not os.path.exists(out):
        if not os.path.exists(f16):
            write_random_gguf(shape, f16)
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


def load_and_log(path, settings, threads=1):
    """Load `path` on the CPU with `settings` (LlamaCppSettings) and return llama.cpp's log and the model size."""
    import llama_cpp

    s = settings
    with _quiet() as q:
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP if s.use_mmap else llama_cpp.LLAMA_LOAD_MODE_NONE
        mp.use_extra_bufts = False  # no CPU_REPACK copies: one host model buffer, as on a GPU machine's host
        model = llama_cpp.llama_model_load_from_file(path.encode(), mp)
        if not model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        model_size = llama_cpp.llama_model_size(model)
        try:
            cp = llama_cpp.llama_context_default_params()
            cp.n_ctx = s.ctx
            cp.n_batch = s.batch
            cp.n_ubatch = s.ubatch
            cp.n_seq_max = s.parallel
            cp.n_threads = cp.n_threads_batch = threads
            cp.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if s.flash_attn
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
            cp.type_k = cp.type_v = KV_GGML[s.kv_dtype]
            cp.kv_unified = bool(s.kv_unified)
            ctx = llama_cpp.llama_init_from_model(model, cp)
            if not ctx:
                raise RuntimeError(f"llama.cpp refused the context ({s})")
            llama_cpp.llama_free(ctx)
        finally:
            llama_cpp.llama_model_free(model)
    return q.text, model_size


def parse_buffers(log):
    """{model|KV|compute: {buffer name: MiB string as printed}} and the KV cells, read off a llama.cpp log."""
    out = {"model": {}, "KV": {}, "compute": {}}
    for _, buf, kind, mib in _BUFFER.findall(log):
        out[kind][buf] = mib
    m = _CELLS.search(log)
    out["kv_cells"] = int(m.group(1)) if m else None
    return out


def _mib(n):
    return f"{n / MIB:.2f}"


def measure(model, dtype, settings, n_layers=0):
    """One CPU experiment: predicted and logged buffers side by side, with the comparisons of the bar."""
    if settings.device != "cpu":
        settings = dataclasses.replace(settings, device="cpu")
    shape = cut_shape(model, n_layers)
    pred = predict_llamacpp(shape, dtype, settings)
    t0 = time.perf_counter()
    path = cached_gguf(shape, dtype)
    t1 = time.perf_counter()
    log, model_size = load_and_log(path, settings)
    t2 = time.perf_counter()
    logged = parse_buffers(log)
    logged_model_mib = sum(float(v) for v in logged["model"].values())
    logged_kv_mib = sum(float(v) for v in logged["KV"].values())
    logged_compute_mib = sum(float(v) for v in logged["compute"].values())
    tensor_bytes = sum(ggml for ggml in (_bytes(t) for t in gguf_tensors(shape, dtype)))
    compute_ratio = (pred.host_compute_buffer_bytes / MIB) / logged_compute_mib if logged_compute_mib else None
    return {
        "engine": "llama.cpp", "device": "cpu", "source": "measured-on-cpu (llama-cpp-python log)",
        "model": model, "n_layers": shape.n_layers, "dtype": dtype, "gguf": os.path.basename(path),
        "settings": dataclasses.asdict(settings),
        "logged": logged, "logged_model_size_bytes": model_size,
        "predicted": pred.to_json(),
        "check": {
            "tensor_bytes_equal": model_size == tensor_bytes,
            "model_buffer_equal": _mib(pred.host_model_buffer_bytes) == f"{logged_model_mib:.2f}",
            "kv_buffer_equal": _mib(pred.host_kv_buffer_bytes) == f"{logged_kv_mib:.2f}",
            "kv_cells_equal": pred.kv_cells == logged["kv_cells"],
            "compute_ratio": compute_ratio,
            "compute_within_10pct": compute_ratio is not None and abs(compute_ratio - 1) <= 0.10,
        },
        "timings": {"gguf_s": round(t1 - t0, 3), "load_s": round(t2 - t1, 3)},
        "log_tail": [ln for ln in log.splitlines() if "buffer size" in ln or "n_ctx" in ln][:20],
    }


def _bytes(t):
    from formulas.engines.llamacpp import ggml_row_bytes

    return ggml_row_bytes(t[2], t[3]) * t[4]


def run_experiment(exp):
    """The `engine` figures of a sweep experiment with `engine: llama.cpp` (harness.sweep.worker)."""
    if exp.engine != "llama.cpp":
        raise NotImplementedError(f"engine {exp.engine!r}: only llama.cpp is measured (on the CPU)")
    settings = LlamaCppSettings(engine="llama.cpp", ctx=exp.ctx or exp.spec.seq, parallel=exp.parallel,
                                ubatch=exp.ubatch, flash_attn=exp.flash_attn, kv_dtype=exp.engine_kv_dtype, device="cpu")
    return measure(exp.spec.model, exp.spec.dtype, settings, n_layers=exp.cut_layers)


def summarize(folder):
    """Markdown table of a folder of engine records: per model × dtype, how many matched the bar."""
    from ..records import iter_records

    rows, worst = {}, {}
    for rec in iter_records(folder):  # the one record reader: unreadable files are left out
        eng = rec.get("engine")
        if rec.get("outcome") != "ok" or not eng:
            key = (rec.get("spec", {}).get("model", "?"), rec.get("spec", {}).get("dtype", "?"))
            rows.setdefault(key, [0, 0, 0, 0, 0])[4] += 1
            continue
        c = eng["check"]
        key = (eng["model"], eng["dtype"])
        r = rows.setdefault(key, [0, 0, 0, 0, 0])
        r[0] += 1
        r[1] += c["model_buffer_equal"] and c["tensor_bytes_equal"]
        r[2] += c["kv_buffer_equal"] and c["kv_cells_equal"]
        r[3] += c["compute_within_10pct"]
        w = worst.setdefault(key, [c["compute_ratio"], c["compute_ratio"]])
        w[0], w[1] = min(w[0], c["compute_ratio"]), max(w[1], c["compute_ratio"])
    lines = ["| model (4 layers) | dtype | runs | model buffer equal | KV buffer + cells equal | compute within 10% "
             "| compute predicted/logged (min–max) | failed |", "|---|---|---|---|---|---|---|---|"]
    for (model, dtype), (n, mb, kv, cb, bad) in sorted(rows.items()):
        lo, hi = worst.get((model, dtype), (float("nan"), float("nan")))
        lines.append(f"| {model} | {dtype} | {n} | {mb}/{n} | {kv}/{n} | {cb}/{n} | {lo:.3f}–{hi:.3f} | {bad} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "summary":
        print("usage: python -m harness.engines.llamacpp summary RECORD_FOLDER", file=sys.stderr)
        sys.exit(2)
    if not os.path.isdir(sys.argv[2]):
        print(f"{sys.argv[2]}: no such folder", file=sys.stderr)
        sys.exit(2)
    print(summarize(sys.argv[2]))
