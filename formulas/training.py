"""Training state: gradients, optimizer states, master weights, and optimizer-step temporaries.

Trainable parameters arrive as a list of (numel, shape, count) so optimizers that treat
tensors differently (8-bit Adam's small-tensor fallback, Adafactor's factored moments)
are exact per tensor.
"""

from dataclasses import dataclass

OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "sgd", "sgd_momentum", "lion", "adafactor")
OPTIMIZER_IMPLS = ("foreach", "fused", "forloop")

# bitsandbytes 8-bit optimizers: tensors under 4096 elements keep 32-bit state; blockwise
# quantization with 256-element blocks and one fp32 absmax per block per state.
# Source: bitsandbytes/optim/optimizer.py Optimizer2State.init_state (min_8bit_size=4096, blocksize 256).
BNB8_MIN_SIZE = 4096
BNB8_BLOCK = 256


@dataclass(frozen=True)
class OptimizerMemory:
    """Bytes an optimizer holds between steps, and the extra it allocates during a step."""

    state_bytes: int  # persistent optimizer state
    master_bytes: int  # fp32 master copy (mixed precision with master weights)
    step_temp_bytes: int  # transient during optimizer.step()
    paged: bool = False  # state lives in CUDA unified memory (not the caching allocator)
    step_counter_bytes: int = 0  # of state_bytes: one `step` per tensor on the device (every rank keeps its own)


def _bnb8_state(numel, n_states):
    if numel < BNB8_MIN_SIZE:
        return n_states * 4 * numel
    blocks = -(-numel // BNB8_BLOCK)
    return n_states * (numel + 4 * blocks)


def _adafactor_state(numel, shape):
    # transformers.optimization.Adafactor: fp32 row/col second moments for ≥2-D tensors
    # (factored over the last two dims), a full fp32 second moment for 1-D; no first moment
    # by default (beta1=None).
    if len(shape) >= 2:
        rows = numel // shape[-1]
        cols = numel // shape[-2]
        return 4 * (rows + cols)
    return 4 * numel


def _entries(trainable, param_bytes):
    """(numel, shape, count, bytes) for each trainable tensor; bytes default to param_bytes."""
    return [(t[0], t[1], t[2], t[3] if len(t) > 3 and t[3] else param_bytes) for t in trainable]


def optimizer_memory(trainable, param_bytes, optimizer, impl="foreach", master=False):
    """State, master copy and step temporaries for `trainable` = [(numel, shape, count[, bytes]), …].

    param_bytes: bytes per element of trainable parameters (and their grads) unless an entry
    carries its own (a parameter the model pins to fp32 keeps fp32 grads and Adam state: #8).
    master: keep an fp32 master copy; states are fp32 then (DeepSpeed / Megatron style).
    Source: torch/optim/adamw.py (_multi_tensor_adamw: one exp_avg_sq-sized sqrt buffer
    over the whole group; _single_tensor_adamw: sqrt and division per tensor; fused: none, but
    its `step` counters live on the device), torch/optim/sgd.py, bitsandbytes/optim,
    transformers/optimization.py Adafactor (an fp32 `RMS` scalar per tensor)."""
    ents = _entries(trainable, param_bytes)
    n = sum(numel * count for numel, _, count, _ in ents)
    n_tensors = sum(count for _, _, count, _ in ents)
    # torch keeps Adam/momentum state in each parameter's dtype; with a master copy, fp32
    state_bytes = sum(numel * count * (4 if master else nb) for numel, _, count, nb in ents)
    largest = max(ents, key=lambda e: e[0] * (4 if master else e[3]), default=(0, (), 0, param_bytes))
    master_bytes = 4 * n if master else 0
    if optimizer == "adamw":
        temp = {"foreach": state_bytes, "fused": 0,
                "forloop": 2 * largest[0] * (4 if master else largest[3])}[impl]
        # torch's fused AdamW keeps an fp32 `step` per tensor on the device; DeepSpeed's FusedAdam
        # (the master-weights layout) counts steps in Python.
        steps = 4 * n_tensors if impl == "fused" and not master else 0
        return OptimizerMemory(2 * state_bytes + steps, master_bytes, temp, step_counter_bytes=steps)
    if optimizer in ("adamw8bit", "paged_adamw8bit"):
        state = sum(_bnb8_state(numel, 2) * count for numel, _, count, _ in ents)
        return OptimizerMemory(state, master_bytes, 0, paged=optimizer.startswith("paged"))
    if optimizer == "sgd":
        return OptimizerMemory(0, master_bytes, 0)
    if optimizer == "sgd_momentum":
        return OptimizerMemory(state_bytes, master_bytes, 0)
    if optimizer == "lion":
        # bitsandbytes.optim.Lion (32-bit): one fp32 state, fused kernel.
        return OptimizerMemory(4 * n, master_bytes, 0)
    if optimizer == "adafactor":
        state = sum(_adafactor_state(numel, shape) * count for numel, shape, count, _ in ents) + 4 * n_tensors
        # Per tensor: grad.float(), p.float() (when not fp32), update, -update, -update*lr (fp32).
        temp = 4 * largest[0] * (3 + (2 if largest[3] != 4 and not master else 0))
        return OptimizerMemory(state, master_bytes, temp, step_counter_bytes=4 * n_tensors)
    raise ValueError(f"unknown optimizer {optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")


def zero1_partition(trainable, param_bytes, ranks):
    """Split the tensors of `trainable` = [(numel, shape, count[, bytes]), …] over `ranks` as torch's
    ZeroRedundancyOptimizer does: largest first, each to the rank with the fewest elements so far (the
    lowest such rank on a tie). Returns one `trainable`-style list per rank that holds a tensor (with more
    ranks than tensors, the rest hold none and are left out).
    Source: torch/distributed/optim/zero_redundancy_optimizer.py, `_partition_parameters`."""
    import heapq
    from collections import Counter

    ents = sorted(_entries(trainable, param_bytes), key=lambda e: e[0], reverse=True)
    ranks = min(ranks, sum(e[2] for e in ents)) or 1
    heap = [(0, r) for r in range(ranks)]
    held = [Counter() for _ in range(ranks)]
    for numel, shape, count, nb in ents:
        for _ in range(count):
            size, r = heapq.heappop(heap)
            held[r][(numel, shape, nb)] += 1
            heapq.heappush(heap, (size + numel, r))
    return [[(numel, shape, c, nb) for (numel, shape, nb), c in h.items()] for h in held]


def gradient_bytes(trainable, param_bytes):
    """Gradients: one per trainable parameter, in that parameter's dtype."""
    return sum(numel * count * nb for numel, _, count, nb in _entries(trainable, param_bytes))
