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


def optimizer_memory(trainable, param_bytes, optimizer, impl="foreach", master=False):
    """State, master copy and step temporaries for `trainable` = [(numel, shape, count), …].

    param_bytes: bytes per element of the trainable parameters (and their grads).
    master: keep an fp32 master copy; states are fp32 then (DeepSpeed / Megatron style).
    Source: torch/optim/adamw.py (_multi_tensor_adamw: one exp_avg_sq-sized sqrt buffer
    over the whole group; _single_tensor_adamw: sqrt and division per tensor; fused: none),
    torch/optim/sgd.py, bitsandbytes/optim, transformers/optimization.py Adafactor."""
    n = sum(numel * count for numel, _, count in trainable)
    largest = max((numel for numel, _, _ in trainable), default=0)
    sb = 4 if master else param_bytes  # torch keeps Adam/momentum state in the parameter dtype
    master_bytes = 4 * n if master else 0
    if optimizer == "adamw":
        state = 2 * sb * n
        temp = {"foreach": sb * n, "fused": 0, "forloop": 2 * sb * largest}[impl]
        return OptimizerMemory(state, master_bytes, temp)
    if optimizer in ("adamw8bit", "paged_adamw8bit"):
        state = sum(_bnb8_state(numel, 2) * count for numel, _, count in trainable)
        return OptimizerMemory(state, master_bytes, 0, paged=optimizer.startswith("paged"))
    if optimizer == "sgd":
        return OptimizerMemory(0, master_bytes, 0)
    if optimizer == "sgd_momentum":
        return OptimizerMemory(sb * n, master_bytes, 0)
    if optimizer == "lion":
        # bitsandbytes.optim.Lion (32-bit): one fp32 state, fused kernel.
        return OptimizerMemory(4 * n, master_bytes, 0)
    if optimizer == "adafactor":
        state = sum(_adafactor_state(numel, shape) * count for numel, shape, count in trainable)
        # Per tensor: grad.float(), p.float() (when not fp32), update, -update, -update*lr (fp32).
        temp = 4 * largest * (3 + (2 if param_bytes != 4 and not master else 0))
        return OptimizerMemory(state, master_bytes, temp)
    raise ValueError(f"unknown optimizer {optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")


def gradient_bytes(n_trainable, grad_bytes):
    """Gradients: one per trainable parameter, in the parameter dtype."""
    return n_trainable * grad_bytes
