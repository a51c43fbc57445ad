"""The memory-category vocabulary shared by prediction, tracing and measurement.

Every breakdown in vramlab — predicted by `formulas`, traced on fake tensors,
measured on a GPU — is keyed by these names, so the three line up category by
category. Tensor categories add up to `peak_allocated_bytes` (what
`torch.cuda.max_memory_allocated` reports); device categories are what NVML sees
on top of that: the context made at CUDA init, the workspaces libraries allocate
outside the caching allocator, and the allocator's reserved-but-free slack.
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
CUDA_CONTEXT = "cuda_context"  # the CUDA context itself: driver state and loaded kernel images, made at CUDA init
WORKSPACES = "workspaces"  # device memory beyond the context and the caching allocator: cuBLAS/cuDNN workspaces, handles
ALLOCATOR_SLACK = "allocator_slack"  # reserved by the caching allocator but not holding a live tensor

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
DEVICE_CATEGORIES = (CUDA_CONTEXT, WORKSPACES, ALLOCATOR_SLACK)
ALL_CATEGORIES = TENSOR_CATEGORIES + DEVICE_CATEGORIES

# Phases of a workload, in order; a prediction names the one holding its peak.
PHASES_INFERENCE = ("load", "prefill", "decode")
PHASES_TRAIN = ("load", "forward", "backward", "optimizer_step")
