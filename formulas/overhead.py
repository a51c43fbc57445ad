"""Device-level overheads: what NVML sees beyond the caching allocator's live tensors.

Three device categories (formulas/categories.py), each a named parameter so a calibration
table (results/calibration/, fitted by `vramlab fit`) can replace it with a value measured on
a given GPU, driver and library stack. The defaults are documented guesses, and every
prediction made with them says it is uncalibrated.
"""

from dataclasses import dataclass

from . import categories as C
from .elementwise import to_int, vmax
from .units import MiB


@dataclass(frozen=True)
class Overheads:
    """Named overhead parameters; the defaults are documented guesses, not measurements."""

    # The CUDA context: driver state and loaded kernel images, outside the caching allocator.
    # With CUDA ≥ 11.7 lazy module loading a PyTorch context is typically a few hundred MiB.
    cuda_context_bytes: int = 512 * MiB
    # Workspaces outside the context: cuBLAS/cuBLASLt (PyTorch CublasHandlePool.cpp:
    # CUBLAS_WORKSPACE_CONFIG default ":4096:8" on Hopper = 8 × 4 MiB), cuDNN, library handles.
    workspaces_bytes: int = 32 * MiB
    # Reserved-but-unused memory of the caching allocator, as a fraction of peak allocated,
    # plus a floor for the rounding of large segments (20 MiB kLargeBuffer in CUDACachingAllocator.cpp).
    allocator_slack_fraction: float = 0.05
    allocator_slack_min_bytes: int = 20 * MiB
    source: str = "uncalibrated defaults (formulas/overhead.py)"
    calibrated: bool = False  # True when the values were fitted from measurements

    def allocator_slack(self, peak_allocated):
        """Reserved minus allocated at the peak, estimated from the allocated bytes (a number or an array)."""
        return vmax(to_int(peak_allocated * self.allocator_slack_fraction, rounding=False),
                    self.allocator_slack_min_bytes)

    def device_breakdown(self, peak_allocated):
        """{device category: bytes} on top of `peak_allocated` tensor bytes."""
        return {C.CUDA_CONTEXT: self.cuda_context_bytes, C.WORKSPACES: self.workspaces_bytes,
                C.ALLOCATOR_SLACK: self.allocator_slack(peak_allocated)}


DEFAULT_OVERHEADS = Overheads()
