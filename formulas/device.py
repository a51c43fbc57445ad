"""What a GPU process holds beyond its tensors, and where: by GPU architecture and library version.

Three things, each with where it sits (inside torch's allocated peak, or outside the caching
allocator) and where its number comes from:

- library workspaces, inside the caching allocator (so inside `torch.cuda.max_memory_allocated`):
  cuBLAS keeps one workspace per thread and stream that runs a GEMM, allocated through
  c10::cuda::CUDACachingAllocator on the first GEMM and kept until `clearCublasWorkspaces`. A
  training step runs GEMMs on two threads, the Python thread (forward, optimizer) and autograd's
  device thread (backward, recomputation), so it holds two. `cublas_workspace_bytes`.
- the CUDA context, outside the allocator: what CUDA initialisation takes (driver state, the
  runtime's own buffers), plus kernel images that lazy module loading (CUDA_MODULE_LOADING=LAZY,
  torch's default since 1.13) brings in as kernels first run. `CONTEXT_AT_INIT`, `KERNEL_IMAGES`.
- allocator slack (reserved − allocated), from the caching allocator's own rules
  (harness/tracing/allocator.py simulates them; formulas/overhead.py has the rules derived from it).

And SDPA's backend choice (`sdpa_backend`), which decides whether attention holds the score matrix.

Pure Python: no torch, no I/O.
"""

import re
from dataclasses import dataclass

from .stack import behaviour
from .units import KiB, MiB

# ------------------------------------------------------------------ architecture

# Compute capability by chip, as NVIDIA's "CUDA GPUs" table lists it (developer.nvidia.com/cuda-gpus).
# The hardware catalog (catalog/hardware.json) names the chip in its `architecture` field.
_CHIP_CC = (
    ("GA100", (8, 0)), ("GA10B", (8, 7)), ("GA10", (8, 6)),
    ("AD10", (8, 9)), ("GH100", (9, 0)), ("GB202", (12, 0)), ("Blackwell (HGX", (10, 0)), ("B200", (10, 0)),
)


def compute_capability(hardware):
    """(major, minor) of a catalog GPU (formulas.hardware.Hardware), None where it is not an NVIDIA part the table knows."""
    if hardware is None or getattr(hardware, "vendor", "NVIDIA") != "NVIDIA":
        return None
    arch = getattr(hardware, "architecture", "") or ""
    for chip, cc in _CHIP_CC:
        if chip in arch or chip in hardware.name:
            return cc
    return None


# The architecture assumed when no GPU is named: Hopper (sm90), the one vramlab has measured.
DEFAULT_CC = (9, 0)

# ------------------------------------------------------------------ cuBLAS workspaces (inside the allocator)

WORKSPACE_THREADS = {"inference": 1, "train": 2}  # threads that run GEMMs: Python's; + autograd's device thread


def _parse_cublas_workspace_config(text):
    """Bytes of a CUBLAS_WORKSPACE_CONFIG value (':SIZE_KiB:COUNT' pairs, summed), None if it does not parse
    (torch then warns and takes its default). aten/src/ATen/cuda/CublasHandlePool.cpp parseChosenWorkspaceSize."""
    pairs = re.findall(r":([0-9]+):([0-9]+)", text or "")
    if not pairs:
        return None
    return sum(int(size) * KiB * int(count) for size, count in pairs)


def cublas_workspace_bytes(cc=DEFAULT_CC, spec=None, environ=None):
    """One cuBLAS workspace (per thread and stream), as torch sizes it.

    CublasHandlePool.cpp parseChosenWorkspaceSize: CUBLAS_WORKSPACE_CONFIG if set, else ':4096:8' = 32 MiB on
    Hopper (PR #89027, torch 2.0) and on Blackwell from torch 2.11 (PR #175344), else ':4096:2:16:8' = 8 MiB +
    128 KiB. Measured: 32.0 MiB exactly between torch's allocated peak and the tracked tensors in the bf16
    inference records of Llama-3.1-8B and Mistral-7B (results/runs/reference/nvidia-h200-580.159.04)."""
    env = environ or {}
    configured = _parse_cublas_workspace_config(env.get("CUBLAS_WORKSPACE_CONFIG"))
    if configured is not None:
        return configured
    major = (cc or DEFAULT_CC)[0]
    big = major == 9 or (major in (10, 12) and (spec is None or behaviour(spec, "cublas_32mib_blackwell")))
    return 4096 * 8 * KiB if big else 4096 * KiB * 2 + 16 * KiB * 8


def cublaslt_extra_bytes(spec=None, environ=None):
    """Bytes a cuBLASLt GEMM (addmm with a bias in fp16/bf16: CUDABlas.cpp gemm_and_bias) adds per thread beyond the
    cuBLAS workspace: none where the two are unified (torch ≥ 2.11, PR #168175, unless
    TORCH_CUBLASLT_UNIFIED_WORKSPACE=0), else CUBLASLT_WORKSPACE_SIZE KiB (default 1024, PR #73439)."""
    env = environ or {}
    unified = spec is None or behaviour(spec, "cublaslt_unified")
    flag = env.get("TORCH_CUBLASLT_UNIFIED_WORKSPACE")
    if flag is not None:
        unified = flag.strip().lower() not in ("0", "false", "off", "no")
    if unified:
        return 0
    try:
        return int(env.get("CUBLASLT_WORKSPACE_SIZE", "1024")) * KiB
    except ValueError:
        return 1024 * KiB


# ------------------------------------------------------------------ the CUDA context (outside the allocator)

@dataclass(frozen=True)
class ContextRow:
    """What CUDA initialisation took on one kind of GPU and stack, and where the number comes from."""

    arch: str  # "sm90" …
    bytes: int
    source: str


# Device memory CUDA initialisation takes in a torch process (torch.zeros(1, device="cuda")), NVML's device-used
# difference before and after. Rows are measurements; an architecture without one takes the nearest row below.
CONTEXT_AT_INIT = (
    ContextRow("sm86", 256 * MiB,
               "published: invoke-ai/InvokeAI#9413 (RTX 3090, torch 2.7.1+cu128, driver 610.43.03: a bare CUDA "
               "context held at start-up, 256 MiB)"),
    ContextRow("sm90", 619 * MiB,
               "measured: results/runs/*/nvidia-h200-580.159.04 cuda_context_bytes (H200, driver 580.159.04, "
               "CUDA 13.0, torch 2.11.0; 648,871,936 bytes less the probe tensor's 2 MiB segment, every process)"),
)


def cuda_context_at_init(cc=DEFAULT_CC):
    """(bytes, source) of the CUDA context at initialisation on an architecture: its row, else the nearest below."""
    cc = cc or DEFAULT_CC
    want = cc[0] * 10 + cc[1]
    rows = sorted(CONTEXT_AT_INIT, key=lambda r: int(r.arch[2:]))
    best = rows[0]
    for r in rows:
        if int(r.arch[2:]) <= want:
            best = r
    if int(best.arch[2:]) != want:
        return best.bytes, f"estimate for sm{want}: the {best.arch} row, {best.source}"
    return best.bytes, best.source


# Kernel images lazy loading brings in, by what the workload runs first. Measured on the H200 as the device peak
# less the peak reserved less the context at init, in the first experiment of each worker process (no earlier
# experiment had loaded anything) and in the experiment after which the figure grew (results/runs/*/
# nvidia-h200-580.159.04: processes 829, 915, 1321, 1466, 1519). The same kernels take about as much on other
# architectures (their cubins are of the same order), which no record here has measured.
KERNEL_IMAGES = {
    "gemm": 70 * MiB,  # cuBLAS GEMMs, elementwise and reduction kernels, attention: first inference, 68–78 MiB
    "bnb_int8": 66 * MiB,  # bitsandbytes' LLM.int8 kernels (+66 MiB when the first int8 batch ran)
    "train": 74 * MiB,  # backward and optimizer kernels (+74 MiB at the first training step)
}


def kernel_families(spec):
    """The KERNEL_IMAGES families a (validated) spec's workload loads."""
    fams = ["gemm"]
    if spec.dtype == "int8":
        fams.append("bnb_int8")
    if spec.mode == "train":
        fams.append("train")
    return tuple(fams)


# ------------------------------------------------------------------ SDPA's backend

def sdpa_backend(spec, *, head_dim_qk, head_dim_v, grouped, masked=False, cc=DEFAULT_CC, dtype=None):
    """The kernel torch's SDPA picks on a GPU of compute capability `cc`: 'flash', 'efficient' or 'math' (cuDNN
    attention, preferred on sm90/sm100 with cuDNN > 9.15 in recent torch, holds what flash holds and is counted as
    flash).

    aten/src/ATen/native/transformers/cuda/sdp_utils.cpp select_sdp_backend: flash needs fp16/bf16, no mask,
    equal head dims ≤ 256, and takes grouped K/V heads (enable_gqa); memory-efficient takes fp32 and masks and
    unequal head dims (aligned), but grouped K/V heads only from torch 2.14 (PR #191085: before, fp32 with
    enable_gqa falls to the math kernel, which materialises the fp32 score matrix). `grouped`: SDPA gets fewer
    K/V heads than query heads (transformers passes enable_gqa=True when it does not repeat_kv); `dtype`: what
    attention runs in (default the spec's compute dtype; fp32 in LoRA over a kbit-prepared base)."""
    cc = cc or DEFAULT_CC
    dtype = dtype or spec.compute_dtype  # what attention runs in: the compute dtype, fp32 after kbit prep
    half = dtype in ("bf16", "fp16")
    flash_hw = (8, 0) <= cc <= (12, 1)  # check_flash_attention_hardware_support: sm80–sm121
    # check_requires_grad_and_head_dim_gt192_constraints_on_sm86_89_or_120: no flash backward for head dims in
    # (192, 224] (or (224, 256] with dropout) on sm86–sm89 and sm120–121
    consumer = (8, 6) <= cc <= (8, 9) or (12, 0) <= cc <= (12, 1)
    big_head = spec.mode == "train" and (192 < head_dim_qk <= 224 or (head_dim_qk > 224 and spec.dropout))
    if half and not masked and head_dim_qk == head_dim_v <= 256 and flash_hw and not (consumer and big_head):
        return "flash"
    # memory-efficient before sm80 takes fp16 and fp32 only (less_than_sm80_mem_efficient_dtypes)
    if (grouped and not behaviour(spec, "sdpa_efficient_gqa")) or (cc < (8, 0) and dtype == "bf16"):
        return "math"
    return "efficient"
