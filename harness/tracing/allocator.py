"""The caching-allocator simulation lives in formulas/allocator.py (pure Python, no torch: the formulas' slack rules
and `vramlab predict` use it too); the tracer replays its allocation streams through it."""

from formulas.allocator import *  # noqa: F401,F403
from formulas.allocator import (  # noqa: F401  (names the tracer, tests and scripts import from here)
    DEFAULT_CONFIG,
    K_LARGE_BUFFER,
    K_MIN_BLOCK_SIZE,
    K_MIN_LARGE_ALLOC,
    K_ROUND_LARGE,
    K_SMALL_BUFFER,
    K_SMALL_SIZE,
    AllocConfError,
    AllocatorConfig,
    AllocatorOOM,
    CachingAllocatorModel,
    allocation_size,
    config_from_env,
    parse_alloc_conf,
    replay,
    round_size,
)
