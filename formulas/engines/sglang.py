"""SGLang's memory budget: the KV pool (`max_total_num_tokens`) a server gets on one GPU, and whether it starts.

SGLang keeps `mem_fraction_static` of the memory that was free when the runner started (after the CUDA
context and the distributed init) for weights and KV cache; after loading the weights it turns
what is free, less (1 − mem_fraction_static) of that start figure, into KV cells. When the flag is not
given, 0.4.x took it from a table by TP size; 0.5.x computes it from a reserve for activations
(the chunked-prefill size), CUDA graphs (the decode batch sizes, and from 0.5.10 the prefill graphs)
and parallelism, with the chunked-prefill size and graph batch sizes picked by the GPU's memory.

Every version-dependent rule is one row of `SGLANG_RULES` (first, last, rule, behaviour, source: file,
line, release); docs/engines.md prints it. Sources read (PyPI): 0.4.6.post1, 0.5.5, 0.5.9, 0.5.15,
0.5.19, 0.5.23. Output contract: `predict_sglang` returns a JSON-ready dict of integer bytes and
counts; `log_lines` renders SGLang's own lines. Pure Python: no torch, no I/O.
"""

from dataclasses import dataclass

from ..dtypes import DTYPE_BYTES
from ..overhead import DEFAULT_OVERHEADS
from ..units import GiB, MiB
from .vllm import _KV_DTYPE_BYTES, kv_element_bytes, kv_layer_groups, vllm_model_dtype, vllm_weights_bytes

DEFAULT_SGLANG_VERSION = "0.5.23"
OLDEST_SGLANG = "0.4.0"
NEWEST_SGLANG = "0.5.23"
SGLANG_SOURCES_READ = ("0.4.6.post1", "0.5.5", "0.5.9", "0.5.15", "0.5.19", "0.5.23")


def parse_version(text):
    """'0.5.5.post2' → (0, 5, 5); major and minor must be numbers."""
    parts = str(text).strip().lstrip("v").split(".")
    if len(parts) < 2 or not parts[0].isdigit() or not parts[1].isdigit():
        raise ValueError(f"sglang version {text!r}: give a release such as 0.5.23 or 0.4.6.post1")
    patch = "".join(ch for ch in (parts[2] if len(parts) > 2 else "0").split("rc")[0] if ch.isdigit())
    return int(parts[0]), int(parts[1]), int(patch or 0)


# (first, last or None, rule, behaviour, source)
SGLANG_RULES = (
    ("0.4.0", "0.4.99", "mem_fraction_static", "by_tp",
     "GPUs ≤ 81,920 MiB: tp ≥ 16 → 0.79, ≥ 8 → 0.81, ≥ 4 → 0.85, ≥ 2 → 0.87, else 0.88; larger GPUs "
     "(mem − 13 GiB) / mem (sglang 0.4.6.post1 srt/server_args.py L224-L238)"),
    ("0.5.0", None, "mem_fraction_static", "reserve",
     "reserved MiB = 512 + max(chunked_prefill_size, 2048) × 1.5 + decode cuda_graph_max_bs × 2 + tp × pp / 8 × "
     "1024 (+ prefill graph reserve), at least 10,240 on GPUs > 60 GiB; mem_fraction_static = round((mem − "
     "reserved) / mem, 3) (sglang 0.5.5 srt/server_args.py L785-L823; 0.5.23 srt/arg_groups/memory_hook.py "
     "L273-L313). The first 0.5 release with the formula is assumed"),
    ("0.4.0", "0.4.99", "tiers", "v04",
     "chunked_prefill_size 2048 below 25,000 MiB, else 8192; cuda_graph_max_bs 8 (tp < 4) / 80 below 25,000 MiB, "
     "else 160 (sglang 0.4.6.post1 srt/server_args.py L240-L273)"),
    ("0.5.0", "0.5.19", "tiers", "v05",
     "by GPU memory: < 20 GiB 2048 / 8; < 35 GiB 2048 / 24 (tp < 4) or 80; < 60 GiB 4096 / 32 or 160; < 90 GiB "
     "8192 / 256 or 512; < 160 GiB 8192 / 256 or 512; else 16384 / 512 (sglang 0.5.5 server_args.py L689-L772; "
     "0.5.19 arg_groups/memory_hook.py L75-L90)"),
    ("0.5.20", None, "tiers", "v0520",
     "as v05, but < 35 GiB (A10, 4090, 5090): 4096 / 48 (tp < 4) or 160 (sglang 0.5.23 arg_groups/memory_hook.py "
     "L96-L115); 0.5.19 still 2048 / 24, the first release with 4096 is assumed to be 0.5.20"),
    ("0.4.0", "0.5.9", "prefill_graphs", "off",
     "piecewise (prefill) CUDA graphs off by default (sglang 0.5.9 srt/server_args.py L604 "
     "enable_piecewise_cuda_graph = False)"),
    ("0.5.10", None, "prefill_graphs", "on",
     "prefill graphs on by default on CUDA (Backend.BREAKABLE, sglang 0.5.15 model_executor/cuda_graph_config.py "
     "L95-L113): the reserve adds 8 MiB per captured prefill size (1.5 GiB under MLA) (0.5.15 server_args.py "
     "L3660-L3669; 0.5.23 memory_hook.py L318-L326); the first release with it is assumed to be 0.5.10"),
)


def sglang_rules(version):
    """{rule: (behaviour, source)} for one SGLang release."""
    v = parse_version(version)
    if v < parse_version(OLDEST_SGLANG) or v > parse_version(NEWEST_SGLANG):
        raise ValueError(f"sglang version {version}: modelled are {OLDEST_SGLANG} to {NEWEST_SGLANG}")
    out = {}
    for first, last, rule, behaviour, source in SGLANG_RULES:
        if parse_version(first) <= v and (last is None or v <= parse_version(last)):
            out[rule] = (behaviour, source)
    return out


_SGLANG_MFS_BY_TP = ((16, 0.79), (8, 0.81), (4, 0.85), (2, 0.87), (1, 0.88))
_MAMBA_FULL_MEMORY_RATIO = 0.9  # --mamba-full-memory-ratio (sglang 0.5.5 server_args.py L420)
_SWA_FULL_TOKENS_RATIO = 0.8  # --swa-full-tokens-ratio (sglang 0.5.5 server_args.py L273)


@dataclass(frozen=True)
class SglangSettings:
    """An SGLang server launch; 0 / None means SGLang's default for the version and GPU."""

    gpu_total_bytes: int  # the card's total memory (nvidia-smi's memory.total sets the tiers)
    mem_fraction_static: float = 0.0  # --mem-fraction-static (0: the version's automatic value)
    max_total_tokens: int = 0  # --max-total-tokens (0: none)
    tp: int = 1  # --tp
    kv_dtype: str = "auto"  # --kv-cache-dtype: auto | fp8_e4m3 | fp8_e5m2
    dtype: str = "auto"  # --dtype: auto | bfloat16 | float16 | float32
    page_size: int = 1  # --page-size: max_total_num_tokens is rounded down to it
    chunked_prefill_size: int = 0  # --chunked-prefill-size (0: the GPU tier's; -1: off)
    cuda_graph_max_bs: int = 0  # --cuda-graph-max-bs (0: the GPU tier's)
    disable_cuda_graph: bool = False  # --disable-cuda-graph
    version: str = DEFAULT_SGLANG_VERSION
    gpu_bf16: bool = True  # sm ≥ 80
    model_name: str = ""  # SGLang caps Llama-2's prefill graphs at 4096 by the model path

    def __post_init__(self):
        if self.gpu_total_bytes <= 0:
            raise ValueError(f"gpu_total_bytes: {self.gpu_total_bytes!r} must be positive")
        if not 0 <= self.mem_fraction_static < 1:
            raise ValueError(f"mem_fraction_static: {self.mem_fraction_static!r} must be in (0, 1)")
        if self.tp < 1:
            raise ValueError(f"tp: {self.tp!r} must be ≥ 1")
        if self.kv_dtype != "auto" and self.kv_dtype not in _KV_DTYPE_BYTES:
            raise ValueError(f"kv_dtype: {self.kv_dtype!r}; allowed: auto, {', '.join(_KV_DTYPE_BYTES)}")
        if self.page_size < 1 or self.max_total_tokens < 0 or self.cuda_graph_max_bs < 0 or \
                self.chunked_prefill_size < -1:
            raise ValueError("page_size must be ≥ 1; max_total_tokens, cuda_graph_max_bs ≥ 0; "
                             "chunked_prefill_size ≥ -1")
        sglang_rules(self.version)


def _decode_graph_sizes(max_bs):
    """Decode CUDA-graph batch sizes (sglang 0.5.23 arg_groups/cuda_graph_hook.py L500-L532)."""
    bs = [1, 2, 4, 8, 12] + list(range(16, 257, 8)) + list(range(272, 512, 16)) + list(range(512, max_bs + 1, 32))
    bs = [b for b in bs if b <= max_bs]
    if max_bs not in bs:
        bs.append(max_bs)
    return bs


def _prefill_graph_sizes(max_bs):
    """Prefill CUDA-graph token counts (sglang 0.5.23 arg_groups/cuda_graph_hook.py L480-L497)."""
    s = (list(range(4, 33, 4)) + list(range(48, 257, 16)) + list(range(288, 513, 32)) + list(range(576, 1025, 64))
         + list(range(1280, 4097, 256)) + list(range(4608, max_bs + 1, 512)))
    return [x for x in s if x <= max_bs]


def sglang_defaults(settings, shape):
    """(mem_fraction_static, chunked_prefill_size, cuda_graph_max_bs, reserved MiB or None) after SGLang's defaults.

    gpu_mem is nvidia-smi's memory.total in MiB (sglang srt/utils/common.py get_nvgpu_memory_capacity)."""
    rules = sglang_rules(settings.version)
    gpu_mem = settings.gpu_total_bytes / MiB
    tp = settings.tp
    tiers = rules["tiers"][0]
    if tiers == "v04":
        chunk = 2048 if gpu_mem < 25_000 else 8192
        max_bs = (8 if tp < 4 else 80) if gpu_mem < 25_000 else 160
    else:
        small = (4096, 48, 160) if tiers == "v0520" else (2048, 24, 80)
        table = ((20 * 1024, (2048, 8, 8)), (35 * 1024, small), (60 * 1024, (4096, 32, 160)),
                 (90 * 1024, (8192, 256, 512)), (160 * 1024, (8192, 256, 512)))
        chunk, bs_small, bs_large = next((v for limit, v in table if gpu_mem < limit), (16384, 512, 512))
        max_bs = bs_small if tp < 4 else bs_large
    chunk = settings.chunked_prefill_size or chunk
    max_bs = settings.cuda_graph_max_bs or max_bs
    if settings.mem_fraction_static:
        return settings.mem_fraction_static, chunk, max_bs, None
    if rules["mem_fraction_static"][0] == "by_tp":
        if gpu_mem <= 81920:
            mfs = next(f for t, f in _SGLANG_MFS_BY_TP if tp >= t)
        else:
            mfs = (gpu_mem - 1024 * 13) / gpu_mem
        return mfs, chunk, max_bs, None
    reserved = 512 + max(chunk if chunk > 0 else 16384, 2048) * 1.5 + tp / 8 * 1024
    if not settings.disable_cuda_graph:
        reserved += max_bs * 2
        if rules["prefill_graphs"][0] == "on" and chunk > 0:
            if shape.is_mla:
                reserved += 1.5 * 1024
            else:
                pmax = chunk
                if settings.max_total_tokens:
                    pmax = min(pmax, settings.max_total_tokens)
                if "llama-2" in settings.model_name.lower():
                    pmax = min(pmax, 4096)
                reserved += len(_prefill_graph_sizes(pmax)) * 8
    if gpu_mem > 60 * 1024:
        reserved = max(reserved, 10 * 1024)
    return round((gpu_mem - reserved) / gpu_mem, 3), chunk, max_bs, reserved


def _mamba_state_per_req(shape, config, tp, model_bytes):
    """Bytes of one request's linear-attention states over the state layers: conv in the model dtype, temporal in
    float32 (--mamba-ssm-dtype float32, sglang 0.5.5 server_args.py L419; configs/mamba_utils.py L114-L118)."""
    n = sum(g.count for g in shape.cache_groups if g.kind in ("state", "hybrid"))
    if not n:
        return 0
    if config and "linear_conv_kernel_dim" in config:
        nk, nv = config["linear_num_key_heads"], config["linear_num_value_heads"]
        dk, dv = config["linear_key_head_dim"], config["linear_value_head_dim"]
        conv = (dk * nk * 2 + dv * nv) // tp * (config["linear_conv_kernel_dim"] - 1) * model_bytes
        temporal = nv // tp * dk * dv * 4
        return (conv + temporal) * n
    g = next(g for g in shape.cache_groups if g.kind in ("state", "hybrid"))
    return (g.state_elems * model_bytes + g.state_fp32_elems * 4) // tp * n


def predict_sglang(shape, weight_dtype, settings, overheads=DEFAULT_OVERHEADS, config=None):
    """SGLang's KV pool on one GPU and its start-up → a JSON-ready dict.

    total = free memory when the runner starts (after the CUDA context); after the weights,
    rest = free − total × (1 − mem_fraction_static); linear-attention hybrids first set aside the mamba states
    (rest × 0.9 / 1.9 by default); max_total_num_tokens = rest // cell_size (attention layers only), capped by
    --max-total-tokens, rounded down to --page-size; sliding-window hybrids (gpt-oss) split it into a full pool and a
    SWA pool of 0.8 × as many tokens. Source: sglang 0.5.5 srt/model_executor/model_runner.py profile_max_num_token
    L1260-L1323, handle_max_mamba_cache L1325-L1365, init_memory_pool L1550-L1610, set_num_token_hybrid L1400-L1480;
    0.5.23 mem_cache/kv_cache_configurator.py _profile_available_bytes L2990-L3061."""
    mfs, chunk, max_bs, reserved = sglang_defaults(settings, shape)
    model_dtype = vllm_model_dtype(shape, settings.dtype, settings.gpu_bf16)
    mb = DTYPE_BYTES[model_dtype]
    kvb = kv_element_bytes(settings.kv_dtype, model_dtype)
    free_at_start = settings.gpu_total_bytes - overheads.cuda_context_bytes
    weights = vllm_weights_bytes(shape, weight_dtype, model_dtype, settings.tp)
    free_after_weights = free_at_start - weights
    rest = int(free_after_weights - free_at_start * (1 - mfs))
    groups = kv_layer_groups(shape, kvb, mb, settings.tp, config)
    attn = [g for g in groups if g.kind != "mamba"]
    full_layers = sum(g.count for g in attn if g.kind == "full")
    swa_layers = sum(g.count for g in attn if g.kind == "sliding")
    per_layer = max((g.bytes_per_token for g in attn), default=0)
    cell = per_layer * (full_layers + swa_layers)
    mamba_per_req = _mamba_state_per_req(shape, config, settings.tp, mb)
    mamba_reqs = 0
    if mamba_per_req and rest > 0:
        raw = rest * _MAMBA_FULL_MEMORY_RATIO / (1 + _MAMBA_FULL_MEMORY_RATIO)
        mamba_reqs = int(raw // mamba_per_req)
        rest -= mamba_reqs * mamba_per_req
    tokens = max(0, rest) // cell if cell else 0
    if settings.max_total_tokens:
        tokens = min(tokens, settings.max_total_tokens)
    tokens = tokens // settings.page_size * settings.page_size
    swa_tokens = 0
    if swa_layers and full_layers:
        total_tokens = tokens * (full_layers + swa_layers)
        full_tokens = int(total_tokens / (_SWA_FULL_TOKENS_RATIO * swa_layers + full_layers))
        swa_tokens = int(full_tokens * _SWA_FULL_TOKENS_RATIO)
        tokens = full_tokens
    kv_bytes = tokens * per_layer * full_layers + swa_tokens * per_layer * swa_layers if swa_tokens else tokens * cell
    if weights > free_at_start:
        startup = {"ok": False, "step": "load weights",
                   "message": f"CUDA out of memory loading {weights / GiB:.2f} GiB of weights into "
                              f"{free_at_start / GiB:.2f} GiB free"}
    elif tokens <= 0:
        startup = {"ok": False, "step": "allocate KV cache",
                   "message": f"Not enough memory. Please try to increase --mem-fraction-static. Current value: "
                              f"mem_fraction_static={mfs}"}
    else:
        startup = {"ok": True, "step": "", "message": ""}
    return {
        "engine": "sglang",
        "version": settings.version,
        "model_dtype": model_dtype,
        "mem_fraction_static": mfs,
        "mem_fraction_static_reserved_mib": reserved,
        "chunked_prefill_size": chunk,
        "cuda_graph_max_bs": max_bs,
        "weights_bytes": weights,
        "kv_cache_bytes_per_token": cell,
        "kv_cache_bytes": kv_bytes if startup["ok"] else 0,
        "max_total_num_tokens": tokens if startup["ok"] else 0,
        "swa_max_total_num_tokens": swa_tokens if startup["ok"] else 0,
        "max_mamba_cache_size": mamba_reqs,
        "mamba_state_bytes_per_request": mamba_per_req,
        "kv_element_bytes": kvb,
        "tp": settings.tp,
        "startup": startup,
        "peak_device_bytes": overheads.cuda_context_bytes + int(free_at_start * mfs) if startup["ok"] else
        settings.gpu_total_bytes,
    }


def log_lines(result):
    """SGLang's own log lines for a `predict_sglang` result."""
    s = result["startup"]
    if not s["ok"]:
        return [f"mem_fraction_static={result['mem_fraction_static']}",
                f"start-up fails at '{s['step']}': {s['message']}"]
    half = result["kv_cache_bytes"] / 2 / GiB  # SGLang's "GB" is 2**30 bytes (mem_cache/memory_pool.py GB = 1 << 30)
    lines = [f"mem_fraction_static={result['mem_fraction_static']}"]
    if result["swa_max_total_num_tokens"]:
        lines.append(f"Use Sliding window memory pool. full_layer_tokens={result['max_total_num_tokens']}, "
                     f"swa_layer_tokens={result['swa_max_total_num_tokens']}")
    lines += [f"KV Cache is allocated. #tokens: {result['max_total_num_tokens']}, K size: {half:.2f} GB, "
              f"V size: {half:.2f} GB",
              f"max_total_num_tokens={result['max_total_num_tokens']}"]
    return lines
