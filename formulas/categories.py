"""The memory-category vocabulary shared by prediction, tracing and measurement.

Every breakdown in vramlab — predicted by `formulas`, traced on fake tensors,
measured on a GPU — is keyed by these names, so the three line up category by
category. Tensor categories and the library workspaces the caching allocator holds
add up to `peak_allocated_bytes` (what `torch.cuda.max_memory_allocated` reports);
device categories are what NVML sees on top of that: the CUDA context (everything
outside the caching allocator) and the allocator's reserved-but-free slack.
Where each sits, and its sources: formulas/device.py.
"""

WEIGHTS = "weights"  # the model's parameters (LoRA adapters included), at their storage dtype
QUANT_STATE = "quant_state"  # quantization constants: absmax, scales, zeros, codebooks
BUFFERS = "buffers"  # non-parameter module state: rotary inv_freq, causal masks, router biases
GRADIENTS = "gradients"  # .grad of trainable parameters
OPTIMIZER_STATES = "optimizer_states"  # Adam moments, momentum buffers, 8-bit states and their scales
MASTER_WEIGHTS = "master_weights"  # fp32 copy of low-precision parameters held by the optimizer
ACTIVATIONS = "activations"  # tensors saved for backward (training) or the live forward working set
KV_CACHE = "kv_cache"  # keys and values kept for decoding
LOGITS = "logits"  # vocabulary logits, their fp32 upcast, log-softmax and loss
TEMPORARIES = "temporaries"  # short-lived workspace: optimizer foreach buffers, autocast weight copies, dequantization
# library workspaces held in the caching allocator (counted in torch's allocated peak): cuBLAS/cuBLASLt, one per
# thread and stream that runs GEMMs (aten/src/ATen/cuda/CublasHandlePool.cpp)
WORKSPACES = "workspaces"
# everything outside the caching allocator: the context made at CUDA init, kernel images loaded lazily as kernels
# first run, library handles
CUDA_CONTEXT = "cuda_context"
ALLOCATOR_SLACK = "allocator_slack"  # reserved by the caching allocator but not holding a live tensor or workspace

TENSOR_CATEGORIES = (
    WEIGHTS,
    QUANT_STATE,
    BUFFERS,
    GRADIENTS,
    OPTIMIZER_STATES,
    MASTER_WEIGHTS,
    ACTIVATIONS,
    KV_CACHE,
    LOGITS,
    TEMPORARIES,
)
ALLOCATED_CATEGORIES = TENSOR_CATEGORIES + (WORKSPACES,)  # what adds up to peak_allocated_bytes
DEVICE_CATEGORIES = (CUDA_CONTEXT, ALLOCATOR_SLACK)  # on top of it: what adds up to peak_device_bytes
ALL_CATEGORIES = ALLOCATED_CATEGORIES + DEVICE_CATEGORIES

# Phases of a workload, in order; a prediction names the one holding its peak.
PHASES_INFERENCE = ("load", "prefill", "decode")
PHASES_TRAIN = ("load", "forward", "backward", "optimizer_step")
