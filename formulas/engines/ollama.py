"""Ollama as users meet it: the defaults of each release and how its scheduler places a model.

Ollama runs llama.cpp, so the buffers are formulas/engines/llamacpp.py's; what Ollama decides is the setting:
num_ctx, how many parallel sequences share the cache, flash attention, the KV type, which GPUs, and how many
layers go to them. Two schedulers, by release (ollama/ollama, mirror at v0.33.0-rc2 fb3076099):

- **estimate** (v0.2.0 – v0.29.x): Ollama sizes the model itself (llm/memory.go `EstimateGPULayers`,
  fs/ggml/ggml.go `GraphSize`, read at v0.6.6) and starts its llama.cpp runner with the -ngl and tensor split
  it computed: each GPU keeps its minimum (457 MiB for CUDA, discover/gpu.go), OLLAMA_GPU_OVERHEAD and the
  graph; layers are dealt round-robin while they fit. It first tries one GPU, then all (server/sched.go
  `pickBestFullFitByLibrary`), unless OLLAMA_SCHED_SPREAD.
- **fit** (v0.30.0 on: "runner: Remove CGO engines, use llama-server exclusively for GGML models", 31e336791):
  Ollama starts llama-server with `-c num_ctx×np -np np --flash-attn auto` and no -ngl (llm/llama_server.go
  `startLlamaServer`), so llama-server's --fit places the layers (formulas/engines/fit.py) with its default
  1024 MiB margin. Ollama only picks the GPUs: one, if its rough estimate (file size + f16 KV) is under 80 %
  of a card's free memory (server/sched.go `bestSingleGPUFit`), else all of them — or all with
  OLLAMA_SCHED_SPREAD.

Defaults by release: num_ctx 2048 → 4096 in v0.6.7 (PR #10452); by total VRAM minus OLLAMA_GPU_OVERHEAD from
v0.15.5 (server/routes.go: ≥ 47 GiB 262,144, ≥ 23 GiB 32,768, else 4,096; 0334ffa62); capped at the model's
trained context. OLLAMA_NUM_PARALLEL unset: 4 if it fits, else 1 (v0.2.0, server/sched.go defaultParallel),
1 from v0.9.7 (PR #11330); hybrid/recurrent families always 1 (server/sched.go load). A tag's default weights
are Q4_K_M (`ollama pull deepseek-r1:32b`), gpt-oss ships MXFP4 experts.
"""

import dataclasses
from dataclasses import dataclass

from .fit import FIT_TARGET_BYTES, FitFailure, fit_params
from .llamacpp import MIB, LlamaCppSettings, hparams_of, predict_model

GIB = 1 << 30
CUDA_MINIMUM_MEMORY = 457 * MIB  # discover/gpu.go cudaMinimumMemory (v0.6.6)
OLLAMA_DEFAULT_DTYPE = "q4_k_m"  # the default tag of the library's models
# (first version, num_ctx (0 = by VRAM tier), num_parallel (0 = auto 4/1), flash attention (None = auto), scheduler)
OLLAMA_RELEASES = (
    ("0.2.0", 2048, 0, False, "estimate"),
    ("0.6.7", 4096, 0, False, "estimate"),
    ("0.9.7", 4096, 1, False, "estimate"),
    ("0.15.5", 0, 1, False, "estimate"),
    ("0.30.0", 0, 1, None, "fit"),
)
NEWEST_MODELLED = "0.33.0"
SINGLE_PARALLEL_FAMILIES = ("mllama", "qwen3vl", "qwen3vlmoe", "qwen35", "qwen35moe", "qwen3next", "lfm2", "lfm2moe",
                            "nemotron_h", "nemotron_h_moe")  # server/sched.go load (HEAD)


@dataclass(frozen=True)
class OllamaEnv:
    """The environment Ollama's server reads (envconfig/config.go)."""

    num_parallel: int = 0  # OLLAMA_NUM_PARALLEL (0 = unset)
    flash_attention: bool = None  # OLLAMA_FLASH_ATTENTION (None = unset)
    kv_cache_type: str = ""  # OLLAMA_KV_CACHE_TYPE: f16 | q8_0 | q4_0 ("" = f16)
    sched_spread: bool = False  # OLLAMA_SCHED_SPREAD
    gpu_overhead: int = 0  # OLLAMA_GPU_OVERHEAD, bytes reserved per GPU
    context_length: int = 0  # OLLAMA_CONTEXT_LENGTH (0 = unset)


def _key(v):
    return tuple(int(x) for x in str(v).split(".")[:3] if x.isdigit())


def release(version):
    """The OLLAMA_RELEASES row that applies to `version` (None = the newest)."""
    if version is None:
        return OLLAMA_RELEASES[-1]
    k = _key(version)
    rows = [r for r in OLLAMA_RELEASES if _key(r[0]) <= k]
    if not rows:
        raise ValueError(f"--ollama-version {version}: modelled from {OLLAMA_RELEASES[0][0]} on")
    return rows[-1]


def default_num_ctx(version, total_vram, env, n_ctx_train=0):
    """num_ctx Ollama uses when the request does not set it."""
    row = release(version)
    if env.context_length:
        ctx = env.context_length
    elif row[1]:
        ctx = row[1]
    else:  # total_vram: Σ (TotalMemory − OLLAMA_GPU_OVERHEAD) over the GPUs, as server/routes.go sums it
        ctx = 262144 if total_vram >= 47 * GIB else 32768 if total_vram >= 23 * GIB else 4096
    if row[4] == "fit" and n_ctx_train:
        ctx = min(ctx, n_ctx_train)  # server/sched.go effectiveModelContext
    return ctx


@dataclass(frozen=True)
class OllamaAnswer:
    """What Ollama would run and what it allocates."""

    version: str
    scheduler: str  # estimate | fit
    num_ctx: int
    num_parallel: int
    flash_attn: object
    kv_type: str
    gpus_used: tuple  # indices of the GPUs the model was given
    n_gpu_layers: int
    tensor_split: tuple
    overrides: tuple
    buffers: object  # LlamaCppBuffers
    device_bytes: tuple  # per GPU used
    host_bytes: int
    notes: tuple

    def to_json(self):
        d = dataclasses.asdict(self)
        d["buffers"] = self.buffers.to_json()
        return d


def _graph_size(model, hp, ctx, batch, n_par, kv_type):
    """fs/ggml/ggml.go GraphSize (v0.6.6): (kv per layer, partial offload, full offload) as Ollama estimates them."""
    emb, heads, heads_kv = hp.n_embd, hp.n_head[0], hp.n_head_kv[0]
    vocab = hp.n_vocab
    hk, hv = hp.head_k, hp.head_v
    eh = emb // max(heads, 1)
    bpe = {"q8_0": 1.0, "q4_0": 0.5}.get(kv_type, 2.0)
    kv = [int(ctx * (hk + hv) * heads_kv * bpe) for _ in range(hp.n_layer)]
    arch = model.arch
    full = partial = 0
    if arch == "llama":
        full = max(4 * batch * (1 + 4 * emb + ctx * (1 + heads)), 4 * batch * (emb + vocab))
        partial = 4 * batch * emb + max(
            4 * batch * (1 + emb + max(ctx, emb)) + emb * emb * 9 // 16 + 4 * ctx * (batch * heads + eh * heads_kv),
            4 * batch * (emb + vocab) + emb * vocab * 105 // 128)
        gate = model.tensor("blk.0.ffn_gate_exps.weight")
        if gate is not None:
            ff = hp.n_ff[0]
            partial = max(3 * gate.nbytes + 4 * batch * (2 * ff + heads_kv + emb + ctx + eh * heads_kv),
                          4 * (ctx * batch * heads + ctx * eh * heads_kv + batch * 1024 + eh * heads_kv * batch))
    elif arch in ("gemma", "gemma2", "gemma3"):
        full = max(4 * batch * (emb + vocab), 4 * batch * (2 + ctx + ctx * heads + 2 * emb + 2 * hk * heads))
        partial = max(4 * emb * batch + emb * vocab * 105 // 128 + 4 * vocab * batch,
                      4 * batch * (2 * emb + 1 + 2 * hk * heads + ctx + ctx * heads) + 4 * hk * ctx * 8
                      + emb * hk * heads * 9 // 16)
        if arch == "gemma3":
            sw = n_par * (hp.n_swa or 1024) + batch
            kv = [kv[i] if (i + 1) % 6 == 0 else int(sw * (hk + hv) * heads_kv * bpe) for i in range(hp.n_layer)]
    elif arch == "qwen2":
        full = max(4 * batch * (emb + vocab), 4 * batch * (1 + 2 * emb + ctx + ctx * heads))
        partial = max(4 * batch * (emb + vocab) + emb * vocab * 105 // 128,
                      4 * (batch * (1 + 2 * emb + ctx * (1 + heads)) + emb * (1 + ctx)))
    elif arch == "deepseek2":
        full = max(4 * batch * (3 * emb + vocab), 4 * batch * (3 * emb + 2 + ctx * (1 + heads_kv) + 2 * hk * heads_kv))
        partial = max(4 * batch * (3 * emb + vocab) + emb * vocab * 105 // 128,
                      4 * batch * (2 * emb + 1 + 2 * hk * heads_kv + ctx + ctx * heads_kv) + 4 * hk * ctx * heads_kv
                      + emb * hk * heads_kv * 9 // 16)
    if partial == 0:
        partial = (heads // max(heads_kv, 1)) * sum(kv) // 6
    if full == 0:
        full = partial
    return kv, partial, full


def _estimate_layers(model, hp, free, num_ctx, n_par, kv_type, env, batch=512):
    """llm/memory.go EstimateGPULayers (v0.6.6): (layers, per-GPU layer counts) on the GPUs `free` describes."""
    sizes = {}
    for t in model.tensors:
        key = f"blk.{t.layer}" if t.layer >= 0 else t.name.split(".")[0]
        sizes[key] = sizes.get(key, 0) + t.nbytes
    kv, partial, full = _graph_size(model, hp, num_ctx, min(num_ctx, batch), n_par, kv_type)
    if len(free) > 1:
        full = partial
    layer = sizes.get("blk.0", 0) + (kv[0] if kv else 0)
    out_size = sizes.get("output_norm", 0) + (sizes.get("output") or sizes.get("token_embd", 0))
    overhead = env.gpu_overhead
    graph = max(partial, full)
    alloc = [0] * len(free)
    counts = [0] * len(free)
    with_space = []
    for i, f in enumerate(free):
        if f < overhead + graph + CUDA_MINIMUM_MEMORY + 2 * layer:
            continue
        with_space.append(i)
        alloc[i] += CUDA_MINIMUM_MEMORY + layer
    n = 0
    for i in range(hp.n_layer):
        layer = sizes.get(f"blk.{i}", 0) + kv[i]
        j = len(with_space)
        while j > 0:
            g = with_space[i % j]
            if free[g] > overhead + alloc[g] + graph + layer:
                alloc[g] += layer
                counts[g] += 1
                n += 1
                break
            with_space.pop(i % j)
            j -= 1
    if out_size:
        j = len(with_space)
        while j > 0:
            g = with_space[n % j]
            if free[g] > overhead + alloc[g] + graph + out_size:
                alloc[g] += out_size
                counts[g] += 1
                n += 1
                break
            j -= 1
    full_fit = n >= hp.n_layer + 1
    return n, counts, full_fit


def ollama_plan(model, free_bytes, total_bytes=None, version=None, env=None, num_ctx=0, host_free_bytes=None,
                ubatch=512):
    """What Ollama `version` runs for `model` (a GGUFModel) on GPUs with `free_bytes` free (`total_bytes` in all)."""
    env = env or OllamaEnv()
    row = release(version)
    ver = version or NEWEST_MODELLED
    hp = hparams_of(model)
    notes = []
    total = sum(max(t - env.gpu_overhead, 0) for t in (total_bytes or free_bytes))
    ctx = num_ctx or default_num_ctx(version, total, env, hp.n_ctx_train)
    n_par = env.num_parallel or row[2]
    if model.arch in SINGLE_PARALLEL_FAMILIES and (n_par or 0) != 1 and row[4] == "fit":
        n_par = 1
        notes.append(f"{model.arch}: Ollama runs one sequence at a time for this family (server/sched.go)")
    kv_type = (env.kv_cache_type or "f16").lower()
    if row[4] == "estimate":
        flash = bool(env.flash_attention)
        if kv_type != "f16" and not flash:
            notes.append(f"OLLAMA_KV_CACHE_TYPE={kv_type} needs OLLAMA_FLASH_ATTENTION=1: Ollama uses f16")
            kv_type = "f16"
        tries = [n_par] if n_par else [4, 1]
        order = sorted(range(len(free_bytes)), key=lambda i: -free_bytes[i])
        choice = None
        for p in tries:  # one GPU first, unless OLLAMA_SCHED_SPREAD
            if env.sched_spread:
                break
            for g in order:
                n, counts, ok = _estimate_layers(model, hp, [free_bytes[g]], ctx * p, p, kv_type, env)
                if ok:
                    choice = ([g], p, n, counts)
                    break
            if choice:
                break
        if choice is None:
            for p in tries:
                n, counts, ok = _estimate_layers(model, hp, [free_bytes[g] for g in order], ctx * p, p, kv_type, env)
                if ok or p == tries[-1]:
                    choice = (order, p, n, counts)
                    break
        gpus, n_par, ngl, counts = choice
        ts = tuple(float(c) for c in counts) if len(gpus) > 1 else None
        s = LlamaCppSettings(engine="ollama", ctx=ctx, parallel=n_par, ubatch=ubatch, flash_attn=flash, kv_dtype=kv_type,
                             gpu_layers=ngl, gpus=max(len(gpus), 1), tensor_split=ts, ollama_version=ver,
                             device="cuda" if gpus else "cpu")
        r = predict_model(model, s)
        return OllamaAnswer(ver, "estimate", ctx, n_par, flash, kv_type, tuple(gpus), ngl,
                            tuple(int(c) for c in counts) if len(gpus) > 1 else (), (), r,
                            tuple(r.device_bytes(g) for g in range(len(gpus))), r.host_bytes, tuple(notes))
    # fit scheduler: llama-server decides the layers
    n_par = n_par or 1
    flash = env.flash_attention  # None: --flash-attn auto
    pred = model.tensor_bytes + 2 * hp.n_layer * max(min(hp.n_head_kv) or 1, 1) * (
        hp.n_embd // max(max(hp.n_head), 1)) * ctx * n_par * 2  # llm/llama_server.go PredictServerVRAM
    gpus = list(range(len(free_bytes)))
    if not env.sched_spread and len(free_bytes) > 1:
        fits = [g for g in gpus if pred <= free_bytes[g] * 80 // 100]
        if fits:
            gpus = [max(fits, key=lambda g: free_bytes[g])]
    s = LlamaCppSettings(engine="llama.cpp", ctx=ctx * n_par, parallel=n_par, ubatch=ubatch, flash_attn=flash,
                         kv_dtype=kv_type, gpus=max(len(gpus), 1), kv_unified=False, device="cuda" if gpus else "cpu")
    try:
        fr = fit_params(model, s, [free_bytes[g] for g in gpus], [FIT_TARGET_BYTES] * len(gpus),
                        host_free_bytes=host_free_bytes)
    except FitFailure as e:
        raise ValueError(f"llama-server --fit: {e}") from None
    r = fr.buffers
    notes.extend(fr.log[-3:])
    return OllamaAnswer(ver, "fit", ctx, n_par, flash, kv_type, tuple(gpus), fr.n_gpu_layers, fr.tensor_split,
                        fr.overrides, r, fr.device_bytes, r.host_bytes, tuple(notes))
