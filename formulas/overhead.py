"""Device-level figures of one environment: workspaces, the CUDA context, allocator slack.

`Overheads` holds them for one GPU architecture and software stack. The defaults come from
formulas/device.py, which says where each number comes from (a measurement, a published
figure, or the library's source); a calibration table (results/calibration/, fitted by
`vramlab fit`) replaces the context and the slack with values measured in one environment.

How a prediction uses them (formulas/predict.py):
- `workspaces(spec, phase)`: cuBLAS workspaces, inside the caching allocator and so inside the
  allocated peak — none while loading, one per thread that has run a GEMM after that;
- `context(spec)`: everything outside the caching allocator — the context at CUDA init plus the
  kernel images the workload loads;
- `slack(spec, phase, allocated, transient)`: reserved − allocated at the phase's peak, from the
  rules derived from the allocator simulation (harness/tracing/allocator.py; docs/device.md):
  inference prefill and decode leave cached the blocks of the widest transient of a layer; a
  training step also keeps the blocks its backward and optimizer step freed.
"""

from dataclasses import dataclass

from . import categories as C
from .device import (
    DEFAULT_CC,
    KERNEL_IMAGES,
    WORKSPACE_THREADS,
    cublas_workspace_bytes,
    cublaslt_extra_bytes,
    cuda_context_at_init,
    kernel_families,
)
from .dtypes import DTYPE_BYTES, FLOAT_DTYPES
from .elementwise import to_int, vmax
from .units import MiB

# Allocator slack rules (reserved − allocated at a phase's peak). What loading the weights leaves is computed
# exactly (`load_slack_bytes`: the model's own tensors through the allocator simulation); on top of it, a share
# of the phase's transient bytes (what the phase allocates and frees within itself), whose freed blocks stay
# cached and are not all reused. The shares are the medians over traced workloads replayed through the
# simulation (scripts/slack_rules.py fit results/allocator/slack_dataset.json: float inference and training
# specs of five models traced on fake tensors), not fitted on GPU records; the fixed parts stand in where the load
# slack is not computed. (fixed bytes, share)
SLACK_RULES = {
    "load": (2 * MiB, 0.0),
    "inference": (20 * MiB, 0.40),
    "train": (20 * MiB, 0.19),
}
# With expandable_segments:True the allocator maps pages into one segment per stream and pool instead of a
# segment per request, so freed ranges coalesce and are reused: the same rules, other shares (same source).
SLACK_RULES_EXPANDABLE = {
    "load": (2 * MiB, 0.0),
    "inference": (20 * MiB, 0.10),
    "train": (20 * MiB, 0.10),
}


@dataclass(frozen=True)
class Overheads:
    """The device-level figures a prediction adds to its tensors, for one architecture and environment."""

    cc: tuple = DEFAULT_CC  # compute capability these figures are for
    cuda_context_bytes: int = None  # the context at CUDA init (None: formulas.device's row for `cc`, filled in)
    kernel_images: tuple = tuple(KERNEL_IMAGES.items())  # (family, bytes) lazy loading brings in
    cublas_workspace: int = None  # one cuBLAS workspace (None: formulas.device's rule for `cc` and the stack)
    environ: tuple = ()  # ((variable, value), ...): CUBLAS_WORKSPACE_CONFIG and the like, as torch would read them
    slack_fixed_bytes: tuple = tuple((k, v[0]) for k, v in SLACK_RULES.items())
    slack_share: tuple = tuple((k, v[1]) for k, v in SLACK_RULES.items())
    source: str = "uncalibrated defaults (formulas/device.py, formulas/overhead.py)"
    calibrated: bool = False  # True when the context and slack came from a calibration table (measurements)
    alloc_conf: str = ""  # the caching allocator's settings the slack rules are for (PYTORCH_CUDA_ALLOC_CONF)

    def __post_init__(self):
        if self.cuda_context_bytes is None:
            object.__setattr__(self, "cuda_context_bytes", cuda_context_at_init(self.cc)[0])

    # ---------------------------------------------------------------- the figures

    def with_alloc_conf(self, config):
        """These figures under other allocator settings (formulas.allocator.AllocatorConfig): expandable segments
        take their own slack shares; a calibration's shares stand only for the settings it was fitted under."""
        text = getattr(config, "text", "") or ""
        if text == self.alloc_conf:
            return self
        rules = SLACK_RULES_EXPANDABLE if getattr(config, "expandable_segments", False) else SLACK_RULES
        from dataclasses import replace

        return replace(self, alloc_conf=text, slack_fixed_bytes=tuple((k, v[0]) for k, v in rules.items()),
                       slack_share=tuple((k, v[1]) for k, v in rules.items()),
                       source=self.source + (f"; allocator {text}" if text else ""))

    def workspace_bytes(self, spec=None, biased=False):
        """One thread's cuBLAS workspace (and cuBLASLt's where it is separate and the model has biased linears)."""
        env = dict(self.environ)
        ws = self.cublas_workspace if self.cublas_workspace is not None else cublas_workspace_bytes(self.cc, spec, env)
        return ws + (cublaslt_extra_bytes(spec, env) if biased else 0)

    def workspaces(self, spec, phase, biased=False):
        """Workspace bytes inside the allocator in `phase`: none while loading, one per GEMM thread after."""
        if phase == "load":
            return 0
        return WORKSPACE_THREADS[spec.mode] * self.workspace_bytes(spec, biased)

    def context(self, spec, loaded=()):
        """Bytes outside the caching allocator: the context at init and the kernel images the workload loads (less
        the families in `loaded`, which an earlier workload of the same process brought in)."""
        images = dict(self.kernel_images)
        fams = set(kernel_families(spec)) | set(loaded)
        return self.cuda_context_bytes + sum(images.get(f, 0) for f in fams)

    def transient(self, phase_bd):
        """What a phase allocates and frees within itself: its allocated bytes less the model's state, the KV cache,
        the optimizer's state and the workspaces."""
        kept = (C.WEIGHTS, C.QUANT_STATE, C.BUFFERS, C.KV_CACHE, C.OPTIMIZER_STATES, C.MASTER_WEIGHTS, C.WORKSPACES)
        return sum(v for c, v in phase_bd.items() if c not in kept)

    def slack(self, spec, phase, transient, load_slack=None):
        """Reserved − allocated at a phase's peak: what loading the weights left (`load_slack`, from
        `load_slack_bytes`; else the rule's fixed part) plus the rule's share of the phase's transient bytes (a
        number or a numpy array)."""
        kind = "load" if phase == "load" else spec.mode
        fixed = dict(self.slack_fixed_bytes)[kind] if load_slack is None else load_slack
        share = dict(self.slack_share)[kind]
        return vmax(to_int(transient * share, rounding=False) + fixed, fixed)

    @property
    def expandable(self):
        return "expandable_segments:True" in self.alloc_conf

    # ---------------------------------------------------------------- what older callers read
    @property
    def workspaces_bytes(self):
        """One inference thread's workspace (the engines' rules read it as the post-context increase)."""
        return self.workspace_bytes()


DEFAULT_OVERHEADS = Overheads()


def load_slack_bytes(shape, dtype, compute_dtype="bf16", double_quant=True, group_size=128, config=None):
    """Reserved − allocated once the model is loaded: every weight tensor (and its quantization state) allocated in
    module order — the embeddings, then layer by layer, then the rest — through the caching-allocator simulation
    (formulas/allocator.py), against their exact bytes. The segment rounding of the weights (a tensor of 10 MiB or more
    gets a segment rounded up to 2 MiB; smaller ones share 20 MiB segments) stays reserved for the whole run."""
    from .allocator import DEFAULT_CONFIG, CachingAllocatorModel
    from .weights import _is_layer, _tensor_storage

    cb = DTYPE_BYTES[dtype if dtype in FLOAT_DTYPES else compute_dtype]  # quantized weights: the compute dtype's
    sim = CachingAllocatorModel(config or DEFAULT_CONFIG)
    exact = 0
    key = 0

    def alloc(nbytes):
        nonlocal key, exact
        if nbytes > 0:
            key += 1
            sim.malloc(key, nbytes)
            exact += nbytes

    def one(t, copies):
        w, q, _ = _tensor_storage(t, dtype, cb, shape.n_layers, double_quant, group_size, shape.tie_embeddings)
        for _ in range(copies):
            alloc(w // t.count)
            alloc(q // t.count)

    layer = [t for t in shape.tensors if _is_layer(t)]
    first = [t for t in shape.tensors if not _is_layer(t) and t.kind == "embedding"]
    rest = [t for t in shape.tensors if not _is_layer(t) and t.kind != "embedding"]
    for t in first:
        one(t, t.count)
    L = shape.n_layers
    for i in range(L):
        for t in layer:
            if t.count >= L:  # in every layer (several copies per layer: count // L)
                one(t, t.count // L)
            elif i >= L - t.count:  # in the last `count` layers only (MoE blocks after dense first layers)
                one(t, 1)
    for t in rest:
        one(t, t.count)
    return sim.reserved_bytes - exact


def default_overheads(cc=None, environ=()):
    """The uncalibrated figures for an architecture (None: DEFAULT_CC), with the environment variables that change them."""
    cc = cc or DEFAULT_CC
    _, src = cuda_context_at_init(cc)
    return Overheads(cc=cc, environ=tuple(environ),
                     source=f"uncalibrated defaults for sm{cc[0]}{cc[1]} (formulas/device.py: context {src.split(':')[0]})")
