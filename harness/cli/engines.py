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
_VLLM_KV = ("auto", "fp8")


def add_engine_arguments(p):
    """The engine flags (predict and plan). --kv-dtype, --tp and --gpus are the spec's own, read per engine."""
    g = p.add_argument_group("inference engines", "with --engine other than transformers: --kv-dtype takes the "
                             "engine's names (llama.cpp f16|q8_0|q4_0, vLLM auto|fp8), --gpus splits llama.cpp's "
                             "layers, --tp is vLLM's/SGLang's tensor-parallel size")
    g.add_argument("--engine", default="transformers", choices=ENGINES,
                   help="whose memory rule to follow (default transformers: today's prediction)")
    g.add_argument("--ctx", type=int, default=0,
                   help="llama.cpp: total KV cells (-c); Ollama: num_ctx per sequence (default: the engine's)")
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
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vLLM (default 0.9)")
    g.add_argument("--max-model-len", type=int, default=0, help="vLLM (default: --seq + --gen)")
    g.add_argument("--max-num-seqs", type=int, default=0, help="vLLM (default: the version's)")
    g.add_argument("--max-num-batched-tokens", type=int, default=0, help="vLLM (default: the version's)")
    g.add_argument("--block-size", type=int, default=16, help="vLLM KV block size (default 16)")
    g.add_argument("--enforce-eager", action="store_true", help="vLLM: no CUDA graphs")
    g.add_argument("--vllm-version", default=None, help="vLLM release whose accounting applies (default: newest modelled)")
    g.add_argument("--mem-fraction-static", type=float, default=0.0, help="SGLang (default: its tp-based default)")
    g.add_argument("--max-total-tokens", type=int, default=0, help="SGLang --max-total-tokens")


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
    g.add_argument("--host-ram", default=None, metavar="SIZE", help="host RAM, e.g. 192GiB (to say whether the host "
                   "part fits)")
    g.add_argument("--ollama-env", action="append", default=None, metavar="KEY=VALUE",
                   help="Ollama's environment: OLLAMA_NUM_PARALLEL, OLLAMA_FLASH_ATTENTION, OLLAMA_KV_CACHE_TYPE, "
                   "OLLAMA_SCHED_SPREAD, OLLAMA_GPU_OVERHEAD, OLLAMA_CONTEXT_LENGTH")


def engine_flags(a):
    """Take the engine's reading of --kv-dtype, --tp and --gpus off `a` (the spec then describes one plain
    GPU: the model and its weights' dtype); returns them as a dict. Transformers: nothing is taken."""
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
    from formulas.engines.vllm import DEFAULT_VLLM_VERSION, SglangSettings, VllmSettings, log_lines, predict_sglang, \
        predict_vllm

    if kv and kv not in _VLLM_KV:
        raise ValueError(f"--kv-dtype {kv}: {a.engine} takes {', '.join(_VLLM_KV)}")
    total = _gpu_total(a, gpu)
    tp = taken["tp"]
    if a.engine == "vllm":
        settings = VllmSettings(gpu_total_bytes=total, max_model_len=a.max_model_len or spec.seq + spec.gen,
                                gpu_memory_utilization=a.gpu_memory_utilization, max_num_seqs=a.max_num_seqs,
                                max_num_batched_tokens=a.max_num_batched_tokens, tp=tp, kv_dtype=kv or "auto",
                                block_size=a.block_size, enforce_eager=a.enforce_eager,
                                version=a.vllm_version or DEFAULT_VLLM_VERSION, gpu_name=gpu.name if gpu else "")
        result = predict_vllm(shape, spec.dtype, settings, overheads)
    else:
        settings = SglangSettings(gpu_total_bytes=total, mem_fraction_static=a.mem_fraction_static,
                                  max_total_tokens=a.max_total_tokens, tp=tp,
                                  kv_dtype={"fp8": "fp8_e4m3"}.get(kv, kv or "auto"))
        result = predict_sglang(shape, spec.dtype, settings, overheads)
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
    """The text `vramlab predict --engine E` prints: the engine's own log lines, then the device total."""
    s = pred.spec
    out = [f"{pred.model} · {s.dtype} · served by {a.engine}" + (f" {obj.get('version')}" if obj.get("version") else ""),
           f"{pred.n_params:,} parameters", "", f"what {a.engine} would log:"]
    out += [f"  {line}" for line in lines]
    out.append("")
    out.append(f"per GPU, as nvidia-smi would show it: {peak_device / GiB:.2f} GiB"
               + ("" if a.engine in ("vllm", "sglang") else " (buffers + CUDA context)"))
    if gpu:
        margin = gpu.memory_bytes - peak_device
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
        return obj["weights_bytes"] < usable and need > 0 and peak <= usable, obj, peak
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
        if pooled:
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
