"""vLLM's and SGLang's memory budgets: how many KV-cache tokens a server gets on one GPU.

Neither engine asks "does it fit": both take a fixed share of the card and turn what the model
does not use into KV-cache blocks. vLLM takes `gpu_memory_utilization` × the card's total,
subtracts the weights, the activation peak of one profiling forward at `max_num_batched_tokens`
(plus the sampler on `max_num_seqs` rows), the memory allocated outside torch and — from v0.21 —
the CUDA-graph pool, and divides the rest by the bytes of one block (vLLM logs "GPU KV cache size:
N tokens"). SGLang takes `mem_fraction_static` × the free memory and subtracts the weights
(its log prints `max_total_num_tokens=N`).

The accounting changed across vLLM versions; every version-dependent rule is one row of
`VLLM_RULES` (first version, last version, the behaviour, the source line), and docs/engines.md
prints that table. Output contract: `predict_vllm` and `predict_sglang` return JSON-ready dicts
of integer bytes and counts; `log_lines` renders the engine's own log lines from such a dict.

Source: vllm-project/vllm vllm/worker/worker.py (V0) and vllm/v1/worker/gpu_worker.py (V1)
`determine_num_available_blocks` / `determine_available_memory`, vllm/utils `memory_profiling`,
vllm/v1/core/kv_cache_utils.py; sgl-project/sglang python/sglang/srt/model_executor/model_runner.py
`profile_max_num_token`.
"""

from dataclasses import dataclass

from ..dtypes import DTYPE_BYTES
from ..kv_cache import kv_cache_bytes_per_token
from ..overhead import DEFAULT_OVERHEADS
from ..units import GiB
from ..weights import weight_storage

DEFAULT_VLLM_VERSION = "0.21.0"  # first version that counts CUDA-graph memory by default (see VLLM_RULES)

# vLLM's element size of the KV cache: "auto" is the model dtype, fp8 is one byte
# (vllm/utils STR_DTYPE_TO_TORCH_DTYPE: "fp8" / "fp8_e4m3" / "fp8_e5m2" → uint8 / float8).
_KV_DTYPE_BYTES = {"fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}

# Sampler working set per logits element in the profiling run, beyond the logits in the model dtype:
# V1 holds float32 logits, probabilities and exponential noise (3 × 4 bytes) — see VLLM_RULES "sampler".
_SAMPLER_FP32_COPIES = 3

# Activations one token holds at the MLP peak of a decoder layer, in hidden-size units beside the MLP
# intermediates: the residual stream, the normed input and the layer output. With the gate/up output
# (2·I) and the SiluAndMul output (I) this reproduces the logged activation peak of Llama-3.1-8B in
# vLLM 0.6.4 at 20,000 and 29,000 batched tokens to 0.01 GiB (results/published/engines/vllm.json
# cases vllm-10517-20k / -29k; a fit on two published points, stated as such in docs/engines.md).
_HIDDEN_COPIES_AT_MLP_PEAK = 3

# CUDA graphs: vLLM captures batch sizes up to min(2 · max_num_seqs, 512) (vllm/config/compilation.py
# `max_cudagraph_capture_size` default 512); each piecewise graph keeps its input and output
# buffers of the largest size: two hidden-size tensors per decoder layer. A rough estimate —
# vLLM ≥ 0.21 logs the measured "CUDA graph pool memory" beside its own estimate.
_CUDAGRAPH_MAX_CAPTURE = 512
_CUDAGRAPH_BUFFERS_PER_LAYER = 2


def parse_version(text):
    """'0.6.4.post1' → (0, 6, 4); unparseable parts count as 0."""
    parts = []
    for p in str(text).lstrip("v").split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)


# Every version-dependent rule: (first version, last version or None, rule, behaviour, source).
# `predict_vllm` reads the behaviour of the row whose range holds the version.
VLLM_RULES = (
    ("0.2.0", "0.2.4", "budget", "torch_peak_only",
     "V0: available = total × util − torch.cuda.max_memory_allocated() after the profiling run (weights and "
     "activations; nothing outside torch). vllm/worker/worker.py profile_num_available_blocks before PR #2031"),
    ("0.2.5", "0.6.3", "budget", "device_peak",
     "V0: available = total × util − (total − free after profiling): the whole device's use, CUDA context and "
     "NCCL included. PR #2031 https://github.com/vllm-project/vllm/pull/2031 ('Fix peak memory profiling'); "
     "vllm/worker/worker.py determine_num_available_blocks (v0.6.3: `peak_memory = self.init_gpu_memory - "
     "free_gpu_memory`)"),
    ("0.6.4", "0.6.4", "budget", "torch_peak_plus_non_torch",
     "V0: available = total × util − (torch peak allocated, weights included + memory used outside torch, "
     "CUDA context included). vllm/worker/worker.py v0.6.4 (PR #9352), log 'Memory profiling results: "
     "total_gpu_memory=… non_torch_memory=…'"),
    ("0.6.5", "0.7.3", "budget", "memory_profiling",
     "V0: available = total × util − (weights + torch peak increase + non-torch increase) over a baseline "
     "taken after the CUDA context exists. vllm/utils.py memory_profiling (PR #10511, "
     "https://github.com/vllm-project/vllm/pull/10511)"),
    ("0.8.0", "0.9.1", "budget", "torch_peak_plus_non_torch",
     "V1 (default from 0.8.0): available = total × util − (torch peak + non-torch allocations measured "
     "against the whole device, CUDA context included). vllm/v1/worker/gpu_worker.py "
     "determine_available_memory before PR #19312"),
    ("0.9.2", None, "budget", "memory_profiling",
     "V1 reuses V0's memory_profiling (baseline after the context). PR #19312 "
     "https://github.com/vllm-project/vllm/pull/19312; log 'Available KV cache memory: X GiB'"),
    ("0.2.0", "0.20.99", "cudagraphs", "not_counted",
     "CUDA graphs are captured after the KV cache is allocated and come on top of total × util "
     "(gpu_worker.compile_or_warm_up_model runs capture_model after initialize_from_config)"),
    ("0.21.0", None, "cudagraphs", "counted",
     "CUDA-graph memory is profiled and subtracted from the budget by default "
     "(VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS=1); vLLM's own log: 'CUDA graph memory profiling is "
     "enabled (default since v0.21.0)', quoted in https://github.com/vllm-project/vllm/issues/46462"),
    ("0.2.0", "0.6.4", "batch_defaults", "v0_chunk512",
     "V0: max_num_seqs 256; without chunked prefill max_num_batched_tokens = max(max_model_len, 2048); "
     "chunked prefill (on by default above max_model_len 32,768 in the OpenAI server) uses 512. "
     "vllm/config.py SchedulerConfig.__post_init__ (v0.6.x); the 0.06 GiB activation peak at max_model_len 35k in "
     "https://github.com/vllm-project/vllm/issues/10517 (v0.6.4) matches 512 tokens"),
    ("0.6.5", "0.7.3", "batch_defaults", "v0_chunk2048",
     "V0 as above, but chunked prefill uses _DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048 (vllm/config.py v0.7.x); the first "
     "release with 2048 is not pinned here (0.6.5 assumed); the 0.19 GiB activation peak of R1-Distill-Qwen-14B at "
     "131k in https://github.com/vllm-project/vllm/issues/13061 (v0.7.x) matches 2048 tokens"),
    ("0.8.0", None, "batch_defaults", "v1",
     "V1 OpenAI server: ≥ 70 GiB and not an A100: max_num_batched_tokens 8192, max_num_seqs 1024; "
     "otherwise 2048 and 256. vllm/engine/arg_utils.py get_batch_defaults / _set_default_args_v1 "
     "(`device_memory >= 70 * GiB_bytes and \"a100\" not in device_name`)"),
    ("0.2.0", "0.7.3", "log", "v0",
     "V0 logs '# GPU blocks: N, # CPU blocks: M' (executor_base.py; 0.7.x '# cuda blocks') and "
     "'Maximum concurrency for L tokens per request: C.CCx' = N × block_size / L"),
    ("0.2.0", "0.7.3", "sampler", "logits_only",
     "V0 profiling run: the sampler's peak is the [max_num_seqs, vocab] logits in the model dtype; the logged "
     "activation peak of Llama-3.1-8B at 512 batched tokens and 256 sequences (vLLM 0.6.4, 0.06 GiB in "
     "https://github.com/vllm-project/vllm/issues/10517) holds no float32 copy"),
    ("0.8.0", None, "sampler", "float32_probs",
     "V1 `_dummy_sampler_run`: logits in the model dtype, then float32 logits, softmax probabilities and the "
     "exponential noise of random sampling (vllm/v1/sample/ops/topk_topp_sampler.py random_sample), held together"),
    ("0.8.0", None, "log", "v1",
     "V1 logs 'GPU KV cache size: N tokens' (N = blocks × block_size) and 'Maximum concurrency for "
     "L tokens per request: C.CCx' (vllm/v1/core/kv_cache_utils.py, PR #13596)"),
)


def vllm_rules(version):
    """{rule: (behaviour, source)} for one vLLM version."""
    v = parse_version(version)
    out = {}
    for first, last, rule, behaviour, source in VLLM_RULES:
        if parse_version(first) <= v and (last is None or v <= parse_version(last)):
            out[rule] = (behaviour, source)
    if v < parse_version("0.2.0"):
        raise ValueError(f"vllm version: {version!r} is older than the oldest modelled (0.2.0)")
    return out


@dataclass(frozen=True)
class VllmSettings:
    """A vLLM server launch, as its flags set it; 0 means vLLM's default for the version and GPU."""

    gpu_total_bytes: int  # what torch.cuda.mem_get_info reports as total (vLLM logs it as total_gpu_memory)
    max_model_len: int  # --max-model-len
    gpu_memory_utilization: float = 0.9  # --gpu-memory-utilization
    max_num_seqs: int = 0  # --max-num-seqs (0: default of the version and GPU)
    max_num_batched_tokens: int = 0  # --max-num-batched-tokens (0: default)
    tp: int = 1  # --tensor-parallel-size
    kv_dtype: str = "auto"  # --kv-cache-dtype: auto (model dtype) | fp8
    block_size: int = 16  # --block-size
    enforce_eager: bool = False  # --enforce-eager: no CUDA graphs
    version: str = DEFAULT_VLLM_VERSION  # vLLM release whose accounting to follow
    gpu_name: str = ""  # only for the default batch sizes (vLLM exempts A100s from the large defaults)
    enable_chunked_prefill: bool = None  # V0 only; None = vLLM's default (on above max_model_len 32,768)

    def __post_init__(self):
        if self.gpu_total_bytes <= 0:
            raise ValueError(f"gpu_total_bytes: {self.gpu_total_bytes!r} must be positive")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization: {self.gpu_memory_utilization!r} must be in (0, 1]")
        if self.max_model_len <= 0:
            raise ValueError(f"max_model_len: {self.max_model_len!r} must be positive")
        if self.tp < 1:
            raise ValueError(f"tp: {self.tp!r} must be ≥ 1")
        if self.kv_dtype != "auto" and self.kv_dtype not in _KV_DTYPE_BYTES:
            raise ValueError(f"kv_dtype: {self.kv_dtype!r}; allowed: auto, {', '.join(_KV_DTYPE_BYTES)}")
        if self.block_size <= 0:
            raise ValueError(f"block_size: {self.block_size!r} must be positive")
        vllm_rules(self.version)  # raises for unknown versions


def _compute_bytes(shape, dtype):
    """Bytes of the activation / default-KV dtype: the weight dtype when it is a float, else the checkpoint's."""
    if dtype in ("fp16", "bf16", "fp32"):
        return DTYPE_BYTES[dtype]
    return DTYPE_BYTES.get(shape.config_dtype, 2) if shape.config_dtype in ("fp16", "bf16", "fp32") else 2


def kv_bytes_per_token_per_gpu(shape, dtype, kv_dtype="auto", tp=1):
    """KV-cache bytes one token takes on one GPU under vLLM / SGLang.

    K and V of max(1, n_kv_heads / tp) heads per layer (KV heads are replicated when tp exceeds them);
    MLA models cache the compressed latent (kv_lora_rank + qk_rope_head_dim), the same on every rank.
    Source: vllm/v1/kv_cache_interface.py FullAttentionSpec.page_size_bytes
    (2 · block_size · num_kv_heads · head_size · dtype size) and MLAAttentionSpec (one latent);
    sglang model_runner.py profile_max_num_token `cell_size`."""
    kvb = _KV_DTYPE_BYTES.get(kv_dtype) or _compute_bytes(shape, dtype)
    if shape.is_mla:
        return kv_cache_bytes_per_token(shape, kvb, mla_cache="compressed")
    if shape.cache_groups:  # general inventory: attention layers only, heads split like the rest
        per_token = kv_cache_bytes_per_token(shape, kvb)
        heads = max(shape.n_kv_heads, 1)
        return per_token * max(1, heads // tp) // heads
    per_layer = 2 * max(1, shape.n_kv_heads // tp) * shape.head_dim
    return per_layer * shape.n_layers * kvb


def vllm_weights_bytes(shape, dtype, tp=1):
    """Weights on one GPU as vLLM's 'Model loading took X GiB' counts them: the checkpoint split tp ways plus
    the rotary cos/sin cache ([max_position_embeddings, rotary_dim] in the model dtype).

    Source: vllm/model_executor/layers/rotary_embedding.py `_compute_cos_sin_cache` (registered as a buffer);
    Llama-3.1-8B: 14.957 GiB of parameters + 0.031 GiB cache = the 14.9888 GiB vLLM logs."""
    ws = weight_storage(shape, dtype)
    params = ws.weight_bytes + ws.quant_state_bytes
    rot = shape.rotary_dim or shape.qk_rope_head_dim
    rope_cache = shape.max_positions * rot * _compute_bytes(shape, dtype) if rot else 0
    return -(-params // tp) + rope_cache


def _per_token_activation_elems(shape, tp):
    """Elements one token holds at the largest point of a decoder layer in the profiling forward."""
    H = shape.hidden
    attn = ((shape.n_heads + 2 * shape.n_kv_heads) * max(shape.head_dim, 1) + shape.n_heads * max(shape.v_head_dim, 1)) // tp
    mlp = 3 * shape.intermediate // tp if shape.intermediate else 0
    moe = 0
    if shape.is_moe:
        # fused_moe: intermediate_cache1 [T, k, 2·I_e/tp], cache2 [T·k, I_e/tp], cache3 [T, k, H], router logits [T, E]
        k = shape.experts_per_token
        moe = k * (3 * shape.moe_intermediate // tp + H) + shape.n_experts
        if shape.shared_intermediate:
            moe += 3 * shape.shared_intermediate // tp
    return _HIDDEN_COPIES_AT_MLP_PEAK * H + max(attn, mlp, moe)


def vllm_activation_peak_bytes(shape, dtype, num_tokens, num_reqs, tp=1, sampler="float32_probs"):
    """Torch activation peak of vLLM's profiling run: one forward of `num_tokens` tokens, then the sampler on
    `num_reqs` rows of logits over the whole vocabulary (gathered on every rank); the larger of the two.

    Source: vllm/v1/worker/gpu_model_runner.py profile_run (`_dummy_run(max_num_tokens)` then
    `_dummy_sampler_run`), vllm/worker/model_runner.py profile_run (V0: max_num_seqs sequences sharing
    max_num_batched_tokens)."""
    cb = _compute_bytes(shape, dtype)
    forward = num_tokens * _per_token_activation_elems(shape, tp) * cb
    per_logit = cb + (4 * _SAMPLER_FP32_COPIES if sampler == "float32_probs" else 0)
    sampling = num_tokens * shape.hidden * cb + num_reqs * shape.vocab * per_logit
    return max(forward, sampling)


def vllm_batch_defaults(settings):
    """(max_num_seqs, max_num_batched_tokens) after vLLM fills in its defaults."""
    behaviour = vllm_rules(settings.version)["batch_defaults"][0]
    seqs, tokens = settings.max_num_seqs, settings.max_num_batched_tokens
    if behaviour.startswith("v0"):
        seqs = seqs or 256
        chunked = settings.enable_chunked_prefill
        if chunked is None:
            chunked = settings.max_model_len > 32768
        if not tokens:
            chunk = 512 if behaviour == "v0_chunk512" else 2048
            tokens = chunk if chunked else max(settings.max_model_len, 2048)
    else:
        large = settings.gpu_total_bytes >= 70 * GiB and "a100" not in settings.gpu_name.lower()
        seqs = seqs or (1024 if large else 256)
        tokens = tokens or (8192 if large else 2048)
    return seqs, tokens


def vllm_cudagraph_bytes(shape, dtype, max_num_seqs, tp=1):
    """Estimated CUDA-graph pool: buffers of the largest captured batch, per decoder layer."""
    largest = min(2 * max_num_seqs, _CUDAGRAPH_MAX_CAPTURE)
    return shape.n_layers * _CUDAGRAPH_BUFFERS_PER_LAYER * largest * shape.hidden * _compute_bytes(shape, dtype)


def vllm_non_torch_bytes(behaviour, overheads=DEFAULT_OVERHEADS):
    """Memory outside torch that vLLM subtracts: the CUDA context too where the rule measures against the whole
    device, only the increase over the post-context baseline (cuBLAS workspaces …) with memory_profiling."""
    if behaviour == "torch_peak_only":
        return 0
    if behaviour == "memory_profiling":
        return overheads.workspaces_bytes
    return overheads.cuda_context_bytes + overheads.workspaces_bytes


def predict_vllm(shape, dtype, settings, overheads=DEFAULT_OVERHEADS):
    """vLLM's memory budget on one GPU (each TP rank holds the same) → JSON-ready dict."""
    rules = vllm_rules(settings.version)
    budget = rules["budget"][0]
    seqs, batched = vllm_batch_defaults(settings)
    num_reqs = min(seqs, batched)
    weights = vllm_weights_bytes(shape, dtype, settings.tp)
    activation = vllm_activation_peak_bytes(shape, dtype, batched, num_reqs, settings.tp, rules["sampler"][0])
    non_torch = vllm_non_torch_bytes(budget, overheads)
    cudagraph = 0 if settings.enforce_eager else vllm_cudagraph_bytes(shape, dtype, seqs, settings.tp)
    counted = rules["cudagraphs"][0] == "counted" and not settings.enforce_eager
    requested = int(settings.gpu_total_bytes * settings.gpu_memory_utilization)
    kv_bytes = requested - weights - activation - non_torch - (cudagraph if counted else 0)
    per_token = kv_bytes_per_token_per_gpu(shape, dtype, settings.kv_dtype, settings.tp)
    block_bytes = per_token * settings.block_size
    num_blocks = max(0, kv_bytes) // block_bytes
    tokens = num_blocks * settings.block_size
    return {
        "engine": "vllm",
        "version": settings.version,
        "weights_bytes": weights,
        "activation_peak_bytes": activation,
        "non_torch_bytes": non_torch,
        "cudagraph_bytes": cudagraph,
        "cudagraph_in_budget": counted,
        "requested_memory_bytes": requested,
        "kv_cache_bytes": max(0, kv_bytes),
        "kv_cache_bytes_per_token": per_token,
        "kv_cache_tokens": tokens,
        "num_gpu_blocks": num_blocks,
        "max_concurrency": round(tokens / settings.max_model_len, 2),
        "max_model_len": settings.max_model_len,
        "max_num_seqs": seqs,
        "max_num_batched_tokens": batched,
        "block_size": settings.block_size,
        "tp": settings.tp,
        "log_style": rules["log"][0],
        # nvidia-smi: the budget, plus what it leaves out (context where excluded, graphs where not counted)
        "peak_device_bytes": requested + (overheads.cuda_context_bytes if budget in ("memory_profiling", "torch_peak_only")
                                          else 0) + (0 if counted else cudagraph),
        "rules": {k: v[0] for k, v in rules.items()},
    }


# SGLang's default --mem-fraction-static before it became GPU-dependent: by TP size.
# Source: python/sglang/srt/server_args.py __post_init__ (v0.3–v0.4: tp ≥ 16 → 0.79, ≥ 8 → 0.81,
# ≥ 4 → 0.85, ≥ 2 → 0.87, else 0.88). Newer releases compute it from the GPU (issue #29092).
_SGLANG_MFS_BY_TP = ((16, 0.79), (8, 0.81), (4, 0.85), (2, 0.87), (1, 0.88))


@dataclass(frozen=True)
class SglangSettings:
    """An SGLang server launch."""

    gpu_total_bytes: int  # the card's total memory
    mem_fraction_static: float = 0.0  # --mem-fraction-static (0: the tp-based default of v0.3–v0.4)
    max_total_tokens: int = 0  # --max-total-tokens (0: none)
    tp: int = 1  # --tp
    kv_dtype: str = "auto"  # --kv-cache-dtype: auto | fp8_e4m3 | fp8_e5m2
    page_size: int = 1  # --page-size: max_total_num_tokens is rounded down to it

    def __post_init__(self):
        if self.gpu_total_bytes <= 0:
            raise ValueError(f"gpu_total_bytes: {self.gpu_total_bytes!r} must be positive")
        if not 0 <= self.mem_fraction_static < 1:
            raise ValueError(f"mem_fraction_static: {self.mem_fraction_static!r} must be in (0, 1)")
        if self.tp < 1:
            raise ValueError(f"tp: {self.tp!r} must be ≥ 1")
        if self.kv_dtype != "auto" and self.kv_dtype not in _KV_DTYPE_BYTES:
            raise ValueError(f"kv_dtype: {self.kv_dtype!r}; allowed: auto, {', '.join(_KV_DTYPE_BYTES)}")


def predict_sglang(shape, dtype, settings, overheads=DEFAULT_OVERHEADS):
    """SGLang's KV pool on one GPU → JSON-ready dict.

    total = free memory when the runner starts (after the CUDA context); after loading the weights,
    rest = free − total × (1 − mem_fraction_static), max_total_num_tokens = rest // cell_size, capped
    by --max-total-tokens. Source: python/sglang/srt/model_executor/model_runner.py
    profile_max_num_token / init_memory_pool."""
    mfs = settings.mem_fraction_static or next(f for t, f in _SGLANG_MFS_BY_TP if settings.tp >= t)
    free_at_start = settings.gpu_total_bytes - overheads.cuda_context_bytes
    weights = vllm_weights_bytes(shape, dtype, settings.tp)
    free_after_weights = free_at_start - weights
    rest = int(free_after_weights - free_at_start * (1 - mfs))
    cell = kv_bytes_per_token_per_gpu(shape, dtype, settings.kv_dtype, settings.tp)
    tokens = max(0, rest) // cell
    if settings.max_total_tokens:
        tokens = min(tokens, settings.max_total_tokens)
    tokens = tokens // settings.page_size * settings.page_size
    kvb = _KV_DTYPE_BYTES.get(settings.kv_dtype) or _compute_bytes(shape, dtype)
    return {
        "engine": "sglang",
        "mem_fraction_static": mfs,
        "weights_bytes": weights,
        "kv_cache_bytes_per_token": cell,
        "kv_cache_bytes": tokens * cell,
        "max_total_num_tokens": tokens,
        "kv_element_bytes": kvb,
        "tp": settings.tp,
        "peak_device_bytes": overheads.cuda_context_bytes + int(free_at_start * mfs),
    }


def log_lines(result):
    """The engine's own log lines for a `predict_vllm` / `predict_sglang` result, to compare line by line."""
    if result["engine"] == "sglang":
        half = result["kv_cache_bytes"] / 2 / GiB  # SGLang's "GB" is 2**30 bytes (mem_cache/memory_pool.py `GB = 1024 * 1024 * 1024`)
        return [f"KV Cache is allocated. #tokens: {result['max_total_num_tokens']}, K size: {half:.2f} GB, "
                f"V size: {half:.2f} GB",
                f"max_total_num_tokens={result['max_total_num_tokens']}"]
    L = result["max_model_len"]
    if result["log_style"] == "v0":
        return [f"# GPU blocks: {result['num_gpu_blocks']}, # CPU blocks: (swap space, not modelled)",
                f"Maximum concurrency for {L} tokens per request: {result['max_concurrency']:.2f}x"]
    return [f"Available KV cache memory: {result['kv_cache_bytes'] / GiB:.2f} GiB",
            f"GPU KV cache size: {result['kv_cache_tokens']:,} tokens",
            f"Maximum concurrency for {L:,} tokens per request: {result['max_concurrency']:.2f}x"]
