"""Device-level overheads: what NVML sees beyond the caching allocator's live tensors.

These are *uncalibrated defaults*, named so a calibration table (results/calibration/)
can replace each one with a value fitted from measurements on a given GPU, driver and
library stack. Until then every prediction says it is uncalibrated.
"""

from dataclasses import dataclass

from .units import MiB


@dataclass(frozen=True)
class Overheads:
    """Named overhead parameters; defaults are documented guesses, not measurements."""

    # CUDA context + loaded kernel images + cuDNN/NCCL handles, outside the caching allocator.
    # With CUDA ≥ 11.7 lazy module loading a PyTorch context is typically a few hundred MiB.
    cuda_context_bytes: int = 512 * MiB
    # cuBLAS/cuBLASLt workspaces (PyTorch CublasHandlePool.cpp: CUBLAS_WORKSPACE_CONFIG
    # default ":4096:8" on Hopper = 8 × 4 MiB) — one per handle/stream in use.
    workspace_bytes: int = 32 * MiB
    # Reserved-but-unused memory of the caching allocator, as a fraction of peak allocated,
    # plus a floor for the rounding of large segments (20 MiB kLargeBuffer in CUDACachingAllocator.cpp).
    allocator_slack_fraction: float = 0.05
    allocator_slack_min_bytes: int = 20 * MiB
    source: str = "uncalibrated defaults (formulas/overhead.py)"

    def allocator_slack(self, peak_allocated):
        """Reserved minus allocated at the peak, estimated from the allocated bytes."""
        frac = int(peak_allocated * self.allocator_slack_fraction)
        return frac if frac > self.allocator_slack_min_bytes else self.allocator_slack_min_bytes


DEFAULT_OVERHEADS = Overheads()
