"""`--engine`: predict memory the way an inference engine budgets it, not as transformers holds it.

transformers (the default) is `formulas.predict`. llama.cpp / Ollama allocate a model, a KV and a
compute buffer per device (formulas.engines.llamacpp); vLLM and SGLang take a fraction of the card up
front and turn what the weights and a profiling run leave into KV-cache blocks (formulas.engines.vllm).
The engine's answer is printed as its own log lines, so a user can compare line by line; `--json`
adds an `engine` object and `peak_device_bytes` becomes what nvidia-smi would show under that engine.
Pure Python: no torch is imported.
"""

from formulas.units import GiB, parse_size

ENGINES = ("transformers", "llama.cpp", "ollama", "vllm", "sglang")
_LLAMA_KV = ("f16", "q8_0", "q4_0")
_VLLM_KV = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
_LLAMA = ("llama.cpp", "ollama")
_POOLED = ("vllm", "sglang")

# Every engine flag: dest → (the flag as typed, the engines it applies to, the value that means "not given").
# `check_engine_flags` refuses a flag given to an engine it does not apply to, and range-checks every number.
ENGINE_FLAGS = {
    "ctx": ("--ctx", _LLAMA, 0),
    "parallel": ("--parallel", _LLAMA, None),
    "ubatch": ("--ubatch", _LLAMA, 512),
    "flash_attn": ("--flash-attn", _LLAMA, None),
    "gpu_layers": ("--gpu-layers", _LLAMA, "all"),
    "ollama_version": ("--ollama-version", ("ollama",), None),
    "gpu_total": ("--gpu-total", _POOLED, None),
    "model_dtype": ("--model-dtype", _POOLED, None),
    "gpu_memory_utilization": ("--gpu-memory-utilization", ("vllm",), None),
    "max_model_len": ("--max-model-len", ("vllm",), None),
    "max_num_seqs": ("--max-num-seqs", ("vllm",), None),
    "max_num_batched_tokens": ("--max-num-batched-tokens", ("vllm",), None),
    "block_size": ("--block-size", ("vllm",), None),
    "enforce_eager": ("--enforce-eager", ("vllm",), False),
    "enable_chunked_prefill": ("--enable-chunked-prefill", ("vllm",), None),
    "kv_cache_memory": ("--kv-cache-memory", ("vllm",), None),
    "vllm_version": ("--vllm-version", ("vllm",), None),
    "vllm_engine": ("--vllm-engine", ("vllm",), None),
    "vllm_sampler": ("--vllm-sampler", ("vllm",), None),
    "vllm_usage": ("--vllm-usage", ("vllm",), None),
    "mem_fraction_static": ("--mem-fraction-static", ("sglang",), None),
    "max_total_tokens": ("--max-total-tokens", ("sglang",), None),
    "chunked_prefill_size": ("--chunked-prefill-size", ("sglang",), None),
    "cuda_graph_max_bs": ("--cuda-graph-max-bs", ("sglang",), None),
    "page_size": ("--page-size", ("sglang",), None),
    "disable_cuda_graph": ("--disable-cuda-graph", ("sglang",), False),
    "sglang_version": ("--sglang-version", ("sglang",), None),
    "gguf": ("--gguf", _LLAMA, None),
    "tensor_split": ("--tensor-split", _LLAMA, None),
    "split_mode": ("--split-mode", _LLAMA, "layer"),
    "override_tensor": ("--override-tensor", _LLAMA, None),
    "cpu_moe": ("--cpu-moe", _LLAMA, False),
    "n_cpu_moe": ("--n-cpu-moe", _LLAMA, None),
    "swa_full": ("--swa-full", _LLAMA, False),
    "no_kv_offload": ("--no-kv-offload", _LLAMA, False),
    "no_op_offload": ("--no-op-offload", _LLAMA, False),
    "fit": ("--fit", _LLAMA, False),
    "fit_target": ("--fit-target", _LLAMA, None),
    "fit_ctx": ("--fit-ctx", _LLAMA, None),
    "gpu_free": ("--gpu-free", _LLAMA, None),
    "host_ram": ("--host-ram", _LLAMA, None),
    "ollama_env": ("--ollama-env", ("ollama",), None),
}
# Whole-number flags and their ranges (tokens bounded like --seq: formulas.spec.MAX_TOKENS).
_MAX_TOKENS = 1 << 26
_INT_RANGES = {"ctx": (1, _MAX_TOKENS), "parallel": (0, 1 << 16), "ubatch": (1, _MAX_TOKENS),
               "max_num_seqs": (1, 1 << 20), "max_num_batched_tokens": (1, _MAX_TOKENS), "block_size": (1, 1 << 16),
               "max_total_tokens": (1, _MAX_TOKENS), "cuda_graph_max_bs": (1, 1 << 16), "page_size": (1, 1 << 16)}
MAX_GPU_TOTAL_BYTES = 2 << 40  # 2 TiB: above any accelerator's memory (B300: 288 GB)


def add_engine_arguments(p):
    """The engine flags (predict and plan). --kv-dtype, --tp and --gpus are the spec's own, read per engine."""
    g = p.add_argument_group("inference engines", "with --engine other than transformers: --kv-dtype takes the "
                             "engine's names (llama.cpp f16|q8_0|q4_0, vLLM/SGLang auto|fp8|fp8_e4m3|fp8_e5m2), "
                             "--gpus splits llama.cpp's layers, --tp is vLLM's/SGLang's tensor-parallel size; a flag "
                             "given to an engine it does not apply to is refused")
    g.add_argument("--engine", default="transformers", choices=ENGINES,
                   help="whose memory rule to follow (default transformers: today's prediction)")
    g.add_argument("--ctx", type=int, default=0,
                   help="llama.cpp: total KV cells (-c); Ollama: num_ctx per sequence (default: the engine's); "
                        "plan --engine: the context per user")
    g.add_argument("--parallel", type=int, default=None, help="llama.cpp -np / OLLAMA_NUM_PARALLEL")
    g.add_argument("--ubatch", type=int, default=512, help="llama.cpp -ub: tokens per compute graph (default 512)")
    g.add_argument("--flash-attn", "-fa", choices=("on", "off", "auto"), default=None,
                   help="llama.cpp -fa (default auto: on for CPU and CUDA; Ollama: its version's default)")
    g.add_argument("--gpu-layers", "-ngl", "--n-gpu-layers", default="all",
                   help="llama.cpp -ngl: layers on the GPUs, N or all (default)")
    g.add_argument("--ollama-version", default=None, help="Ollama release whose defaults apply (default: newest modelled)")
    add_llamacpp_arguments(p)
    g.add_argument("--gpu-total", default=None, metavar="SIZE",
                   help="vLLM/SGLang: the card's total memory, e.g. 24GiB (default: --gpu's reported total)")
    g.add_argument("--model-dtype", default=None, choices=("auto", "bfloat16", "float16", "float32"),
                   help="vLLM/SGLang --dtype: the compute and KV dtype (default auto: the checkpoint's; a config "
                        "without torch_dtype, like gpt-oss, runs in bfloat16 — float16 on GPUs without bf16)")
    g.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="vLLM (default: the version's, 0.9; 0.92 from 0.20.0)")
    g.add_argument("--max-model-len", default=None, metavar="N|auto",
                   help="vLLM (default: --seq + --gen; auto: the longest that fits, vLLM ≥ 0.14)")
    g.add_argument("--max-num-seqs", type=int, default=None, help="vLLM (default: the version's)")
    g.add_argument("--max-num-batched-tokens", type=int, default=None, help="vLLM (default: the version's)")
    g.add_argument("--block-size", type=int, default=None, help="vLLM KV block size (default 16)")
    g.add_argument("--enforce-eager", action="store_true", help="vLLM: no CUDA graphs")
    g.add_argument("--enable-chunked-prefill", choices=("on", "off"), default=None,
                   help="vLLM V0 (default: on above max_model_len 32,768)")
    g.add_argument("--kv-cache-memory", default=None, metavar="SIZE",
                   help="vLLM ≥ 0.10 --kv-cache-memory: the KV budget in bytes, replacing the profiled one")
    g.add_argument("--vllm-version", default=None,
                   help="vLLM release whose accounting applies (default: newest modelled)")
    g.add_argument("--vllm-engine", choices=("v0", "v1"), default=None,
                   help="vLLM engine (VLLM_USE_V1; default: the release's — V1 from 0.8.0, V0 until 0.10.x)")
    g.add_argument("--vllm-sampler", choices=("sort", "flashinfer"), default=None,
                   help="vLLM V1 top-k/top-p path (default: the release's: sort until 0.11 unless flashinfer is "
                        "installed, as in the docker image; flashinfer from 0.12)")
    g.add_argument("--vllm-usage", choices=("server", "llm"), default=None,
                   help="vLLM: vllm serve (default) or the LLM class, whose batch defaults differ")
    g.add_argument("--mem-fraction-static", type=float, default=None,
                   help="SGLang (default: the version's automatic value)")
    g.add_argument("--max-total-tokens", type=int, default=None, help="SGLang --max-total-tokens")
    g.add_argument("--chunked-prefill-size", type=int, default=None,
                   help="SGLang (default: by GPU memory; -1: off)")
    g.add_argument("--cuda-graph-max-bs", type=int, default=None, help="SGLang (default: by GPU memory and TP)")
    g.add_argument("--page-size", type=int, default=None, help="SGLang --page-size (default 1)")
    g.add_argument("--disable-cuda-graph", action="store_true", help="SGLang: no CUDA graphs")
    g.add_argument("--sglang-version", default=None,
                   help="SGLang release whose defaults apply (default: newest modelled)")


def add_llamacpp_arguments(p):
    """llama.cpp's and Ollama's own flags (harness/cli/llamacpp.py reads them)."""
    g = p.add_argument_group("llama.cpp and Ollama", "placement, --fit and Ollama's environment; --model may be a "
                             ".gguf file (split files found from any part) or ORG/REPO with --gguf FILE")
    g.add_argument("--gguf", default=None, metavar="FILE", help="a GGUF file in the Hub repo --model names (headers "
                   "read by range requests)")
    g.add_argument("--tensor-split", "-ts", default=None, help="llama.cpp -ts: proportions per GPU, e.g. 3,1")
    g.add_argument("--split-mode", "-sm", default="layer", choices=("layer", "row", "none"), help="llama.cpp -sm")
    g.add_argument("--override-tensor", "-ot", action="append", default=None, metavar="REGEX=BUFFER",
                   help="llama.cpp -ot: tensors matching REGEX in buffer CPU or CUDA<n> (repeat, or comma lists)")
    g.add_argument("--cpu-moe", "-cmoe", action="store_true", help="llama.cpp --cpu-moe: every expert tensor in host RAM")
    g.add_argument("--n-cpu-moe", "-ncmoe", default=None, metavar="N",
                   help="llama.cpp --n-cpu-moe: the expert tensors of the first N layers in host RAM")
    g.add_argument("--swa-full", action="store_true", help="llama.cpp --swa-full: sliding-window layers keep every cell")
    g.add_argument("--no-kv-offload", action="store_true", help="llama.cpp -nkvo: the KV cache in host RAM")
    g.add_argument("--no-op-offload", action="store_true",
                   help="llama.cpp --no-op-offload: big batches do not copy host weights to the GPU")
    g.add_argument("--fit", action="store_true", help="llama.cpp --fit (llama-server's default): choose -c, -ngl, "
                   "-ts and expert placement for the GPUs' free memory, as common/fit.cpp does")
    g.add_argument("--fit-target", default=None, metavar="MIB[,MIB…]",
                   help="llama.cpp --fit-target: free MiB kept per GPU (default 1024)")
    g.add_argument("--fit-ctx", type=int, default=None, help="llama.cpp --fit-ctx: smallest context --fit may pick "
                   "(default 4096)")
    g.add_argument("--gpu-free", default=None, metavar="SIZE[,SIZE…]",
                   help="free memory per GPU (default: the --gpu card's memory less a CUDA context)")
    if "--host-ram" not in p._option_string_actions:  # plan has its own (CPU RAM per node), read the same way
        g.add_argument("--host-ram", default=None, metavar="SIZE", help="host RAM, e.g. 192GiB (to say whether the "
                       "host part fits)")
    g.add_argument("--ollama-env", action="append", default=None, metavar="KEY=VALUE",
                   help="Ollama's environment: OLLAMA_NUM_PARALLEL, OLLAMA_FLASH_ATTENTION, OLLAMA_KV_CACHE_TYPE, "
                   "OLLAMA_SCHED_SPREAD, OLLAMA_GPU_OVERHEAD, OLLAMA_CONTEXT_LENGTH")


def _given(a, dest):
    """Whether a flag was given (its value differs from the one that means 'not given')."""
    return getattr(a, dest, None) != ENGINE_FLAGS[dest][2]


def _engines_text(engines):
    names = {"llama.cpp": "llama.cpp", "ollama": "ollama", "vllm": "vllm", "sglang": "sglang"}
    return " or ".join(f"--engine {names[e]}" for e in engines)


def check_engine_flags(a, command="predict", shape=None, gpu_total=None):
    """The one place every engine's flags are checked: a flag given to an engine it does not apply to, numbers
    out of range, --tp that does not divide the attention heads (vLLM and SGLang refuse it), --gpus / --tp given
    to the engine that does not read it. `shape` and `gpu_total` add the checks that need the model or the card.
    Raises ValueError with one line naming the flag, the value and what is allowed."""
    for dest, (flag, engines, _) in ENGINE_FLAGS.items():
        if command == "answer" or not _given(a, dest):
            continue
        if dest in ("ctx", "host_ram") and command == "plan":
            continue  # plan --engine: the context per user, for every engine; plan's own --host-ram
        if dest == "max_model_len" and command == "plan":
            raise ValueError("--max-model-len: plan --engine searches the length itself; give --ctx per user")
        if a.engine not in engines:
            raise ValueError(f"{flag}: applies to {_engines_text(engines)}, not --engine {a.engine}")
    for dest, (lo, hi) in _INT_RANGES.items():
        v = getattr(a, dest, None)
        if _given(a, dest) and v is not None and not lo <= v <= hi:
            raise ValueError(f"{ENGINE_FLAGS[dest][0]} {v}: must be a whole number in [{lo:,}, {hi:,}]")
    if _given(a, "chunked_prefill_size") and a.chunked_prefill_size != -1 and \
            not 1 <= a.chunked_prefill_size <= _MAX_TOKENS:
        raise ValueError(f"--chunked-prefill-size {a.chunked_prefill_size}: must be -1 (off) or in "
                         f"[1, {_MAX_TOKENS:,}]")
    if _given(a, "gpu_memory_utilization") and not 0 < a.gpu_memory_utilization <= 1:
        raise ValueError(f"--gpu-memory-utilization {a.gpu_memory_utilization:g}: must be in (0, 1]")
    if _given(a, "mem_fraction_static") and not 0 < a.mem_fraction_static < 1:
        raise ValueError(f"--mem-fraction-static {a.mem_fraction_static:g}: must be in (0, 1)")
    if _given(a, "gpu_total"):
        total = _size("--gpu-total", a.gpu_total)
        if total > MAX_GPU_TOTAL_BYTES:
            raise ValueError(f"--gpu-total {a.gpu_total}: must be at most 2TiB (one accelerator's memory)")
    if _given(a, "max_model_len"):
        _max_model_len(a.max_model_len)
    if _given(a, "kv_cache_memory"):
        kv = _size("--kv-cache-memory", a.kv_cache_memory)
        if gpu_total is not None and kv > gpu_total:
            raise ValueError(f"--kv-cache-memory {a.kv_cache_memory}: more than the card's {gpu_total / GiB:.2f} GiB")
    tp, gpus = getattr(a, "tp", 1), getattr(a, "gpus", 1)
    if a.engine in _LLAMA and tp != 1:
        raise ValueError(f"--tp {tp}: {a.engine} splits layers over --gpus, it has no tensor parallelism")
    if a.engine in _POOLED and gpus != 1 and command == "predict":
        raise ValueError(f"--gpus {gpus}: {a.engine} runs one process per GPU of --tp; give --tp {gpus}")
    if a.engine in _POOLED and shape is not None and shape.n_heads and shape.n_heads % tp:
        raise ValueError(f"--tp {tp}: {a.engine} needs the {shape.n_heads} attention heads divisible by the "
                         "tensor-parallel size (vllm config/model.py verify_with_parallel_config; sglang models "
                         f"assert total_num_heads % tp_size == 0); divisors up to 8: "
                         f"{', '.join(str(d) for d in range(1, 9) if shape.n_heads % d == 0)}")
    if a.engine == "vllm" and shape is not None and _given(a, "max_model_len"):
        n = _max_model_len(a.max_model_len)
        if n > 0 and shape.max_positions and n > shape.max_positions:
            raise ValueError(f"--max-model-len {n}: more than the {shape.max_positions:,} positions of the model's "
                             "config; vLLM refuses it (VLLM_ALLOW_LONG_MAX_MODEL_LEN overrides)")


def _size(flag, text):
    """A size flag → bytes (≥ 1), or one line naming the flag."""
    try:
        return parse_size(text, minimum=1)
    except ValueError as e:
        raise ValueError(f"{flag} {text}: {e}") from None


def _max_model_len(text):
    """'auto' / '-1' → -1; a whole number in [1, MAX_TOKENS] → itself."""
    t = str(text).strip().lower()
    if t in ("auto", "-1"):
        return -1
    try:
        n = int(t)
    except ValueError:
        raise ValueError(f"--max-model-len {text}: give a whole number of tokens or auto") from None
    if not 1 <= n <= _MAX_TOKENS:
        raise ValueError(f"--max-model-len {text}: must be auto or in [1, {_MAX_TOKENS:,}]")
    return n


def engine_flags(a, command="predict"):
    """Check the engine flags (`check_engine_flags`), then take the engine's reading of --kv-dtype, --tp and
    --gpus off `a` (the spec then describes one plain GPU: the model and its weights' dtype); returns them as a
    dict. Transformers: nothing is taken."""
    check_engine_flags(a, command)
    if a.engine == "transformers":
        return {}
    taken = {"kv_dtype": a.kv_dtype, "tp": a.tp, "gpus": a.gpus}
    a.kv_dtype, a.tp, a.gpus = "", 1, 1
    return taken


def _gpu_total(a, gpu):
    if a.gpu_total:
        return parse_size(a.gpu_total, minimum=1)
    if gpu is None:
        raise ValueError(f"--engine {a.engine}: give --gpu NAME or --gpu-total SIZE (the engine budgets a fraction "
                         "of the card)")
    return gpu.usable_bytes


# VllmSettings / SglangSettings name their fields; the CLI names the flags
_FIELD_FLAGS = {"max_model_len": "--max-model-len", "kv_cache_memory_bytes": "--kv-cache-memory",
                "gpu_memory_utilization": "--gpu-memory-utilization", "mem_fraction_static": "--mem-fraction-static",
                "kv_dtype": "--kv-dtype", "dtype": "--model-dtype", "block_size": "--block-size", "tp": "--tp",
                "gpu_total_bytes": "--gpu-total", "vllm version": "--vllm-version", "sglang version": "--sglang-version"}


def _settings(cls, a, **kw):
    """cls(**kw), its ValueError naming the flag instead of the field (and the engine for V0/V1 refusals)."""
    try:
        return cls(**kw)
    except ValueError as e:
        text = str(e)
        for field, flag in _FIELD_FLAGS.items():
            if text.startswith(field + ":") or text.startswith(field + " "):
                raise ValueError(flag + text[len(field):]) from None
        if text.startswith("vllm ") and " runs " in text:
            raise ValueError(f"--vllm-engine {a.vllm_engine}: {text}") from None
        raise


def _model_config(spec):
    """The model's config.json dict (linear-attention states need fields the shape does not keep); {} if unreadable."""
    from formulas.catalog import load_config

    try:
        return load_config(spec.model)
    except ValueError:
        return {}


def engine_answer(a, spec, shape, gpu, taken, overheads):
    """(JSON-ready engine object, peak device bytes per GPU as nvidia-smi would show it, text lines)."""
    kv = taken["kv_dtype"]
    if a.engine in ("llama.cpp", "ollama"):
        from formulas.engines.llamacpp import LlamaCppSettings, log_lines, predict_llamacpp

        if kv and kv not in _LLAMA_KV:
            raise ValueError(f"--kv-dtype {kv}: llama.cpp takes {', '.join(_LLAMA_KV)}")
        layers = a.gpu_layers if a.gpu_layers == "all" else _int("--gpu-layers", a.gpu_layers)
        ctx = a.ctx or (spec.seq + spec.gen if a.engine == "llama.cpp" else 0)  # Ollama: its version's num_ctx
        kw = dict(engine=a.engine, ctx=ctx, ubatch=a.ubatch, gpu_layers=layers, gpus=taken["gpus"],
                  ollama_version=a.ollama_version)
        if a.parallel is not None:
            kw["parallel"] = a.parallel
        if a.flash_attn is not None:
            kw["flash_attn"] = a.flash_attn == "on"
        if kv:
            kw["kv_dtype"] = kv
        result = predict_llamacpp(shape, spec.dtype, LlamaCppSettings(**kw))
        obj = result.to_json() if hasattr(result, "to_json") else dict(result)
        per_gpu = [m + k + c for m, k, c in zip(obj["model_buffer_bytes"], obj["kv_buffer_bytes"],
                                              obj["compute_buffer_bytes"])]
        device = [n + overheads.cuda_context_bytes for n in per_gpu] or [0]
        lines = log_lines(result)
        return obj, max(device), lines
    from formulas.engines.vllm import DEFAULT_VLLM_VERSION, VllmSettings, log_lines, predict_vllm

    if kv and kv not in _VLLM_KV:
        raise ValueError(f"--kv-dtype {kv}: {a.engine} takes {', '.join(_VLLM_KV)}")
    total = _gpu_total(a, gpu)
    tp = taken["tp"]
    a.tp = tp  # the shape-dependent checks read the engine's --tp
    try:
        check_engine_flags(a, "answer", shape, total)
    finally:
        a.tp = 1
    bf16 = True if gpu is None else (gpu.dense_flops.get("bf16") is not None or not gpu.dense_flops)
    config = _model_config(spec)
    notes = []
    if shape.stored_quant and spec.dtype != shape.stored_quant:
        notes.append(f"the checkpoint ships in {shape.stored_quant}, which {a.engine} loads as stored; --dtype "
                     f"{spec.dtype} prices the weights as {spec.dtype} (pass --dtype {shape.stored_quant})")
    if a.engine == "vllm":
        n = _max_model_len(a.max_model_len) if a.max_model_len is not None else spec.seq + spec.gen
        settings = _settings(
            VllmSettings, a, gpu_total_bytes=total, max_model_len=n, gpu_memory_utilization=a.gpu_memory_utilization,
            max_num_seqs=a.max_num_seqs or 0, max_num_batched_tokens=a.max_num_batched_tokens or 0, tp=tp,
            kv_dtype=kv or "auto", dtype=a.model_dtype or "auto", block_size=a.block_size or 16,
            enforce_eager=a.enforce_eager, version=a.vllm_version or DEFAULT_VLLM_VERSION, engine=a.vllm_engine,
            gpu_name=gpu.name if gpu else "", gpu_bf16=bf16,
            enable_chunked_prefill=None if a.enable_chunked_prefill is None else a.enable_chunked_prefill == "on",
            kv_cache_memory_bytes=parse_size(a.kv_cache_memory, minimum=1) if a.kv_cache_memory else 0,
            sampler=a.vllm_sampler, usage=a.vllm_usage or "server")
        result = predict_vllm(shape, spec.dtype, settings, overheads, config)
    else:
        from formulas.engines.sglang import DEFAULT_SGLANG_VERSION, SglangSettings, predict_sglang
        from formulas.engines.sglang import log_lines

        settings = _settings(
            SglangSettings, a, gpu_total_bytes=total, mem_fraction_static=a.mem_fraction_static or 0.0,
            max_total_tokens=a.max_total_tokens or 0, tp=tp, kv_dtype={"fp8": "fp8_e4m3"}.get(kv, kv or "auto"),
            dtype=a.model_dtype or "auto", page_size=a.page_size or 1, chunked_prefill_size=a.chunked_prefill_size or 0,
            cuda_graph_max_bs=a.cuda_graph_max_bs or 0, disable_cuda_graph=a.disable_cuda_graph,
            version=a.sglang_version or DEFAULT_SGLANG_VERSION, gpu_bf16=bf16, model_name=spec.model)
        result = predict_sglang(shape, spec.dtype, settings, overheads, config)
    if notes:
        result["notes"] = list(result.get("notes") or []) + notes
    return result, result["peak_device_bytes"], log_lines(result)


def _int(flag, text):
    try:
        n = int(text)
    except ValueError:
        raise ValueError(f"{flag} {text}: give a whole number or all") from None
    if n < 0:
        raise ValueError(f"{flag} {text}: must be ≥ 0")
    return n


def render_engine(a, pred, obj, peak_device, lines, gpu):
    """The text `vramlab predict --engine E` prints: the engine's own log lines, then the device total and verdict.
    A start-up the engine cannot complete is the answer — never "fits"."""
    s = pred.spec
    out = [f"{pred.model} · {s.dtype} · served by {a.engine}" + (f" {obj.get('version')}" if obj.get("version") else ""),
           f"{pred.n_params:,} parameters", "", f"what {a.engine} would log:"]
    out += [f"  {line}" for line in lines]
    out.append("")
    startup = obj.get("startup") or {"ok": True}
    if startup["ok"]:
        out.append(f"per GPU, as nvidia-smi would show it: {peak_device / GiB:.2f} GiB"
                   + ("" if a.engine in ("vllm", "sglang") else " (buffers + CUDA context)"))
    else:
        out.append(f"start-up fails at '{startup['step']}': the engine does not start with these settings")
    if gpu:
        margin = gpu.memory_bytes - peak_device
        if not startup["ok"]:
            verdict = f"does not fit ({a.engine} start-up fails at '{startup['step']}')"
            out.append(f"{gpu.name} ({gpu.memory_bytes / GiB:.2f} GiB nominal): {verdict}")
        else:
            out.append(f"{gpu.name} ({gpu.memory_bytes / GiB:.2f} GiB nominal): "
                       f"{'fits' if margin >= 0 else 'does not fit'}, margin {margin / GiB:+.2f} GiB")
    for n in obj.get("notes") or ():
        out.append(f"note: {n}")
    return "\n".join(out)


def engine_json(d, obj, peak_device):
    """The prediction's JSON with the engine object; peak_device_bytes is the engine's."""
    d["engine"] = obj
    d["peak_device_bytes"] = peak_device
    d["notes"] = list(d.get("notes") or []) + [
        "breakdown, phases and peak_allocated_bytes: the workload as transformers would hold it; the engine object "
        "and peak_device_bytes: as the engine budgets it"]
    return d


# ------------------------------------------------------------------ plan --engine

MAX_ENGINE_GPUS = 8  # one box: llama.cpp splits layers over its GPUs, vLLM/SGLang take --tp of them


def _fits(a, spec, shape, gpu, taken, overheads, usable):
    """(fits, engine object, per-GPU device bytes) for one try; an impossible setting does not fit."""
    try:
        obj, peak, _ = engine_answer(a, spec, shape, gpu, taken, overheads)
    except ValueError:
        return False, None, None
    if a.engine in ("vllm", "sglang"):
        need = obj.get("kv_cache_tokens", obj.get("max_total_num_tokens", 0))
        return obj["startup"]["ok"] and need > 0 and peak <= usable, obj, peak
    return peak <= usable, obj, peak


def _tokens(obj):
    return obj.get("kv_cache_tokens", obj.get("max_total_num_tokens", 0))


def plan_engine(a, spec, shape, gpu, taken, overheads, usable):
    """The three answers of `plan --engine E --users N --ctx L`, each from the engine's own rule.

    fewest GPUs: llama.cpp / Ollama split the layers over g GPUs with N sequences of L cells; vLLM and SGLang
    run --tp g (a divisor of the attention heads) and need N × L tokens of KV cache. Then, on that many
    GPUs: the largest context per user at N users, and the most users at L tokens each."""
    users, ctx = a.users, a.ctx or spec.seq + spec.gen
    pooled = a.engine in ("vllm", "sglang")

    def attempt(g, n, length):
        t = dict(taken, gpus=g, tp=g if pooled else 1)
        if a.engine == "vllm":
            a.max_model_len = length
        else:
            a.parallel, a.ctx = n, (n * length if a.engine == "llama.cpp" else length)
        ok, obj, peak = _fits(a, spec, shape, gpu, t, overheads, usable)
        if ok and pooled:
            ok = _tokens(obj) >= n * length
        return ok, obj, peak

    counts = [g for g in range(1, MAX_ENGINE_GPUS + 1) if not pooled or shape.n_heads % g == 0]
    fewest = next(((g, o, p) for g in counts for ok, o, p in [attempt(g, users, ctx)] if ok), None)
    answer = {"engine": a.engine, "users": users, "ctx": ctx, "usable_bytes_per_gpu": usable, "fewest": None,
              "largest_ctx_per_user": None, "most_users": None}
    if fewest is None:
        return answer
    g, obj, peak = fewest
    answer["fewest"] = {"gpus": g, "peak_device_bytes": peak, "engine": obj}

    def largest(ok_at, hi):
        lo = 0
        while lo < hi:  # the largest x in [0, hi] with ok_at(x); ok_at is monotone
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if ok_at(mid) else (lo, mid - 1)
        return lo

    limit = shape.max_positions or 1 << 20
    answer["largest_ctx_per_user"] = largest(lambda L: L > 0 and attempt(g, users, L)[0], limit)
    answer["most_users"] = largest(lambda n: n > 0 and attempt(g, n, ctx)[0], 1 << 16)
    return answer


def render_engine_plan(ans, gpu):
    """Text of `plan --engine`."""
    e, n, L = ans["engine"], ans["users"], ans["ctx"]
    out = [f"{e} on {gpu.name}: {n} users × {L:,} tokens ({ans['usable_bytes_per_gpu'] / GiB:.2f} GiB usable per GPU)"]
    f = ans["fewest"]
    if f is None:
        out.append(f"fewest GPUs: does not fit on up to {MAX_ENGINE_GPUS} × {gpu.name}")
        return "\n".join(out)
    how = "--tp" if e in ("vllm", "sglang") else "layers split over"
    out.append(f"fewest GPUs: {f['gpus']} ({how} {f['gpus']}), {f['peak_device_bytes'] / GiB:.2f} GiB per GPU")
    out.append(f"largest context per user at {n} users on {f['gpus']}: {ans['largest_ctx_per_user']:,} tokens")
    out.append(f"most users at {L:,} tokens on {f['gpus']}: {ans['most_users']:,}")
    return "\n".join(out)
