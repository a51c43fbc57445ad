"""vLLM's memory budget: how many KV-cache tokens a server gets on one GPU, and whether it starts at all.

vLLM does not ask "does it fit". It takes `gpu_memory_utilization` × the card's total, subtracts the
weights, the activation peak of one profiling run (a forward of `max_num_batched_tokens` tokens and
the sampler on `max_num_seqs` rows of logits over the whole vocabulary), the memory that appeared
outside torch and — by default from 0.20 — its own estimate of the CUDA-graph pool, and divides the
rest into KV-cache blocks. Then it captures CUDA graphs and (V1) warms the sampler up again, now with
the KV cache allocated. Each step can run out of memory; `predict_vllm` walks them in vLLM's order
and says which one fails (`startup`), never "fits" when a step cannot succeed.

Every version-dependent rule is one row of `VLLM_RULES` (first version, last version, engine, rule,
behaviour, source: file, line and release); docs/engines.md prints that table. Versions modelled:
0.2.0 to 0.21.x — the sources read are `VLLM_SOURCES_READ`; a newer version is refused rather than
answered with rules that were not read (0.34.0 sizes the KV cache after warm-up, "extensible KV cache").

Output contract: `predict_vllm` returns a JSON-ready dict of integer bytes and counts; `log_lines`
renders vLLM's own log lines from it. Pure Python: no torch, no I/O.
"""

import math
from dataclasses import dataclass

from ..dtypes import DTYPE_BYTES
from ..overhead import DEFAULT_OVERHEADS
from ..units import GiB, MiB
from ..weights import weight_storage

DEFAULT_VLLM_VERSION = "0.21.0"  # the newest release whose sources were read for every rule below
NEWEST_VLLM = "0.21.99"  # versions above this are refused (0.34.0 read: its KV sizing is a different algorithm)
OLDEST_VLLM = "0.2.0"
# vLLM releases whose source (PyPI sdist) was read for this module; the table cites file:line of these.
VLLM_SOURCES_READ = ("0.6.4", "0.8.5", "0.9.2", "0.10.2", "0.11.0", "0.12.0", "0.13.0", "0.14.1", "0.17.0",
                     "0.19.0", "0.20.0", "0.21.0", "0.34.0")

# vLLM's element size of the KV cache: "auto" is the model dtype, fp8 one byte
# (vllm 0.21.0 vllm/utils/torch_utils.py STR_DTYPE_TO_TORCH_DTYPE: "fp8" / "fp8_e4m3" / "fp8_e5m2").
_KV_DTYPE_BYTES = {"fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}
MODEL_DTYPES = ("auto", "bfloat16", "float16", "float32")  # vLLM --dtype
_MODEL_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "bf16": "bf16", "fp16": "fp16",
                      "fp32": "fp32", "half": "fp16", "float": "fp32"}

# Activations one token holds at the MLP peak of a decoder layer, in hidden-size units beside the MLP
# intermediates: the residual stream, the normed input and the layer output. With the gate/up output
# (2·I) and the SiluAndMul output (I) this reproduces the logged activation peak of Llama-3.1-8B in
# vLLM 0.6.4 at 20,000 and 29,000 batched tokens to 0.01 GiB (results/published/engines/vllm.json
# cases vllm-10517-20k / -29k; a fit on two published points, stated as such in docs/engines.md).
_HIDDEN_COPIES_AT_MLP_PEAK = 3
# At TP > 1 the row-parallel output is all-reduced out of place — pynccl's all_reduce allocates its output
# (vllm 0.9.2 distributed/device_communicators/pynccl.py L110-L123 `out_tensor = torch.empty_like(in_tensor)`), and
# the custom all-reduce returns a new tensor — so two more hidden-size tensors live at the layer's peak. Two
# published TP-2 start-ups agree: Qwen2.5-32B at 10,000 tokens (1.26 GiB logged, 1.25 with these, 1.06 without)
# and a worker of R1-Distill-Qwen-14B at 2,048 (0.19 logged, 0.18 with, 0.14 without).
_TP_ALLREDUCE_COPIES = 2

# torch.sort of a [rows, vocab] float32 tensor on CUDA (aten/src/ATen/native/cuda/SortStable.cu,
# pytorch main): besides the values (4 B) and int64 indices (8 B) it returns, rows ≥ 128 take
# `segmented_sort_pairs` — an int64 reverse-index buffer (8 B) and cub's segmented radix sort, whose
# non-double-buffer call allocates alternate key and value buffers (4 + 8 B); fewer rows take
# `segmented_sort_pairs_by_full_sort` — two int2 buffers (16 B) and the same cub alternates (4 + 8 B).
_SORT_OUT = 4 + 8
_SORT_TEMP_SEGMENTED = 8 + 12
_SORT_TEMP_FULL = 16 + 12
# vLLM ≥ 0.20's Triton top-k/top-p keeps one float32 row of the vocabulary per program, programs =
# min(next_pow2(rows), SMs) (vllm 0.21.0 vllm/v1/sample/ops/topk_topp_triton.py L1010-L1019). The SM
# count is not in the hardware catalog; 128 stands for it (A100 108, RTX 4090 128, H100 132).
_TRITON_TOPK_PROGRAMS = 128

# Memory that appears outside torch during a TP > 1 start-up where vLLM's baseline snapshot precedes
# the distributed init (V0, and V1 before 0.11): NCCL's channel buffers and vLLM's custom all-reduce
# buffers (vllm 0.21.0 distributed/device_communicators/custom_all_reduce.py L58, L175-L186: 2 × 8 MiB
# cudaMalloc + 8 MiB torch). NCCL's share depends on channels and topology and is not derived here:
# fitted — the median non-torch memory vLLM logged at TP 2 in three published start-ups (0.25, 0.30,
# 0.39 GiB; results/published/engines/vllm.json) less the 32 MiB workspace default. Stated in docs.
TP_COMM_BYTES = 276 * MiB

# CUDA graphs. vLLM measures the pool ("Graph capturing finished in N secs, took X GiB"); what it holds
# beyond the outputs of the largest captured batch is driver memory per captured kernel, which the source
# does not state. Fitted per captured (graph × decoder layer) on one published start-up each, stated in
# docs/engines.md: V0 whole-step graphs — Llama-3.2-1B, 35 graphs × 16 layers took 0.21 GiB
# (https://github.com/vllm-project/vllm/pull/11349, V0 0.6.x); V1 graphs, fused by torch.compile — Qwen3-8B
# on vLLM 0.21.0, whose own estimate for 51 piecewise + 35 full graphs was 0.52 GiB
# (https://github.com/LMCache/LMCache/issues/3430): (0.52 GiB − the 512-token pool) / (37 + 50·37 + 34·36).
_GRAPH_BYTES_PER_LAYER_V0 = 366 * 1024  # (0.21 GiB − the 256-token pool) / 560
_GRAPH_BYTES_PER_LAYER_V1 = 160 * 1024


def parse_version(text):
    """'0.6.4.post1' → (0, 6, 4). Major and minor must be numbers; anything else is a ValueError."""
    s = str(text).strip().lstrip("v")
    parts = s.split(".")
    if len(parts) < 2 or not parts[0].isdigit() or not parts[1].isdigit():
        raise ValueError(f"vllm version {text!r}: give a release such as 0.21.0 or 0.6.4.post1")
    patch = "".join(ch for ch in (parts[2] if len(parts) > 2 else "0").split("rc")[0] if ch.isdigit())
    return int(parts[0]), int(parts[1]), int(patch or 0)


# Every version-dependent rule: (first, last or None, engine "v0" | "v1" | "any", rule, behaviour, source).
# `vllm_rules` reads the row whose range and engine hold the launch. Line numbers are of the release named.
VLLM_RULES = (
    # ---- which engine runs
    ("0.2.0", "0.7.3", "any", "engines", "v0",
     "V1 was opt-in (VLLM_USE_V1=1) before 0.8.0; modelled as V0"),
    ("0.8.0", "0.10.99", "any", "engines", "v1, v0",
     "V1 the default, V0 with VLLM_USE_V1=0 (vllm 0.10.2 vllm/envs.py L745-L746; vllm/worker/ still shipped)"),
    ("0.11.0", None, "any", "engines", "v1",
     "V0 removed: vllm 0.11.0 vllm/worker/ holds only worker_base.py"),
    # ---- what the KV budget subtracts
    ("0.2.0", "0.2.4", "v0", "budget", "torch_peak_only",
     "available = total × util − torch.cuda.max_memory_allocated() after profiling; nothing outside torch "
     "(vllm/worker/worker.py before https://github.com/vllm-project/vllm/pull/2031)"),
    ("0.2.5", "0.6.3", "v0", "budget", "device_peak",
     "available = total × util − (total − free after profiling): the whole device, CUDA context and NCCL "
     "(PR #2031; v0.6.3 worker.py `peak_memory = self.init_gpu_memory - free_gpu_memory`)"),
    ("0.6.4", "0.6.4", "v0", "budget", "torch_peak_plus_non_torch",
     "torch peak (weights included) + memory outside torch, context included (vllm 0.6.4 vllm/worker/worker.py "
     "L201-L217, log 'Memory profiling results: total_gpu_memory=…')"),
    ("0.6.5", "0.10.99", "v0", "budget", "memory_profiling",
     "weights + torch peak increase + non-torch increase over a baseline taken after the CUDA context and before "
     "the distributed init (vllm 0.9.2 vllm/worker/worker.py L188-L193; vllm/utils memory_profiling, PR #10511)"),
    ("0.8.0", "0.9.1", "v1", "budget", "torch_peak_plus_non_torch",
     "V1 gpu_worker.determine_available_memory before https://github.com/vllm-project/vllm/pull/19312: torch peak "
     "+ (used − torch allocated), context and NCCL included (vllm 0.8.5 vllm/v1/worker/gpu_worker.py L178-L211)"),
    ("0.9.2", None, "v1", "budget", "memory_profiling",
     "V1 reuses memory_profiling (PR #19312; vllm 0.21.0 vllm/v1/worker/gpu_worker.py L388-L447)"),
    # ---- whether NCCL and the custom all-reduce buffers count against the KV budget (TP > 1)
    ("0.2.0", "0.10.99", "any", "tp_buffers", "in_budget",
     "the baseline snapshot is taken before init_worker_distributed_environment (vllm 0.10.2 "
     "vllm/v1/worker/gpu_worker.py L175 vs L193; vllm 0.9.2 vllm/worker/worker.py L188 vs L193)"),
    ("0.11.0", None, "v1", "tp_buffers", "outside_budget",
     "the snapshot follows the distributed init ('take memory snapshot after NCCL is initialized', vllm 0.21.0 "
     "vllm/v1/worker/gpu_worker.py L283-L303): NCCL buffers come out of the (1 − util) margin, and "
     "request_memory compares the free memory after them with total × util (vllm/v1/worker/utils.py L403-L421)"),
    # ---- the sampler of the profiling run (and, V1, of the warm-up after graph capture)
    ("0.2.0", "0.10.99", "v0", "sampler", "sort",
     "profile_run samples with SamplingParams(top_p=0.99, top_k=vocab−1) (vllm 0.6.4 vllm/worker/model_runner.py "
     "L1211): logits in the model dtype, a float32 copy (sampler.py L269), logits.sort (values, int64 indices and "
     "torch's sort buffers, sampler.py L431); the same in 0.9.2 (sampler.py L403)"),
    ("0.8.0", "0.11.99", "v1", "sampler", "sort",
     "_dummy_sampler_run with top_k = vocab−1, top_p 0.9 (vllm 0.11.0 gpu_model_runner.py L3183): float32 logits "
     "(sampler.py), then apply_top_k_top_p's logits.sort (topk_topp_sampler.py L164-L190). FlashInfer's sampler "
     "replaces the sort only where flashinfer is installed: in 0.11.0 it is the optional extra vllm[flashinfer] "
     "(setup.py L669), so the pip default sorts (the docker image ships flashinfer: pass sampler='flashinfer')"),
    ("0.12.0", "0.20.99", "v1", "sampler", "flashinfer",
     "flashinfer-python is a dependency (vllm 0.12.0 requirements/cuda.txt): top_k_top_p_sampling_from_logits — "
     "float32 logits, top-k masked logits and probabilities (topk_topp_sampler.py forward_cuda)"),
    ("0.21.0", None, "v1", "sampler", "flashinfer_then_native",
     "_dummy_sampler_run calls the sampler twice (vllm 0.21.0 gpu_model_runner.py L5742-L5765): FlashInfer, then "
     "forward_native with a generator — Triton top-k/top-p in place plus its per-program buffer, float32 "
     "probabilities and exponential noise (topk_topp_sampler.py L111-L130, L385-L400)"),
    # ---- CUDA graphs: which are captured, and whether the budget counts them
    ("0.2.0", "0.10.99", "v0", "cudagraph_mode", "v0_full",
     "whole decode-step graphs for batch sizes [1, 2, 4, 8, 16, …] up to the first ≥ max_num_seqs "
     "(vllm 0.9.2 vllm/config.py L4693-L4722)"),
    ("0.8.0", "0.9.99", "v1", "cudagraph_mode", "piecewise_512",
     "PIECEWISE graphs (torch.compile splits at attention), sizes [1, 2, 4] + range(8, 513, 8) ≤ "
     "max_num_batched_tokens (vllm 0.9.2 vllm/config.py L2133, L4724-L4740)"),
    ("0.10.0", "0.10.99", "v1", "cudagraph_mode", "piecewise",
     "PIECEWISE, sizes [1, 2, 4] + range(8, min(2·max_num_seqs, 512) + 1, 8) (vllm 0.10.2 vllm/config "
     "L3586, L3655); the first 0.10 release is assumed"),
    ("0.11.0", "0.11.99", "v1", "cudagraph_mode", "full_and_piecewise_8",
     "FULL_AND_PIECEWISE (vllm 0.11.0 vllm/config/__init__.py L365-L366): FULL decode graphs for sizes ≤ "
     "max_num_seqs and PIECEWISE for all sizes, [1, 2, 4] + range(8, min(2·max_num_seqs, 512) + 1, 8) "
     "(L551-L600)"),
    ("0.12.0", None, "v1", "cudagraph_mode", "full_and_piecewise_16",
     "FULL_AND_PIECEWISE, sizes [1, 2, 4] + range(8, 256, 8) + range(256, min(2·max_num_seqs, 512) + 1, 16) ≤ "
     "max_num_batched_tokens (vllm 0.12.0 vllm/config/vllm.py L994-L998; 0.21.0 L1476-L1556)"),
    ("0.2.0", "0.18.99", "any", "cudagraphs", "not_counted",
     "graphs are captured after the KV cache is allocated and come on top of total × util "
     "(gpu_worker.compile_or_warm_up_model → capture_model after initialize_from_config)"),
    ("0.19.0", "0.19.99", "v1", "cudagraphs", "estimated_not_counted",
     "vLLM estimates the graph pool during profiling (profile_cudagraph_memory) and logs it, but subtracts it only "
     "with VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS=1 (default 0: vllm 0.19.0 vllm/envs.py L1654-L1656)"),
    ("0.20.0", None, "v1", "cudagraphs", "estimate_counted",
     "the estimate is subtracted by default (vllm 0.20.0 vllm/envs.py L1724-L1726, default '1'; 0.21.0 "
     "gpu_worker.py L398-L447). The log says 'default since v0.21.0'; the 0.20.0 source already defaults to it"),
    # ---- batch defaults
    ("0.2.0", "0.6.4", "v0", "batch_defaults", "v0_chunk512",
     "max_num_seqs 256; without chunked prefill max_num_batched_tokens = max(max_model_len, 2048), chunked "
     "prefill (on by default above max_model_len 32,768 in the OpenAI server) 512 (vllm/config.py "
     "SchedulerConfig, 0.6.x)"),
    ("0.6.5", "0.10.99", "v0", "batch_defaults", "v0_chunk2048",
     "as above with DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048 (vllm 0.9.2 vllm/utils/__init__.py L81; "
     "arg_utils.py _set_default_args_v0 L1507-L1569: chunked prefill above 32,768 unless sliding window or MLA, "
     "max_num_seqs 256); the first release with 2048 is assumed to be 0.6.5"),
    ("0.8.0", None, "v1", "batch_defaults", "v1",
     "OpenAI server: ≥ 70 GiB and not an A100: 8192 tokens / 1024 seqs, else 2048 / 256; LLM class 16384 / 1024 "
     "and 8192 / 256 (vllm 0.21.0 vllm/engine/arg_utils.py L2217-L2265). 0.34.0 adds a ≥ 160 GiB tier "
     "(16384); not in the modelled range"),
    # ---- defaults and options
    ("0.2.0", "0.19.99", "any", "utilization_default", "0.90",
     "gpu_memory_utilization default 0.9 (vllm 0.19.0 vllm/config/cache.py L41)"),
    ("0.20.0", None, "any", "utilization_default", "0.92",
     "gpu_memory_utilization default 0.92 (vllm 0.20.0 vllm/config/cache.py L66; 0.21.0 L66)"),
    ("0.2.0", "0.9.99", "any", "kv_cache_memory", "absent",
     "no --kv-cache-memory (vllm 0.9.2 vllm/config.py has no kv_cache_memory_bytes)"),
    ("0.10.0", None, "v1", "kv_cache_memory", "replaces_profiling_budget",
     "--kv-cache-memory BYTES: the profile run still runs, the budget is the given bytes (vllm 0.21.0 "
     "gpu_worker.py L366-L384; present in 0.10.2, absent in 0.9.2; 0.10.0 assumed)"),
    ("0.2.0", "0.13.99", "any", "max_model_len_auto", "absent",
     "--max-model-len takes a number (vllm 0.13.0 has no auto-fit)"),
    ("0.14.0", None, "v1", "max_model_len_auto", "auto_fit",
     "--max-model-len -1 | auto: the largest length whose KV fits (vllm 0.21.0 vllm/utils/argparse_utils.py "
     "L75-L89, v1/core/kv_cache_utils.py _auto_fit_max_model_len L1816-L1878; present in 0.14.1, 0.14.0 assumed)"),
    # ---- KV cache layout
    ("0.2.0", "0.10.99", "v0", "kv_groups", "uniform",
     "every attention layer holds every token (V0 CacheEngine: num_attention_layers × block bytes)"),
    ("0.8.0", "0.9.1", "v1", "kv_groups", "uniform",
     "one KV group; sliding-window layers are sized as full attention (hybrid allocator not yet in 0.8.5)"),
    ("0.9.2", None, "v1", "kv_groups", "hybrid",
     "hybrid allocator: layers grouped by spec into groups of equal size, one page size, num_blocks = available // "
     "page // group_size (vllm 0.21.0 v1/core/kv_cache_utils.py L1052-L1172, L1231-L1316); mamba pages padded to "
     "the attention page, attention block size raised to hold a mamba state (platforms/interface.py L584-L670)"),
    ("0.2.0", "0.20.99", "any", "kv_tokens_log", "blocks_per_group",
     "'GPU KV cache size: N tokens' with N = num_blocks // len(groups) × block_size (vllm 0.19.0 "
     "v1/core/kv_cache_utils.py L1301-L1306)"),
    ("0.21.0", None, "v1", "kv_tokens_log", "concurrency",
     "N = int(max_concurrency × max_model_len), the concurrency from the blocks one max_model_len request needs in "
     "every group (vllm 0.21.0 v1/core/kv_cache_utils.py L872-L891, L1686-L1716)"),
    ("0.2.0", "0.10.99", "v0", "log", "v0",
     "V0 logs '# GPU blocks: N, # CPU blocks: M' (0.7–0.10 '# cuda blocks', vllm 0.7.3 executor/executor_base.py "
     "L111-L116) and 'Maximum concurrency for L tokens per request: C.CCx'; then refuses 0 blocks or fewer tokens "
     "than max_model_len (vllm 0.6.4 worker/worker.py raise_if_cache_size_invalid L486-L497)"),
    ("0.8.0", None, "v1", "log", "v1",
     "V1 logs 'Available KV cache memory: X GiB', 'GPU KV cache size: N tokens', 'Maximum concurrency …'"),
)

_RULE_NAMES = ("budget", "tp_buffers", "sampler", "cudagraph_mode", "cudagraphs", "batch_defaults",
               "utilization_default", "kv_cache_memory", "max_model_len_auto", "kv_groups", "kv_tokens_log", "log")


def _in_range(v, first, last):
    return parse_version(first) <= v and (last is None or v <= parse_version(last))


def vllm_engines(version):
    """The engines a vLLM release can run, default first: ('v1', 'v0'), ('v0',) or ('v1',)."""
    v = parse_version(version)
    if v < parse_version(OLDEST_VLLM):
        raise ValueError(f"vllm version {version}: older than the oldest modelled ({OLDEST_VLLM})")
    if v > parse_version(NEWEST_VLLM):
        raise ValueError(f"vllm version {version}: newer than the newest modelled (0.21.x); its KV sizing was not "
                         "read (0.34.0 sizes the cache after warm-up) — pass --vllm-version 0.21.0 or older")
    row = next(r for r in VLLM_RULES if r[3] == "engines" and _in_range(v, r[0], r[1]))
    return tuple(e.strip() for e in row[4].split(","))


def vllm_rules(version, engine=None):
    """{rule: (behaviour, source)} for one release and engine ("v0" | "v1"; None: the release's default)."""
    engines = vllm_engines(version)
    engine = engine or engines[0]
    if engine not in engines:
        raise ValueError(f"vllm {version} runs {' and '.join(engines).upper()} only, not {engine.upper()}")
    v = parse_version(version)
    out = {"engine": (engine, "")}
    for first, last, eng, rule, behaviour, source in VLLM_RULES:
        if rule != "engines" and eng in (engine, "any") and _in_range(v, first, last):
            out[rule] = (behaviour, source)
    return out


@dataclass(frozen=True)
class VllmSettings:
    """A vLLM server launch, as its flags set it; None means vLLM's default for the version, engine and GPU."""

    gpu_total_bytes: int  # what torch.cuda.mem_get_info reports as total (vLLM logs it as total_gpu_memory)
    max_model_len: int  # --max-model-len; -1 = auto (0.14+: the longest that fits); 0 = the model's positions
    gpu_memory_utilization: float = None  # --gpu-memory-utilization (None: 0.9, or 0.92 from 0.20.0)
    max_num_seqs: int = 0  # --max-num-seqs (0: default of the version and GPU)
    max_num_batched_tokens: int = 0  # --max-num-batched-tokens (0: default)
    tp: int = 1  # --tensor-parallel-size
    kv_dtype: str = "auto"  # --kv-cache-dtype: auto (model dtype) | fp8 | fp8_e4m3 | fp8_e5m2
    dtype: str = "auto"  # --dtype: auto | bfloat16 | float16 | float32 (the model's compute and KV dtype)
    block_size: int = 16  # --block-size
    enforce_eager: bool = False  # --enforce-eager: no CUDA graphs
    version: str = DEFAULT_VLLM_VERSION  # vLLM release whose accounting to follow
    engine: str = None  # "v0" | "v1" (VLLM_USE_V1); None: the release's default
    gpu_name: str = ""  # for the default batch sizes (vLLM exempts A100s from the large defaults)
    gpu_bf16: bool = True  # whether the GPU computes in bf16 (sm ≥ 80): "auto" of an fp32 config resolves to it
    enable_chunked_prefill: bool = None  # V0 only; None = vLLM's default (on above max_model_len 32,768)
    kv_cache_memory_bytes: int = 0  # --kv-cache-memory (0.10+): replaces the profiled budget
    sampler: str = None  # "sort" | "flashinfer": override the version's default sampler path
    usage: str = "server"  # "server" (vllm serve) | "llm" (the LLM class): picks the batch defaults

    def __post_init__(self):
        if self.gpu_total_bytes <= 0:
            raise ValueError(f"gpu_total_bytes: {self.gpu_total_bytes!r} must be positive")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization: {self.gpu_memory_utilization!r} must be in (0, 1]")
        if self.max_model_len < -1:
            raise ValueError(f"max_model_len: {self.max_model_len!r} must be positive, or -1 (auto)")
        if self.tp < 1:
            raise ValueError(f"tp: {self.tp!r} must be ≥ 1")
        if self.kv_dtype != "auto" and self.kv_dtype not in _KV_DTYPE_BYTES:
            raise ValueError(f"kv_dtype: {self.kv_dtype!r}; allowed: auto, {', '.join(_KV_DTYPE_BYTES)}")
        if self.dtype not in MODEL_DTYPES and self.dtype not in _MODEL_DTYPE_NAMES:
            raise ValueError(f"dtype: {self.dtype!r}; allowed: {', '.join(MODEL_DTYPES)}")
        if self.block_size <= 0:
            raise ValueError(f"block_size: {self.block_size!r} must be positive")
        if self.max_num_seqs < 0 or self.max_num_batched_tokens < 0 or self.kv_cache_memory_bytes < 0:
            raise ValueError("max_num_seqs, max_num_batched_tokens and kv_cache_memory_bytes must be ≥ 0")
        if self.sampler not in (None, "sort", "flashinfer"):
            raise ValueError(f"sampler: {self.sampler!r}; allowed: sort, flashinfer")
        if self.usage not in ("server", "llm"):
            raise ValueError(f"usage: {self.usage!r}; allowed: server, llm")
        rules = vllm_rules(self.version, self.engine)  # raises for unknown versions and engines
        if self.kv_cache_memory_bytes and rules.get("kv_cache_memory", ("absent",))[0] == "absent":
            raise ValueError(f"kv_cache_memory_bytes: vLLM {self.version} ({rules['engine'][0].upper()}) has no "
                             "--kv-cache-memory (V1 from 0.10)")
        if self.max_model_len == -1 and rules.get("max_model_len_auto", ("absent",))[0] == "absent":
            raise ValueError(f"max_model_len: vLLM {self.version} takes no 'auto' (-1) length (V1 from 0.14)")


# ------------------------------------------------------------------ dtypes

def vllm_model_dtype(shape, dtype="auto", gpu_bf16=True):
    """The dtype vLLM computes in and keeps the KV cache in ("auto" KV): --dtype, else the checkpoint's.

    A config without torch_dtype is read from the safetensors dtypes, else taken as float32 (vllm 0.21.0
    vllm/transformers_utils/model_arch_config_convertor.py L134-L171); "auto" turns float32 into the
    platform's first supported dtype — bfloat16 from sm80, float16 before (vllm/config/model.py
    _resolve_auto_dtype L1948-L1970, platforms/cuda.py L175-L184). gpt-oss ships no torch_dtype and bf16
    tensors beside its mxfp4 experts: bf16."""
    name = _MODEL_DTYPE_NAMES.get(dtype)
    if name:
        return name
    cfg = shape.config_dtype if shape.config_dtype in ("bf16", "fp16", "fp32") else "fp32"
    if cfg == "fp32":
        return "bf16" if gpu_bf16 else "fp16"
    if cfg == "bf16" and not gpu_bf16:
        return "fp16"  # _resolve_auto_dtype: bf16 unsupported → the preferred dtype
    return cfg


def kv_element_bytes(kv_dtype, model_dtype):
    """Bytes of one KV element: fp8 variants one byte, "auto" the model dtype."""
    return _KV_DTYPE_BYTES.get(kv_dtype) or DTYPE_BYTES[model_dtype]


# ------------------------------------------------------------------ KV layer specs

@dataclass(frozen=True)
class KvLayerGroup:
    """Layers with one KV-cache spec, as vLLM's get_kv_cache_spec gives them, on one GPU."""

    kind: str  # full | sliding | mamba
    count: int  # layers of this spec
    bytes_per_token: int = 0  # attention: K + V bytes one token adds to one layer on this GPU
    window: int = 0  # sliding: the window
    state_bytes: int = 0  # mamba: conv + temporal state bytes per request per layer on this GPU


def _gdn_state_bytes(config, tp, el):
    """Qwen3-Next / Qwen3.5 gated-delta-net state: conv (conv_dim/tp, kernel − 1) + temporal (v_heads/tp, dv, dk),
    both in the mamba cache dtype (auto = model dtype). Source: vllm 0.21.0 model_executor/layers/mamba/mamba_utils.py
    gated_delta_net_state_shape L213-L234 and _mamba_state_dtype L84-L96."""
    nk, nv = config["linear_num_key_heads"], config["linear_num_value_heads"]
    dk, dv = config["linear_key_head_dim"], config["linear_value_head_dim"]
    conv_dim = dk * nk * 2 + dv * nv
    return (conv_dim // tp * (config["linear_conv_kernel_dim"] - 1) + nv // tp * dv * dk) * el


def kv_layer_groups(shape, kv_bytes, model_bytes, tp=1, config=None):
    """[KvLayerGroup] of one GPU: K and V of max(1, n_kv_heads / tp) heads per attention layer (KV heads are
    replicated when tp exceeds them), one latent per layer under MLA, states for linear-attention layers.

    Source: vllm 0.21.0 v1/kv_cache_interface.py AttentionSpec.real_page_size_bytes L154-L171 (2 · block · heads ·
    head size · dtype), MLAAttentionSpec L341-L355; ModelConfig.get_num_kv_heads (max(1, total // tp))."""
    if shape.is_mla:
        per = (shape.kv_lora_rank + shape.qk_rope_head_dim) * kv_bytes
        return [KvLayerGroup("full", shape.n_layers, per)]
    heads = max(shape.n_kv_heads, 1)
    kv_heads = max(1, heads // tp)
    if not shape.cache_groups:
        per = 2 * kv_heads * shape.head_dim * kv_bytes
        kind = "sliding" if shape.sliding_window else "full"
        return [KvLayerGroup(kind, shape.n_layers, per, window=shape.sliding_window)]
    groups = []
    for g in shape.cache_groups:
        if g.kind in ("full", "sliding", "hybrid") and g.kv_per_token:
            per = g.kv_per_token * kv_heads // heads * kv_bytes
            kind = "sliding" if g.kind == "sliding" and g.window else "full"
            groups.append(KvLayerGroup(kind, g.count, per, window=g.window if kind == "sliding" else 0))
        if g.kind in ("state", "hybrid"):
            if config and "linear_conv_kernel_dim" in config and "linear_num_value_heads" in config:
                state = _gdn_state_bytes(config, tp, model_bytes)
            else:  # the state transformers keeps, split like the heads, in the model dtype (vLLM's auto)
                state = (g.state_elems + g.state_fp32_elems) // tp * model_bytes
            groups.append(KvLayerGroup("mamba", g.count, state_bytes=state))
    return groups


def _cdiv(a, b):
    return -(-a // b)


@dataclass(frozen=True)
class KvPlan:
    """vLLM's KV-cache layout for a budget: groups, page size, block count, and what it logs."""

    groups: tuple  # ((kind, layers in the group, window, max bytes one max_model_len request needs), …)
    block_size: int  # tokens per block (raised for mamba hybrids)
    page_bytes: int  # bytes of one block of one layer
    group_size: int  # layers per group (pools of page_bytes × num_blocks each)
    num_blocks: int
    bytes_per_token: int  # KV bytes one token takes over every attention layer (sliding layers included)
    bytes_per_block_all_groups: int  # page_bytes × group_size: the memory one block id costs
    request_bytes: int  # what one max_model_len request needs (vLLM's check at start-up)


def _spec_max_bytes(g, page, block, max_model_len, max_num_batched_tokens):
    """max_memory_usage_bytes of one layer spec (vllm 0.21.0 v1/kv_cache_interface.py: full L197-L205, sliding
    L443-L474, mamba L562-L569 with mamba_cache_mode 'none')."""
    if g.kind == "mamba":
        return page
    if g.kind == "sliding":
        tokens = min(g.window - 1 + max_num_batched_tokens, max_model_len)
        return (_cdiv(tokens, block) + 1) * page
    return _cdiv(max_model_len, block) * page


def vllm_kv_plan(layer_groups, available_bytes, block_size, max_model_len, max_num_batched_tokens, hybrid=True):
    """Blocks and logged tokens for a KV budget, as vLLM's KV-cache manager computes them.

    Uniform (one spec, or V0 / hybrid allocator off): every attention layer holds every token — a block costs
    block_size × bytes per token over all layers. Hybrid: layers grouped by spec into groups of `group_size`
    layers (the smallest count, or the largest when below 1.5× the smallest; padded), one page size for all
    (mamba states padded to the attention page, the attention block raised so a page holds a state), and
    num_blocks = available // page // group_size. Source: vllm 0.21.0 v1/core/kv_cache_utils.py L1052-L1172,
    L1231-L1316, L1718-L1780; platforms/interface.py L584-L670."""
    attn = [g for g in layer_groups if g.kind != "mamba"]
    mamba = [g for g in layer_groups if g.kind == "mamba"]
    per_token_all = sum(g.bytes_per_token * g.count for g in attn)
    kinds = {(g.kind, g.bytes_per_token, g.window, g.state_bytes) for g in layer_groups}
    if not hybrid or len(kinds) == 1:
        if mamba and not attn:
            page = mamba[0].state_bytes
            layers = sum(g.count for g in mamba)
            block = block_size
            num_blocks = max(0, available_bytes) // (page * layers) if page else 0
            req = page * layers
            return KvPlan((("mamba", layers, 0, req),), block, page, layers, num_blocks, 0, page * layers, req)
        block = block_size
        per_block = per_token_all * block
        num_blocks = max(0, available_bytes) // per_block if per_block else 0
        req = _cdiv(max_model_len, block) * per_block
        return KvPlan((("full", sum(g.count for g in attn), 0, req),), block, per_block, 1, num_blocks,
                      per_token_all, per_block, req)
    # hybrid: one page size for every layer
    attn_token = max(g.bytes_per_token for g in attn) if attn else 0
    block = block_size
    if mamba:
        state = max(g.state_bytes for g in mamba)
        block = block_size * _cdiv(state, block_size * attn_token)  # kernel alignment 16 = block_size default
    page = attn_token * block if attn else max(g.state_bytes for g in mamba)
    counts = {}
    for g in layer_groups:
        key = (g.kind, g.bytes_per_token, g.window, g.state_bytes)
        counts[key] = counts.get(key, 0) + g.count
    smallest, largest = min(counts.values()), max(counts.values())
    group_size = largest if largest < smallest * 1.5 else smallest
    groups = []
    for (kind, per, window, state), n in counts.items():
        spec = KvLayerGroup(kind, n, per, window, state)
        need = _spec_max_bytes(spec, page, block, max_model_len, max_num_batched_tokens)
        for _ in range(_cdiv(n, group_size)):
            groups.append((kind, group_size, window, need))
    num_blocks = max(0, available_bytes) // page // group_size
    blocks_per_request = sum(_cdiv(need, page) for _, _, _, need in groups)
    req = group_size * page * blocks_per_request
    return KvPlan(tuple(groups), block, page, group_size, num_blocks, per_token_all, page * group_size, req)


def kv_tokens_logged(plan, max_model_len, style):
    """'GPU KV cache size: N tokens': blocks per group × block size (≤ 0.20), or concurrency × max_model_len (0.21)."""
    if style == "concurrency":
        return int(kv_concurrency(plan) * max_model_len)
    return plan.num_blocks // len(plan.groups) * plan.block_size


def kv_concurrency(plan):
    """'Maximum concurrency': blocks over the blocks one max_model_len request needs in every group
    (vllm 0.21.0 v1/core/kv_cache_utils.py get_max_concurrency_for_kv_cache_config L872-L891)."""
    per_request = _cdiv(plan.request_bytes, plan.bytes_per_block_all_groups)
    return plan.num_blocks / per_request if per_request else 0.0


def kv_bytes_per_token_per_gpu(shape, dtype, kv_dtype="auto", tp=1, gpu_bf16=True, config=None):
    """KV-cache bytes one token takes on one GPU over every attention layer, as vLLM and SGLang size a page.

    `dtype` is vLLM's --dtype (auto | bfloat16 | …; a vramlab weight dtype that is not a float means auto)."""
    model = vllm_model_dtype(shape, dtype if dtype in MODEL_DTYPES or dtype in _MODEL_DTYPE_NAMES else "auto",
                             gpu_bf16)
    kvb = kv_element_bytes(kv_dtype, model)
    return sum(g.bytes_per_token * g.count
               for g in kv_layer_groups(shape, kvb, DTYPE_BYTES[model], tp, config) if g.kind != "mamba")


# ------------------------------------------------------------------ weights and activations

# mxfp4 MoE kernels pad the expert matrices: Marlin rounds hidden to 256 and intermediate to 128, TRT-LLM both to
# 256, the Triton (OpenAI triton_kernels) path intermediate to 64 (vllm 0.21.0 model_executor/layers/fused_moe/oracle/
# mxfp4.py mxfp4_round_up_hidden_size_and_intermediate_size L561-L589). gpt-oss picks TRT-LLM on sm100, Triton on
# sm90–sm10x, else Marlin (priority list L231-L249; experts/gpt_oss_triton_kernels_moe.py L524-L535:
# 9.0 ≤ capability < 11.0).
_MXFP4_PAD = {"marlin": (256, 128), "trtllm": (256, 256), "triton": (1, 64)}


def mxfp4_backend_for(gpu_name):
    """The mxfp4 MoE backend vLLM picks for gpt-oss on a GPU (by name; unknown: Triton, no hidden padding)."""
    n = (gpu_name or "").lower()
    if any(k in n for k in ("b200", "b300", "gb200", "gb300")):
        return "trtllm"
    if any(k in n for k in ("h100", "h200", "h20", "gh200", "h800")) or not n:
        return "triton"
    return "marlin"


def _round_up(x, m):
    return _cdiv(x, m) * m


def _mxfp4_padding_bytes(shape, backend):
    """Extra bytes the mxfp4 kernels' padding adds to the expert matrices (4.25 bits per element)."""
    if backend not in _MXFP4_PAD or not shape.is_moe:
        return 0
    ph, pi = _MXFP4_PAD[backend]
    H, I = shape.hidden, shape.moe_intermediate
    H2, I2 = _round_up(H, ph), _round_up(I, pi)
    extra = (H2 * 2 * I2 + H2 * I2 - H * 2 * I - H * I) * shape.n_experts * shape.n_moe_layers
    return extra * 17 // 32  # 4 bits + one 8-bit scale per 32 elements


def vllm_weights_bytes(shape, weight_dtype, model_dtype, tp=1, mxfp4_backend=None):
    """Weights on one GPU as vLLM's 'Model loading took X GiB' counts them: the checkpoint split tp ways plus the
    rotary cos/sin cache ([max_position_embeddings, rotary_dim] in the model dtype), and the mxfp4 kernels' padding.

    Source: vllm/model_executor/layers/rotary_embedding.py `_compute_cos_sin_cache` (registered as a buffer);
    Llama-3.1-8B: 14.957 GiB of parameters + 0.031 GiB cache = the 14.9888 GiB vLLM logs. gpt-oss-20b on an A100
    (Marlin): 12.85 GiB of checkpoint + 0.86 GiB of padding = the 13.72 GiB vLLM 0.19 logs."""
    ws = weight_storage(shape, weight_dtype, compute_dtype=model_dtype)
    params = ws.weight_bytes + ws.quant_state_bytes
    if weight_dtype == "mxfp4":
        params += _mxfp4_padding_bytes(shape, mxfp4_backend)
    rot = shape.rotary_dim or shape.qk_rope_head_dim
    rope_cache = shape.max_positions * rot * DTYPE_BYTES[model_dtype] if rot else 0
    return _cdiv(params, tp) + rope_cache


def _per_token_activation_elems(shape, tp):
    """Elements one token holds at the largest point of a decoder layer in the profiling forward."""
    H = shape.hidden
    attn = ((shape.n_heads + 2 * shape.n_kv_heads) * max(shape.head_dim, 1)
            + shape.n_heads * max(shape.v_head_dim or shape.head_dim, 1)) // tp
    mlp = 3 * shape.intermediate // tp if shape.intermediate else 0
    moe = 0
    if shape.is_moe:
        # fused_moe: intermediate_cache1 [T, k, 2·I_e/tp], cache2 [T·k, I_e/tp], cache3 [T, k, H],
        # router logits [T, E]
        k = shape.experts_per_token
        moe = k * (3 * shape.moe_intermediate // tp + H) + shape.n_experts
        if shape.shared_intermediate:
            moe += 3 * shape.shared_intermediate // tp
    return (_HIDDEN_COPIES_AT_MLP_PEAK + (_TP_ALLREDUCE_COPIES if tp > 1 else 0)) * H + max(attn, mlp, moe)


def vllm_forward_peak_bytes(shape, model_dtype, num_tokens, tp=1):
    """Torch activation peak of the profiling forward of `num_tokens` tokens (one decoder layer's working set)."""
    return num_tokens * _per_token_activation_elems(shape, tp) * DTYPE_BYTES[model_dtype]


def _sort_bytes_per_element(rows):
    """What logits.sort adds per element of a [rows, vocab] float32 tensor: outputs and torch's buffers."""
    return _SORT_OUT + (_SORT_TEMP_SEGMENTED if rows >= 128 else _SORT_TEMP_FULL)


def vllm_sampler_peak_bytes(shape, model_dtype, rows, sampler):
    """Bytes the sampler holds at its peak on `rows` rows of logits over the vocabulary (logits included).

    sort (V0; V1 without flashinfer): model-dtype logits, float32 logits, sort values, int64 indices and torch's sort
    buffers. flashinfer: model-dtype logits, float32 logits, top-k masked logits, float32 probabilities.
    flashinfer_then_native (0.21): the larger of that and the native call — float32 logits, probabilities and
    exponential noise beside Triton's per-program rows (a sort below 8 rows). Sources: VLLM_RULES "sampler"."""
    V, cb = shape.vocab, DTYPE_BYTES[model_dtype]
    elems = rows * V
    if sampler == "sort":
        return elems * (cb + 4 + _sort_bytes_per_element(rows))
    flashinfer = elems * (cb + 4 + 4 + 4)
    if sampler == "flashinfer":
        return flashinfer
    if rows < 8:
        native = elems * (cb + 4 + _sort_bytes_per_element(rows))
    else:
        programs = min(1 << (min(rows, _TRITON_TOPK_PROGRAMS) - 1).bit_length(), _TRITON_TOPK_PROGRAMS)
        native = elems * (cb + 4 + 4 + 4) + programs * V * 4
    return max(flashinfer, native)


def vllm_activation_peak_bytes(shape, model_dtype, num_tokens, num_reqs, tp=1, sampler="flashinfer"):
    """Torch activation peak of vLLM's profiling run: the forward of `num_tokens`, then — the forward's output
    [num_tokens, hidden] still held — the sampler on `num_reqs` rows; the larger of the two.

    Source: vllm 0.21.0 v1/worker/gpu_model_runner.py profile_run L5947-L5960 (`_dummy_run(max_num_tokens)` then
    `_dummy_sampler_run`); vllm 0.6.4 worker/model_runner.py profile_run L1209-L1306 (V0: max_num_seqs sequences
    sharing max_num_batched_tokens, each sampled)."""
    forward = vllm_forward_peak_bytes(shape, model_dtype, num_tokens, tp)
    held = num_tokens * shape.hidden * DTYPE_BYTES[model_dtype]
    return max(forward, held + vllm_sampler_peak_bytes(shape, model_dtype, num_reqs, sampler))


# ------------------------------------------------------------------ defaults

def vllm_batch_defaults(settings, shape=None):
    """(max_num_seqs, max_num_batched_tokens) after vLLM fills in its defaults."""
    rules = vllm_rules(settings.version, settings.engine)
    behaviour = rules["batch_defaults"][0]
    seqs, tokens = settings.max_num_seqs, settings.max_num_batched_tokens
    L = settings.max_model_len if settings.max_model_len > 0 else (shape.max_positions if shape else 0)
    if behaviour.startswith("v0"):
        seqs = seqs or 256
        chunked = settings.enable_chunked_prefill
        if chunked is None:
            sliding = bool(shape and (shape.sliding_window or shape.is_mla))
            chunked = L > 32768 and not sliding
        if not tokens:
            chunk = 512 if behaviour == "v0_chunk512" else 2048
            tokens = chunk if chunked else max(L, 2048)
            tokens = min(tokens, seqs * L) if L else tokens
    else:
        large = settings.gpu_total_bytes >= 70 * GiB and "a100" not in settings.gpu_name.lower()
        if settings.usage == "llm":
            seqs = seqs or (1024 if large else 256)
            tokens = tokens or (16384 if large else 8192)
        else:
            seqs = seqs or (1024 if large else 256)
            tokens = tokens or (8192 if large else 2048)
    return seqs, tokens


def vllm_utilization(settings):
    """--gpu-memory-utilization, or the version's default (0.9; 0.92 from 0.20.0)."""
    if settings.gpu_memory_utilization is not None:
        return settings.gpu_memory_utilization
    return float(vllm_rules(settings.version, settings.engine)["utilization_default"][0])


# ------------------------------------------------------------------ CUDA graphs

def vllm_cudagraph_sizes(mode, max_num_seqs, max_num_batched_tokens):
    """({'PIECEWISE': [...], 'FULL': [...]} or {'V0': [...]}) batch sizes vLLM captures, largest first."""
    if mode == "v0_full":
        sizes = [1, 2, 4] + [8 * i for i in range(1, 1025)]
        top = next((s for s in sizes if s >= max_num_seqs), sizes[-1])
        return {"V0": sorted((s for s in sizes if s <= top), reverse=True)}
    if mode == "piecewise_512":
        top = 512
    else:
        top = min(2 * max_num_seqs, 512)
    top = min(top, max_num_batched_tokens)
    if mode in ("piecewise_512", "piecewise", "full_and_piecewise_8"):
        sizes = [s for s in [1, 2, 4] + list(range(8, top + 1, 8)) if s <= top]
    else:
        sizes = [s for s in [1, 2, 4] + list(range(8, 256, 8)) + list(range(256, top + 1, 16)) if s <= top]
        if max_num_batched_tokens <= top and max_num_batched_tokens not in sizes:
            sizes.append(max_num_batched_tokens)  # vllm 0.21.0 config/vllm.py: the token budget is captured too
    out = {"PIECEWISE": sorted(sizes, reverse=True)}
    if mode.startswith("full_and_piecewise"):
        out["FULL"] = sorted((s for s in sizes if s <= max_num_seqs), reverse=True)
    return out


def _graph_pool_bytes(shape, model_dtype, tokens, tp):
    """Outputs of the largest captured batch inside one graph: one decoder layer's working set."""
    return tokens * _per_token_activation_elems(shape, tp) * DTYPE_BYTES[model_dtype]


def vllm_cudagraph_bytes(shape, model_dtype, sizes, tp=1):
    """The CUDA-graph pool vLLM measures after capture ('Graph capturing finished …, took X GiB').

    The pool is shared by every size (captured largest first), so it holds one decoder layer's outputs for the
    largest size; each captured graph adds driver memory per decoder layer (V0 whole-step graphs; V1 piecewise
    graphs — one piece per layer plus one — and full decode graphs). The per-layer constants are fitted on
    published start-ups (module header)."""
    if not sizes:
        return 0
    largest = max(max(v) for v in sizes.values() if v)
    pool = _graph_pool_bytes(shape, model_dtype, largest, tp)
    if "V0" in sizes:
        return pool + len(sizes["V0"]) * shape.n_layers * _GRAPH_BYTES_PER_LAYER_V0
    pieces = len(sizes.get("PIECEWISE", ())) * (shape.n_layers + 1) + len(sizes.get("FULL", ())) * shape.n_layers
    return pool + pieces * _GRAPH_BYTES_PER_LAYER_V1


def vllm_cudagraph_estimate_bytes(shape, model_dtype, sizes, tp=1):
    """vLLM's own estimate (0.19+): per mode, the first capture (largest size) plus (n − 1) × the second capture;
    the modes overlay one pool, so the largest first capture plus every mode's extrapolation.

    Source: vllm 0.21.0 v1/worker/gpu_model_runner.py profile_cudagraph_memory L6049-L6147. Known misses: the
    second graph's memory extrapolated linearly to all n over-counts what a shared pool reuses (vllm issue #45178);
    the FULL first capture charges a profiling transient that grows with max_num_batched_tokens on hybrid models
    (issue #50780, from 0.26); and at high utilization the pool can outgrow the estimate once the KV cache is
    allocated (issue #57475, OOM during capture at 0.98)."""
    if not sizes or "V0" in sizes:
        return 0
    first, extra = {}, 0
    for mode, s in sizes.items():
        if not s:
            continue
        layers = shape.n_layers + (1 if mode == "PIECEWISE" else 0)
        per_graph = layers * _GRAPH_BYTES_PER_LAYER_V1
        first[mode] = _graph_pool_bytes(shape, model_dtype, s[0], tp) + per_graph
        extra += max(per_graph, MiB) * (len(s) - 1)  # the second capture reuses the pool; "at least 1 MiB per graph"
    return max(first.values()) + extra if first else 0


# ------------------------------------------------------------------ the budget and the start-up

def vllm_non_torch_bytes(budget, tp, tp_buffers, overheads=DEFAULT_OVERHEADS):
    """Memory outside torch that the budget subtracts: the CUDA context where the rule measures against the whole
    device; with memory_profiling only the increase over the baseline (cuBLAS workspaces); NCCL and the custom
    all-reduce buffers at TP > 1 where the baseline precedes them (VLLM_RULES "tp_buffers")."""
    if budget == "torch_peak_only":
        return 0
    comm = TP_COMM_BYTES if tp > 1 and tp_buffers == "in_budget" else 0
    if budget == "memory_profiling":
        return overheads.workspaces_bytes + comm
    return overheads.cuda_context_bytes + overheads.workspaces_bytes + comm


def _physical_non_torch(tp, tp_buffers, overheads=DEFAULT_OVERHEADS):
    """Memory outside torch a running server holds beyond the context: workspaces, NCCL where inside the budget."""
    return overheads.workspaces_bytes + (TP_COMM_BYTES if tp > 1 and tp_buffers == "in_budget" else 0)


def _sampler_warmup_bytes(shape, model_dtype, rows, sampler):
    """V1's sampler warm-up after graph capture: a forward of `rows` tokens' hidden states and the sampler on them."""
    return rows * shape.hidden * DTYPE_BYTES[model_dtype] + vllm_sampler_peak_bytes(shape, model_dtype, rows, sampler)


def _fail(step, message):
    return {"ok": False, "step": step, "message": message}


def predict_vllm(shape, weight_dtype, settings, overheads=DEFAULT_OVERHEADS, config=None):
    """vLLM's memory budget on one GPU (each TP rank holds the same) and its start-up, step by step → a dict.

    `weight_dtype` is how the checkpoint is stored (vramlab --dtype: bf16, fp8, mxfp4, awq-int4 …); `config` the
    model's config.json dict where the KV layout needs more than the shape holds (linear-attention states)."""
    rules = vllm_rules(settings.version, settings.engine)
    engine = rules["engine"][0]
    budget = rules["budget"][0]
    model_dtype = vllm_model_dtype(shape, settings.dtype, settings.gpu_bf16)
    mb = DTYPE_BYTES[model_dtype]
    kvb = kv_element_bytes(settings.kv_dtype, model_dtype)
    util = vllm_utilization(settings)
    total = settings.gpu_total_bytes
    ctx = overheads.cuda_context_bytes
    seqs, batched = vllm_batch_defaults(settings, shape)
    sampler = settings.sampler or rules["sampler"][0]
    if sampler == "flashinfer" and rules["sampler"][0] == "flashinfer_then_native":
        sampler = "flashinfer_then_native"
    num_reqs = min(seqs, batched)
    weights = vllm_weights_bytes(shape, weight_dtype, model_dtype, settings.tp, mxfp4_backend_for(settings.gpu_name))
    activation = vllm_activation_peak_bytes(shape, model_dtype, batched, num_reqs, settings.tp, sampler)
    tp_buffers = rules["tp_buffers"][0]
    non_torch = vllm_non_torch_bytes(budget, settings.tp, tp_buffers, overheads)
    outside_comm = TP_COMM_BYTES if settings.tp > 1 and tp_buffers == "outside_budget" else 0
    sizes = {} if settings.enforce_eager else vllm_cudagraph_sizes(rules["cudagraph_mode"][0], seqs, batched)
    cudagraph = vllm_cudagraph_bytes(shape, model_dtype, sizes, settings.tp)
    graph_rule = rules["cudagraphs"][0]
    estimate = vllm_cudagraph_estimate_bytes(shape, model_dtype, sizes, settings.tp) \
        if graph_rule in ("estimated_not_counted", "estimate_counted") else 0
    estimate_applied = estimate if graph_rule == "estimate_counted" else 0
    requested = math.ceil(total * util)
    if settings.kv_cache_memory_bytes:
        kv_budget = settings.kv_cache_memory_bytes
    else:
        kv_budget = requested - weights - activation - non_torch - estimate_applied
    hybrid = rules["kv_groups"][0] == "hybrid"
    layer_groups = kv_layer_groups(shape, kvb, mb, settings.tp, config)
    max_len = settings.max_model_len or shape.max_positions
    auto_len = settings.max_model_len == -1
    if auto_len:
        max_len = shape.max_positions
    plan = vllm_kv_plan(layer_groups, kv_budget, settings.block_size, max_len, batched, hybrid)
    chosen_len = max_len
    if auto_len and plan.request_bytes > max(0, kv_budget):
        chosen_len = _auto_fit_len(layer_groups, kv_budget, settings.block_size, max_len, batched, hybrid)
        plan = vllm_kv_plan(layer_groups, kv_budget, settings.block_size, max(chosen_len, 1), batched, hybrid)
    budget_terms = dict(total=total, util=util, requested=requested, ctx=ctx, outside_comm=outside_comm,
                        weights=weights, activation=activation, kv_budget=kv_budget, cudagraph=cudagraph,
                        non_torch=_physical_non_torch(settings.tp, tp_buffers, overheads))
    startup = _vllm_startup(engine, budget_terms, plan, chosen_len, auto_len, shape, model_dtype, num_reqs, sampler,
                            settings, layer_groups, batched, hybrid)
    # the blocks vLLM computed (and, V0, logged) before any later check refused them
    ok_kv = kv_budget > 0 and plan.num_blocks > 0 and startup["step"] not in ("request memory", "load weights",
                                                                              "profile run")
    num_blocks = plan.num_blocks if ok_kv else 0
    kv_bytes = num_blocks * plan.bytes_per_block_all_groups
    style = rules["kv_tokens_log"][0] if engine == "v1" else "blocks_per_group"
    tokens = kv_tokens_logged(plan, chosen_len, style) if ok_kv else 0
    # V0: num_gpu_blocks × block_size / max_model_len (vllm 0.7.3 executor/executor_base.py L113-L116); V1: blocks
    # over the blocks one request needs in every group
    concurrency = 0.0 if not ok_kv else (kv_concurrency(plan) if engine == "v1" else
                                         num_blocks * plan.block_size / chosen_len)
    counted = graph_rule == "estimate_counted" and not settings.enforce_eager
    # nvidia-smi once serving: context, NCCL, weights, workspaces, the KV cache, the graph pool, and (V1) the sampler
    # warm-up's segments, which the caching allocator keeps (gpu_worker.py: 'preallocate memory buffer for logits')
    warm = _sampler_warmup_bytes(shape, model_dtype, num_reqs, sampler) if engine == "v1" else 0
    physical = ctx + outside_comm + weights + _physical_non_torch(settings.tp, tp_buffers, overheads) + kv_bytes + \
        (0 if settings.enforce_eager else cudagraph) + warm
    return {
        "engine": "vllm",
        "version": settings.version,
        "vllm_engine": engine,
        "model_dtype": model_dtype,
        "kv_element_bytes": kvb,
        "gpu_memory_utilization": util,
        "weights_bytes": weights,
        "activation_peak_bytes": activation,
        "forward_peak_bytes": vllm_forward_peak_bytes(shape, model_dtype, batched, settings.tp),
        "sampler_peak_bytes": vllm_sampler_peak_bytes(shape, model_dtype, num_reqs, sampler),
        "sampler": sampler,
        "sampler_rows": num_reqs,
        "non_torch_bytes": non_torch,
        "tp_buffers_outside_budget_bytes": outside_comm,
        "cudagraph_bytes": 0 if settings.enforce_eager else cudagraph,
        "cudagraph_estimate_bytes": estimate,
        "cudagraph_in_budget": counted,
        "cudagraph_sizes": {k: len(v) for k, v in sizes.items()},
        "cudagraph_largest": {k: (v[0] if v else 0) for k, v in sizes.items()},
        "requested_memory_bytes": requested,
        "kv_cache_budget_bytes": kv_budget,
        "kv_cache_bytes": kv_bytes,
        "kv_cache_bytes_per_token": plan.bytes_per_token,
        "kv_groups": [{"kind": k, "layers": n, "window": w} for k, n, w, _ in plan.groups],
        "kv_page_bytes": plan.page_bytes,
        "kv_block_size": plan.block_size,
        "kv_cache_tokens": tokens,
        "num_gpu_blocks": num_blocks,
        "max_concurrency": round(concurrency, 2),
        "max_model_len": chosen_len,
        "max_model_len_auto": auto_len,
        "max_num_seqs": seqs,
        "max_num_batched_tokens": batched,
        "block_size": plan.block_size,
        "tp": settings.tp,
        "log_style": rules["log"][0],
        "startup": startup,
        # nvidia-smi after start-up: context, the budget, the graph pool where the budget left it out
        "peak_device_bytes": physical if startup["ok"] else total,
        "rules": {k: v[0] for k, v in rules.items()},
    }


def _auto_fit_len(layer_groups, kv_budget, block, max_len, batched, hybrid):
    """The longest max_model_len whose one request fits the budget (binary search, as vLLM's auto-fit)."""
    lo, hi = 0, max_len
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if vllm_kv_plan(layer_groups, kv_budget, block, mid, batched, hybrid).request_bytes <= kv_budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _vllm_startup(engine, b, plan, max_len, auto_len, shape, model_dtype, num_reqs, sampler, settings, layer_groups,
                  batched, hybrid):
    """vLLM's start-up, in its order; the first step that cannot succeed, with vLLM's own message.

    Physical memory: what the process holds may not pass the card's total. Steps: the free memory at start against
    total × util (V1, vllm 0.21.0 v1/worker/utils.py request_memory L403-L421); loading the weights; the profiling
    run (weights + activation peak); the KV check (no memory at all, or less than one max_model_len request:
    v1/core/kv_cache_utils.py L689-L722; V0 worker.py raise_if_cache_size_invalid); the graph capture (after the KV
    cache); V1's sampler warm-up with the KV cache and graphs in place (gpu_worker.py compile_or_warm_up_model).
    `b`: the budget's terms in bytes (total, util, requested, ctx, outside_comm, weights, activation, non_torch,
    kv_budget, cudagraph)."""
    total, util, requested, ctx, outside_comm = b["total"], b["util"], b["requested"], b["ctx"], b["outside_comm"]
    weights, activation, non_torch, kv_budget, cudagraph = (b["weights"], b["activation"], b["non_torch"],
                                                             b["kv_budget"], b["cudagraph"])
    free_at_start = total - ctx - outside_comm
    gib = lambda n: f"{n / GiB:.2f} GiB"  # noqa: E731
    if engine == "v1" and free_at_start < requested and not settings.kv_cache_memory_bytes:
        return _fail("request memory", f"Free memory on device ({gib(free_at_start)}/{gib(total)}) on startup is less "
                     f"than desired GPU memory utilization ({util}, {gib(requested)}). Decrease GPU memory utilization")
    if weights > free_at_start:
        return _fail("load weights", f"CUDA out of memory loading {gib(weights)} of weights into {gib(free_at_start)} "
                     "free")
    if weights + activation + non_torch > free_at_start:
        return _fail("profile run", f"CUDA out of memory in the profiling run: weights {gib(weights)} + activation "
                     f"peak {gib(activation)} > {gib(free_at_start)} free")
    if kv_budget <= 0 or plan.num_blocks <= 0:
        return _fail("allocate KV cache", "No available memory for the cache blocks. Try increasing "
                     f"`gpu_memory_utilization` (available KV cache memory {gib(kv_budget)})")
    if plan.request_bytes > kv_budget:
        if auto_len:
            return _fail("allocate KV cache", "Cannot auto-fit max_model_len: not enough GPU memory available to "
                         "serve even a single token")
        fit = _auto_fit_len(layer_groups, kv_budget, settings.block_size, max_len, batched, hybrid)
        if engine == "v0":
            tokens = plan.num_blocks * plan.block_size
            return _fail("allocate KV cache", f"The model's max seq len ({max_len}) is larger than the maximum number "
                         f"of tokens that can be stored in KV cache ({tokens})")
        return _fail("allocate KV cache", f"To serve at least one request with the models's max seq len ({max_len}), "
                     f"({gib(plan.request_bytes)} KV cache is needed, which is larger than the available KV cache "
                     f"memory ({gib(kv_budget)}). Based on the available memory, the estimated maximum model length "
                     f"is {fit}")
    kv_alloc = plan.num_blocks * plan.bytes_per_block_all_groups
    held = ctx + outside_comm + weights + non_torch + kv_alloc
    if not settings.enforce_eager and held + cudagraph > total:
        return _fail("capture CUDA graphs", f"CUDA out of memory capturing CUDA graphs: {gib(cudagraph)} of graphs on "
                     f"top of {gib(held)} held (KV cache {gib(kv_alloc)}) on a {gib(total)} card")
    if engine == "v1":
        graphs = 0 if settings.enforce_eager else cudagraph
        sampler_bytes = _sampler_warmup_bytes(shape, model_dtype, num_reqs, sampler)
        if held + graphs + sampler_bytes > total:
            return _fail("warm up the sampler", f"CUDA out of memory occurred when warming up sampler with {num_reqs} "
                         f"dummy requests ({gib(sampler_bytes)} on top of {gib(held + graphs)} held). Please try "
                         "lowering `max_num_seqs` or `gpu_memory_utilization`")
    return {"ok": True, "step": "", "message": ""}


def log_lines(result):
    """vLLM's own log lines for a `predict_vllm` result (or the failure), to compare line by line."""
    L = result["max_model_len"]
    lines = []
    if result.get("max_model_len_auto"):
        lines.append(f"Auto-fit max_model_len: {L:,}")
    s = result["startup"]
    if not s["ok"] and s["step"] not in ("capture CUDA graphs", "warm up the sampler"):
        return lines + [f"start-up fails at '{s['step']}': {s['message']}"]
    if result["log_style"] == "v0":
        lines += [f"# GPU blocks: {result['num_gpu_blocks']}, # CPU blocks: (swap space, not modelled)",
                  f"Maximum concurrency for {L} tokens per request: {result['max_concurrency']:.2f}x"]
    else:
        if result["cudagraph_estimate_bytes"]:
            lines.append(f"Estimated CUDA graph memory: {result['cudagraph_estimate_bytes'] / GiB:.2f} GiB total")
        lines += [f"Available KV cache memory: {result['kv_cache_budget_bytes'] / GiB:.2f} GiB",
                  f"GPU KV cache size: {result['kv_cache_tokens']:,} tokens",
                  f"Maximum concurrency for {L:,} tokens per request: {result['max_concurrency']:.2f}x"]
    if result["cudagraph_bytes"]:
        lines.append(f"Graph capturing finished, took {result['cudagraph_bytes'] / GiB:.2f} GiB")
    if not s["ok"]:
        lines.append(f"start-up fails at '{s['step']}': {s['message']}")
    return lines
