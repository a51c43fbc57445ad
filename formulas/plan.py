"""The planner: which GPUs, how many, how long — with the strategies frameworks actually run.

Answers the questions people bring (see ../shared/seeds/): does a workload fit on GPU G and with what
margin; the fewest GPUs of type G, the fastest plan on N of them and the cheapest, each with the
framework that runs it and the runner-up plans with why they lost; the memory levers a plan needs
(gradient checkpointing, offload, micro-batch 1 with gradient accumulation: "fits with --grad-ckpt on 2
GPUs; without it, 4"); the host RAM offload needs per node; the largest batch and the longest context
that fit; prefill time and decode tokens/s (bounds from FLOPs and bandwidth); fine-tuning time for D
tokens and the GPUs that finish it within a deadline; and a seeds-style table of GPUs per model × data
size × deadline.

The strategy space (training) is what the frameworks offer, inside the node topology of the GPU type
(formulas/topology.py, the catalog's `nodes`): DDP; ZeRO-1/2/3 with CPU offload of the optimizer
(DeepSpeed) or of the parameters (FSDP's CPU offload), on NVMe where the host RAM does not suffice
(DeepSpeed ZeRO-Infinity); FSDP-QLoRA (4-bit storage sharded, as TRL and Answer.AI's fsdp_qlora run it);
tensor parallelism only inside a node and never on bitsandbytes weights, with sequence parallelism;
pipeline stages; TP × FSDP and TP × PP × DP; context parallelism for long sequences; expert parallelism
for MoE models. Each plan is a Spec `formulas.predict` models (per-GPU memory, the worst GPU) and
`formulas.topology.step_time` times (compute at peak × MFU, communication over the links).

Device overheads are the caller's: `vramlab plan` passes the same calibration table `vramlab predict`
would use for that GPU (harness.analysis.calibrate), or the uncalibrated defaults, and every answer says
which. Pure like the rest of formulas/: no torch, no pandas, no file lookups.
"""

import math
from dataclasses import dataclass, replace

from .catalog import get_shape, model_label
from .dtypes import BNB_DTYPES, DTYPE_BYTES
from .hardware import get_hardware, node_of
from .lora import lora_params, resolve_targets
from .overhead import DEFAULT_OVERHEADS
from .predict import predict, workload_static
from .spec import SpecError, validate
from .throughput import (
    decode_flops_per_token,
    gpus_for_deadline,
    kv_bytes_read_per_step,
    prefill_flops,
    training_flops_per_token,
    weight_bytes_read_per_step,
)
from .topology import CPU_ADAM_BYTES_PER_PARAM, nvme_seconds, step_time, topology, tp_allowed
from .weights import weight_storage

DEFAULT_MFU = 0.4  # model-FLOPs utilisation assumed for training time (a flag)
DEFAULT_TOKENS_PER_BYTE = 0.25  # ~4 bytes of English text per BPE token (an assumption, a flag)
DEFAULT_MAX_GPUS = 1024  # how far the fewest-GPU search looks
MAX_GPUS_LIMIT = 1 << 20  # --max-gpus beyond this is refused
BATCH_CAP = 1 << 16  # the largest-batch search stops here
SEQ_CAP = 1 << 22  # the longest-context search stops here when the model states no window
CP_MIN_SEQ = 8192  # context parallelism is tried from this sequence length on (long-context training)
CKPT_LEVERS = ("none", "selective", "full")  # gradient checkpointing, least recompute first
MAX_PP = 16  # pipeline stages tried at most (Llama 3 405B and DeepSeek-V3 trained with 16): powers of two, or
# divisors of the layers (equal stages)
HOST_RAM_FREE = 0.10  # share of a node's RAM left to the OS, the data loader and the page cache (an assumption)


@dataclass(frozen=True)
class Strategy:
    """How a workload is spread over `gpus` GPUs, and the memory levers it pulls."""

    gpus: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    zero: int = 0
    shard: int = 0  # hybrid sharding: ZeRO / FSDP inside groups of this many GPUs (one node), replicas across them
    offload: str = "none"  # none | optimizer | params
    nvme: bool = False  # the offloaded state on NVMe (DeepSpeed ZeRO-Infinity), not in host RAM
    layer_split: bool = False
    sp: bool = False  # sequence parallelism with TP (Megatron-LM, torchtitan)
    ckpt: str = ""  # "" the workload's own; none | selective (every 2nd layer, torchtitan) | full
    micro_batch: int = 0  # 0: the replica's natural micro-batch; 1: micro-batch 1, gradient accumulation making up the rest

    @property
    def dp(self):
        return self.gpus // (self.tp * self.pp * self.cp)

    def natural_batch(self, spec):
        """Sequences per micro-batch of one model replica: every GPU's share is the workload's --batch, and a replica
        of tp × cp GPUs works on the same micro-batch (TP splits the work on each token, CP the sequence)."""
        return spec.batch * self.tp * self.cp if spec.mode == "train" else spec.batch

    def apply(self, spec):
        """The spec run this way.

        Training keeps every GPU's work per optimizer step at --batch × --grad-accum sequences (the global
        batch grows with the GPUs, as Hugging Face's Trainer counts it): a tp × cp replica runs micro-batches
        of --batch × tp × cp sequences, and a pipeline --grad-accum × pp of them per step (its micro-batches
        in flight); micro-batch 1 moves the rest into gradient accumulation."""
        kw = dict(gpus=self.gpus, tp=self.tp, pp=self.pp, cp=self.cp, ep=self.ep, zero=self.zero,
                  layer_split=self.layer_split, offload=self.offload, sequence_parallel=self.sp, shard_gpus=self.shard)
        if self.ckpt:
            kw.update(grad_ckpt=self.ckpt != "none", ckpt_every=2 if self.ckpt == "selective" else 1)
        if spec.mode == "train" and self.gpus > 1:
            b = self.natural_batch(spec)
            accum = spec.grad_accum * self.pp
            if self.micro_batch and self.micro_batch < b:
                accum, b = accum * (b // self.micro_batch), self.micro_batch
            kw.update(batch=b, grad_accum=accum)
        elif self.micro_batch and self.micro_batch < spec.batch:
            kw.update(batch=self.micro_batch, grad_accum=spec.grad_accum * (spec.batch // self.micro_batch))
        if sharded_kbit(spec, self.zero, self.gpus // (self.tp * self.pp)):
            # TRL with FSDP / ZeRO-3 over a 4-bit base ("sharded QLoRA") skips prepare_model_for_kbit_training and
            # keeps the adapters in the base dtype (v0.25.1 trl/models/utils.py:574-601: is_sharded_qlora, then
            # get_peft_model(..., autocast_adapter_dtype=False)); Answer.AI's fsdp_qlora builds the same.
            compute = spec.dtype if spec.dtype in ("bf16", "fp16") else spec.compute_dtype
            kw.update(kbit_prep=False, lora_dtype=compute)
        return spec.replace(**kw)

    @property
    def kind(self):
        """A short key: single, ddp, zero1/2/3 (+ offload), layer_split, tp, tp_pp, pp, or a 2-D/3-D combination."""
        if self.gpus == 1:
            return "single"
        if self.layer_split:
            return "layer_split"
        dims = [d for d, v in (("tp", self.tp), ("cp", self.cp), ("pp", self.pp), ("ep", self.ep)) if v > 1]
        dp = ({0: "ddp", 1: "zero1", 2: "zero2", 3: "zero3"}[self.zero] if self.dp * self.cp > 1 else "")
        if self.offload != "none":
            dp += "_offload" if self.offload == "optimizer" else "_params"
        return "_".join(dims + ([dp] if dp and (dims or self.zero or self.dp > 1) else [])) or "single"

    def label(self, method=None):
        """Short human name, e.g. 'ZeRO-3 over 8', 'TP=8 × PP=4 × ZeRO-1 over 8', 'FSDP-QLoRA over 2 + CPU offload'."""
        n = self.gpus
        if n == 1:
            return "1 GPU"
        if self.layer_split:
            return f"layer split over {n}"
        parts = [f"{d}={v}" for d, v in (("TP", self.tp), ("CP", self.cp), ("PP", self.pp), ("EP", self.ep)) if v > 1]
        if self.sp:
            parts[0] += "+SP"
        shard = self.dp * self.cp
        dp_name = None
        if self.zero == 3:
            dp_name = "FSDP-QLoRA" if method == "qlora" else "ZeRO-3"
        elif self.zero:
            dp_name = f"ZeRO-{self.zero}"
        elif self.dp > 1:
            dp_name = "DDP"
        if dp_name and self.shard:
            parts.append(f"{dp_name} over {self.shard} × {shard // self.shard} replicas (hybrid)")
        elif dp_name:
            over = shard if self.zero else self.dp
            parts.append(f"{dp_name} over {over}" if not parts or over > 1 else dp_name)
        text = " × ".join(parts)
        if self.offload == "optimizer":
            text += " + optimizer offload" + (" to NVMe" if self.nvme else "")
        elif self.offload == "params":
            text += (" + NVMe offload" if self.nvme else " + CPU offload of parameters")
        return text

    def levers(self, spec):
        """The memory levers this plan pulls beyond the workload as given, in words."""
        out = []
        if self.ckpt == "full" and not spec.grad_ckpt:
            out.append("gradient checkpointing")
        elif self.ckpt == "selective":
            out.append("selective checkpointing (every 2nd layer)")
        b = self.natural_batch(spec)
        if self.micro_batch and self.micro_batch < b:
            out.append(f"micro-batch {self.micro_batch} × {b // self.micro_batch * spec.grad_accum * self.pp} "
                       "accumulation steps")
        return out

    def to_dict(self, method=None):
        return {"kind": self.kind, "label": self.label(method), "gpus": self.gpus, "tp": self.tp, "pp": self.pp,
                "cp": self.cp, "ep": self.ep, "zero": self.zero, "layer_split": self.layer_split,
                "shard_gpus": self.shard or None, "offload": self.offload, "nvme": self.nvme,
                "sequence_parallel": self.sp, "ckpt": self.ckpt or None,
                "micro_batch": self.micro_batch or None}


def sharded_kbit(spec, zero, dp):
    """LoRA over a bitsandbytes 4-bit base with its weights sharded by FSDP / ZeRO-3 (FSDP-QLoRA)."""
    kbit = spec.method == "qlora" or (spec.method == "lora" and spec.dtype in BNB_DTYPES)
    return spec.mode == "train" and kbit and zero >= 2 and dp > 1


def framework(strategy, spec):
    """Which framework runs a plan, in words."""
    s = strategy
    if spec.mode == "inference":
        if s.gpus == 1:
            return "transformers"
        if s.layer_split:
            return "accelerate (device_map)"
        return "vLLM (tensor / pipeline parallel)" if s.pp > 1 else "vLLM, transformers (tp_plan)"
    if s.ckpt == "selective":
        return "torchtitan"
    if spec.method != "full" and (s.tp > 1 or s.cp > 1 or s.ep > 1 or s.pp > 1):
        return "NeMo (Megatron-Core with PEFT)"
    if s.cp > 1 or s.ep > 1 or s.pp > 1:
        return "Megatron-LM, torchtitan" + (" (distributed optimizer)" if s.zero == 1 else "")
    if s.tp > 1:
        return {0: "torchtitan, accelerate (transformers tp_plan)", 1: "Megatron-LM (distributed optimizer)",
                3: "torchtitan (TP × FSDP2)"}.get(s.zero, "torchtitan")
    if s.gpus == 1:
        return "transformers Trainer / TRL"
    if s.shard:
        off = " with CPU offload" if s.offload == "params" else ""
        if sharded_kbit(spec, s.zero, s.dp):
            return f"Answer.AI fsdp_qlora (hybrid_full_shard){off}, accelerate FSDP HYBRID_SHARD + TRL"
        return f"accelerate FSDP HYBRID_SHARD{off}, torchtitan (dp_replicate × dp_shard)"
    if sharded_kbit(spec, s.zero, s.dp):
        if s.nvme:
            return "DeepSpeed ZeRO-Infinity (offload to NVMe) + TRL"
        if s.offload == "params":
            return "Answer.AI fsdp_qlora (use_cpu_offload), accelerate FSDP (fsdp_offload_params) + TRL"
        return "accelerate FSDP + TRL (bnb_4bit_quant_storage), Answer.AI fsdp_qlora"
    if s.nvme:
        return "DeepSpeed ZeRO-Infinity (offload to NVMe)"
    if s.offload == "params":
        return "accelerate FSDP (fsdp_offload_params), DeepSpeed ZeRO-3 (offload_param + offload_optimizer)"
    if s.offload == "optimizer":
        return "DeepSpeed ZeRO-Offload (offload_optimizer)"
    return {0: "accelerate / torchrun (DDP)", 1: "DeepSpeed ZeRO-1", 2: "DeepSpeed ZeRO-2, FSDP (SHARD_GRAD_OP)",
            3: "accelerate FSDP, DeepSpeed ZeRO-3"}[s.zero]


def strategy_of(spec):
    """The Strategy a spec's own parallelism flags describe."""
    return Strategy(gpus=spec.gpus, tp=spec.tp, pp=spec.pp, cp=spec.cp, ep=spec.ep, zero=spec.zero,
                    offload=spec.offload, layer_split=spec.layer_split and spec.gpus > 1, sp=spec.sequence_parallel)


def _tp_ok(shape, t):
    kv = shape.n_kv_heads
    return shape.n_heads % t == 0 and (kv % t == 0 or t % kv == 0)


def _powers(limit, start=2):
    out, v = [], start
    while v <= limit:
        out.append(v)
        v *= 2
    return out


def tp_degrees(shape, dtype, gpus_per_node, n):
    """Tensor-parallel degrees > 1 for n GPUs: inside one node (dividing it), dividing n and the heads, never
    on bitsandbytes weights."""
    if not tp_allowed(dtype):
        return []
    return [t for t in range(2, min(n, gpus_per_node) + 1)
            if gpus_per_node % t == 0 and n % t == 0 and _tp_ok(shape, t)]


def candidates(shape, spec, n, gpus_per_node):
    """Strategies (no levers) to try on n GPUs.

    Inference: 1 GPU; a layer split inside a node; TP = n inside a node; TP inside a node × PP stages.
    Training: DDP, ZeRO-1/2/3, ZeRO + optimizer offload, ZeRO-3 + parameter offload; TP inside a node with
    DDP, FSDP or the distributed optimizer over the rest; pipeline stages; context parallelism for sequences of
    CP_MIN_SEQ and more; expert parallelism for MoE models."""
    if n == 1:
        return [Strategy()]
    out = []
    dtype = spec.dtype if spec.method != "qlora" else "nf4"
    tps = tp_degrees(shape, dtype, gpus_per_node, n)
    if spec.mode == "inference":
        if n <= min(shape.n_layers, gpus_per_node):
            out.append(Strategy(gpus=n, layer_split=True))
        if n in tps:
            out.append(Strategy(gpus=n, tp=n))
        for t in [1] + tps:  # pipeline stages alone only across nodes (inside one, the layer split is the same)
            if t < n and n // t <= shape.n_layers and (t > 1 or n > gpus_per_node):
                out.append(Strategy(gpus=n, tp=t, pp=n // t))
        return out
    cps = [c for c in (2, 4, 8) if spec.seq >= CP_MIN_SEQ and spec.seq % c == 0 and spec.attn in ("sdpa", "auto")]
    if spec.method == "qlora" or spec.dtype in BNB_DTYPES:
        # a bitsandbytes base trains under TRL / accelerate / DeepSpeed / fsdp_qlora: data parallelism, ZeRO, FSDP, offload
        tps, cps, shape_ep = [], [], False
    else:
        shape_ep = True
    for t in [1] + tps:
        for c in [1] + [c for c in cps if t * c <= gpus_per_node and n % (t * c) == 0]:
            rest = n // (t * c)
            pps = [p for p in range(2, min(rest, shape.n_layers, MAX_PP) + 1)
                   if rest % p == 0 and (p & (p - 1) == 0 or shape.n_layers % p == 0)] if shape_ep else []
            for p in [1] + pps:
                dp = rest // p
                shard = dp * c
                plain = t == p == c == 1
                # beside pipeline or context parallelism the data-parallel ranks shard at least the optimizer state
                # (Megatron-LM's distributed optimizer, or FSDP2 in torchtitan)
                zeros = [0] if shard == 1 else ([0, 1, 2, 3] if plain else [0, 1, 3] if p == c == 1 else [1, 3])
                for z in zeros:
                    for e in [1] + (_ep_degrees(shape, shard, gpus_per_node) if shape_ep else []):
                        sp = t > 1
                        out.append(Strategy(gpus=n, tp=t, pp=p, cp=c, ep=e, zero=z, sp=sp))
                        if plain and z >= 1 and e == 1:
                            out.append(Strategy(gpus=n, zero=z, offload="optimizer"))
                        if plain and z == 3 and e == 1:
                            out.append(Strategy(gpus=n, zero=3, offload="params"))
                        if plain and z in (2, 3) and e == 1 and n > gpus_per_node and n % gpus_per_node == 0 \
                                and gpus_per_node > 1:
                            # hybrid sharding: FSDP inside each node, replicas across the nodes
                            out.append(Strategy(gpus=n, zero=z, shard=gpus_per_node))
                            if z == 3:
                                out.append(Strategy(gpus=n, zero=3, shard=gpus_per_node, offload="params"))
    return out


def _ep_degrees(shape, shard, gpus_per_node):
    """Expert-parallel degrees for an MoE model over `shard` data-parallel GPUs: the largest power of two that
    divides the experts and the data-parallel GPUs inside one node, and across all of them."""
    if not shape.is_moe:
        return []
    ok = [e for e in _powers(min(shape.n_experts, shard), 2) if shape.n_experts % e == 0 and shard % e == 0]
    inside = [e for e in ok if e <= gpus_per_node]
    return sorted({x for x in (inside[-1:] + ok[-1:])})


@dataclass(frozen=True)
class Option:
    """One plan evaluated: its per-GPU peak (worst GPU), whether it fits, host RAM and time per step."""

    strategy: Strategy
    per_gpu_bytes: int  # predicted peak_device_bytes of the GPU that needs the most
    peak_phase: str
    fits: bool  # on the GPU and, where the host RAM per node is known, on the host
    gpu_fits: bool = True
    host_bytes_per_node: int = 0  # pinned host memory the offload needs on one node
    step: object = None  # formulas.topology.StepTime (training)
    framework: str = ""
    spec: object = None  # the validated spec

    @property
    def seconds_per_token(self):
        """GPU-seconds per trained token (what the plan costs); the step time over the tokens one GPU trains."""
        return self.step.seconds / self.step.tokens_per_gpu if self.step else float("inf")

    def to_dict(self, method=None):
        d = {"strategy": self.strategy.label(method), "gpus": self.strategy.gpus, "per_gpu_bytes": self.per_gpu_bytes,
             "peak_phase": self.peak_phase, "fits": self.fits, "gpu_fits": self.gpu_fits, "framework": self.framework,
             "host_bytes_per_node": self.host_bytes_per_node, "spec": self.strategy.to_dict(method)}
        if self.step:
            d["step"] = self.step.to_dict()
        return d


class Planner:
    """Plans one workload on one GPU type. `spec` is the workload; its parallelism flags are the user's own plan.

    `overheads`: the device overheads for this GPU (a calibration table's, or the uncalibrated defaults).
    `gpus_per_node`, `nodes`, `inter_node_gbps`, `host_ram_bytes`: the topology, where the user states it
    (else the catalog's node profile for this GPU type)."""

    def __init__(self, spec, gpu, margin=0.0, max_gpus=DEFAULT_MAX_GPUS, overheads=DEFAULT_OVERHEADS,
                 gpus_per_node=None, nodes=0, inter_node_gbps=None, host_ram_bytes=None, mfu=DEFAULT_MFU):
        if not 0 <= margin < 1:
            raise SpecError(f"--margin {margin:g}: must be a fraction in [0, 1), e.g. 0.05 or 5%")
        if not 1 <= max_gpus <= MAX_GPUS_LIMIT:
            raise SpecError(f"--max-gpus {max_gpus:,}: must be an integer from 1 to {MAX_GPUS_LIMIT:,}")
        if gpus_per_node is not None and not 1 <= gpus_per_node <= 1024:
            raise SpecError(f"--gpus-per-node {gpus_per_node}: must be an integer from 1 to 1024")
        if not 0 <= nodes <= MAX_GPUS_LIMIT:
            raise SpecError(f"--nodes {nodes}: must be a positive integer")
        if inter_node_gbps is not None and not 0 < inter_node_gbps <= 1e6:
            raise SpecError(f"--inter-node-gbps {inter_node_gbps:g}: must be a bandwidth in Gb/s above 0")
        if host_ram_bytes is not None and host_ram_bytes < 1:
            raise SpecError(f"--host-ram {host_ram_bytes}: must be a size, e.g. 256GiB")
        self.hw = get_hardware(gpu)
        self.node = node_of(self.hw)
        self.topo = topology(self.hw, self.node, gpus_per_node, nodes, inter_node_gbps, host_ram_bytes)
        self.overheads = overheads
        self.calibrated = overheads.calibrated
        self.margin = margin
        self.mfu = mfu
        self.usable_bytes = int(self.hw.usable_bytes * (1 - margin))
        self.host_ram_usable = int(self.topo.host_ram_bytes * (1 - HOST_RAM_FREE))
        self.max_gpus = min(max_gpus, nodes * self.topo.gpus_per_node) if nodes else max_gpus
        if not self.topo.net_bw_per_gpu:  # nodes that are not joined (a Jetson module): one node at most
            self.max_gpus = min(self.max_gpus, self.topo.gpus_per_node)
        self.shape = get_shape(spec.model)
        self.spec = validate(spec, self.shape)  # fail on bad flags before any search
        self.user_spec = spec
        # the workload without the user's parallelism: the search's starting point
        self.base = spec.replace(gpus=1, tp=1, pp=1, cp=1, ep=1, zero=0, layer_split=False, offload="none",
                                 sequence_parallel=False)
        self.train = self.spec.mode == "train"
        self._cache = {}
        self._options = {}
        self._static = {}
        self._est = {}
        self._state_min = None
        self._offload_hope = {}
        self._ranked = {}

    # ------------------------------------------------------------------ memory

    def predict(self, spec):
        """Per-GPU prediction with this GPU's overheads (cached)."""
        if spec not in self._cache:
            self._cache[spec] = predict(spec, self.overheads)
        return self._cache[spec]

    def lever_sets(self, ckpts=None, micro=True):
        """(ckpt, micro_batch) pairs to try, the workload's own first: checkpointing where it was not asked for
        (none, selective, full), and micro-batch 1 where --batch > 1."""
        if not self.train:
            return [("", 0)]
        if self.spec.grad_ckpt:
            ck = [""]  # the workload's own checkpointing stays
        else:
            ck = list(ckpts or CKPT_LEVERS)
        mbs = [0] + ([1] if micro else [])
        return [(c, m) for c in ck for m in mbs]

    def _lever_ok(self, s):
        """Selective checkpointing is torchtitan's: full fine-tuning, no offload, no bitsandbytes base."""
        if s.ckpt != "selective":
            return True
        return self.spec.method == "full" and s.offload == "none" and not (s.zero == 1 and s.tp == s.pp == 1)

    def evaluate(self, strategy, spec=None):
        """Option for one plan, or None when it is not valid for this model."""
        key = (strategy, spec)
        if key in self._options:
            return self._options[key]
        opt = None
        if self._lever_ok(strategy):
            try:
                p = self.predict(strategy.apply(spec or self.base))
            except SpecError:
                p = None
            if p is not None:
                gpu_fits = p.peak_device_bytes <= self.usable_bytes
                host = self.host_bytes_per_node(strategy, p.spec) if self.train else 0
                host_ok = not (self.topo.host_ram_bytes and host > self.host_ram_usable)
                step = self.step(strategy, p.spec) if self.train else None
                opt = Option(strategy, p.peak_device_bytes, p.peak_phase, gpu_fits and host_ok, gpu_fits, host, step,
                             framework(strategy, p.spec), p.spec)
        self._options[key] = opt
        return opt

    def host_bytes_per_node(self, strategy, spec):
        """Host memory the offload pins on one node: every GPU's shards of what lives on the CPU."""
        if strategy.offload == "none" or strategy.nvme:
            return 0
        st = workload_static(spec)
        shard = spec.shard_gpus or spec.gpus // (spec.tp * spec.pp)
        per_gpu = st.opt_state + st.master + st.grads
        if strategy.offload == "params":
            per_gpu += st.w_layers + st.w_embed + st.w_head + st.w_other
        per_gpu //= max(1, shard)
        return per_gpu * min(self.topo.gpus_per_node, spec.gpus)

    def flops_per_token(self, spec):
        """Training FLOPs per token of a validated spec (checkpointing's recompute included)."""
        frac = (self.shape.n_layers // spec.ckpt_every) / self.shape.n_layers if spec.grad_ckpt else 0.0
        return training_flops_per_token(self.shape, spec.seq, spec.method, spec.trainable_layers, spec.grad_ckpt,
                                        self.trainable_params(spec), recompute_fraction=frac or 1.0)

    def step(self, strategy, spec):
        """Time per optimizer step of a validated spec run as `strategy`."""
        key = spec.replace(batch=1, grad_ckpt=False, ckpt_every=1, grad_accum=1)
        if key not in self._static:
            self._static[key] = workload_static(key)
        peak, _ = self.matmul_peak(spec)
        t = step_time(spec, self._static[key], self.topo, self.flops_per_token(spec), peak * self.mfu)
        if strategy.nvme:
            extra = nvme_seconds(spec, self._static[key], self.topo)
            t = replace(t, seconds=t.seconds + extra, exposed={**t.exposed, "NVMe reads and writes": extra},
                        binds="NVMe reads and writes" if extra > 0.05 * t.seconds else t.binds)
        return t

    def fit(self):
        """Does the workload, as given (its own --gpus/--tp/--zero …), fit? Margin = usable − per-GPU peak."""
        p = self.predict(self.user_spec)
        return {"strategy": strategy_of(p.spec).label(p.spec.method), "gpus": p.spec.gpus,
                "per_gpu_bytes": p.peak_device_bytes, "peak_phase": p.peak_phase, "usable_bytes": self.usable_bytes,
                "margin_bytes": self.usable_bytes - p.peak_device_bytes,
                "fits": p.peak_device_bytes <= self.usable_bytes, "binds": "memory"}

    # ------------------------------------------------------------------ the search

    def counts(self):
        """GPU counts the search walks: every count up to one node, then whole nodes."""
        gpn, cap = self.topo.gpus_per_node, self.max_gpus
        small = list(range(1, min(gpn, cap) + 1))
        return small, gpn

    def structures(self, n, offload=True):
        """Strategies without levers on n GPUs; offload to NVMe too where the node's host RAM is known (DeepSpeed
        ZeRO-Infinity: for when the CPU's RAM does not hold what is offloaded)."""
        out = candidates(self.shape, self.base, n, self.topo.gpus_per_node)
        if not offload:
            return [s for s in out if s.offload == "none"]
        if self.topo.host_ram_bytes:
            out += [replace(s, nvme=True) for s in out if s.offload != "none"]
        return out

    def _with_levers(self, s, levers):
        nat = s.natural_batch(self.base) if s.gpus > 1 else self.base.batch
        return [replace(s, ckpt=c, micro_batch=m) for c, m in levers if not (m and m >= nat)]

    def _lightest(self, structs, levers):
        """The plans to try first when only fitting matters: most sharding and offload first, the lightest levers."""
        def key(s):
            return (s.offload != "params", s.offload != "optimizer", s.nvme, -s.zero, -s.tp * s.pp * s.cp, -s.ep)
        return [w[-1] for w in (self._with_levers(s, levers) for s in sorted(structs, key=key)) if w]

    def _offload_may_fit(self, s, levers):
        """Whether an offloading plan like `s` fits on the most GPUs the search allows: its per-GPU memory (the
        layers it gathers, the activations) and host RAM per node only fall as GPUs are added, so if it misses
        there it misses on every count."""
        key = (s.zero, s.offload, s.nvme, tuple(levers))
        if key not in self._offload_hope:
            n = self.max_gpus if self.max_gpus > 1 else 2
            big = self._with_levers(replace(s, gpus=n), levers)
            o = self.evaluate(big[-1]) if big else None
            self._offload_hope[key] = o is None or o.fits
        return self._offload_hope[key]

    def state_bytes_min(self):
        """A lower bound on the model state (weights, gradients, optimizer state) all GPUs together hold without
        offload — one copy of it, at the precision that stores the least — so n GPUs need at least this / n each."""
        if self._state_min is None:
            low = []
            for strategy in (Strategy(), Strategy(gpus=2, zero=3), Strategy(gpus=2, zero=1)):
                try:
                    st = workload_static(validate(strategy.apply(self.base), self.shape))
                except SpecError:
                    continue
                low.append(st.w_layers + st.w_embed + st.w_head + st.w_other + st.grads + st.opt_state + st.master
                           - st.opt_steps)
            self._state_min = min(low) if low else 0
        return self._state_min

    def feasible(self, n, levers=None, offload=True):
        """A plan that fits on n GPUs (the lightest levers), or None."""
        levers = self.lever_sets() if levers is None else levers
        structs = self.structures(n, offload)
        if self.train:
            if self.state_bytes_min() / n > self.usable_bytes:
                structs = [s for s in structs if s.offload != "none"]  # one copy of the state does not fit on n GPUs
            structs = [s for s in structs if s.offload == "none" or self._offload_may_fit(s, levers)]
            # of one layout the most sharding holds the least: ZeRO-3 before 0-2, the widest expert split
            most = {}
            for s in structs:
                k = (s.tp, s.pp, s.cp, s.shard, s.offload, s.nvme)
                if k not in most or (s.zero, s.ep) > (most[k].zero, most[k].ep):
                    most[k] = s
            structs = list(most.values())
        for s in self._lightest(structs, levers):
            o = self.evaluate(s)
            if o is not None and o.fits:
                return o
        return None

    def _grid_search(self, ok, start=1):
        """The smallest count ≥ start on the grid (1 … one node, then whole nodes) where ok(n) holds, or None.
        Whole nodes gallop, then bisect: more nodes never hold more per GPU."""
        small, gpn = self.counts()
        for n in small:
            if n >= start and ok(n):
                return n
        k_min = max(2, -(-start // gpn))  # the first whole-node count past one node and ≥ start
        if gpn >= self.max_gpus or k_min * gpn > self.max_gpus:
            return None
        if ok(k_min * gpn):
            return k_min * gpn
        lo, k = k_min, 2 * k_min
        while True:
            if k * gpn > self.max_gpus:
                k = self.max_gpus // gpn
                if k <= lo or not ok(k * gpn):
                    return None
                break
            if ok(k * gpn):
                break
            lo, k = k, 2 * k
        while k - lo > 1:
            mid = (lo + k) // 2
            if ok(mid * gpn):
                k = mid
            else:
                lo = mid
        return k * gpn

    def ranked_at(self, n, levers=None, offload=True):
        """Every plan on exactly n GPUs, the fastest fitting levers per strategy: (fitting, best misses), fastest first.

        Levers are tried in order of the step time they cost (estimated without predicting memory), so each
        strategy needs a prediction only until one fits."""
        levers = self.lever_sets() if levers is None else levers
        key = (n, tuple(levers), offload)
        if key in self._ranked:
            return self._ranked[key]
        fitting, misses = [], []
        for s in self.structures(n, offload):
            o = self._best_levers(s, levers)
            if o is not None:
                (fitting if o.fits else misses).append(o)
        # NVMe only where the CPU's RAM does not hold the offloaded state
        bare = lambda s: replace(s, nvme=True, ckpt="", micro_batch=0)  # noqa: E731
        cpu_ok = {bare(o.strategy) for o in fitting if o.strategy.offload != "none" and not o.strategy.nvme}
        fitting = [o for o in fitting if not (o.strategy.nvme and bare(o.strategy) in cpu_ok)]
        if self.train:
            fitting.sort(key=self._speed_rank)
        else:
            fitting.sort(key=self._memory_rank)
        misses.sort(key=lambda o: o.per_gpu_bytes)
        self._ranked[key] = fitting, misses
        return fitting, misses

    def _best_levers(self, s, levers):
        """The fastest fitting Option of strategy `s` over the lever sets, else its lightest miss (None: invalid)."""
        plans = [x for x in self._with_levers(s, levers) if self._lever_ok(x)]
        if not plans:
            return None
        lightest = self.evaluate(plans[-1])  # the levers only lower memory: if this misses, they all do
        if lightest is None or not lightest.fits:
            return lightest
        if self.train:
            plans.sort(key=self._est_seconds)
        for x in plans:
            o = self.evaluate(x)
            if o is not None and o.fits:
                return o
        return lightest

    def _est_seconds(self, s):
        """Step time of a plan without predicting its memory (the levers change only time's FLOPs and micro-batches)."""
        if s not in self._est:
            try:
                spec = validate(s.apply(self.base), self.shape)
                self._est[s] = self.step(s, spec).seconds
            except SpecError:
                self._est[s] = float("inf")
        return self._est[s]

    @staticmethod
    def _speed_rank(o):
        # the fastest; within 0.5 % of each other, the one with fewer levers and less machinery
        s = o.strategy
        tier = round(math.log(o.step.seconds) / math.log(1.005)) if o.step.seconds > 0 else 0
        levers = (s.offload != "none") + s.nvme + (s.ckpt in ("full", "selective")) + bool(s.micro_batch)
        return (tier, levers, (s.tp > 1) + (s.pp > 1) + (s.cp > 1) + (s.ep > 1), s.zero, o.per_gpu_bytes)

    @staticmethod
    def _memory_rank(o):
        # inference: the GPUs are there for memory, so the most headroom is the best answer
        s = o.strategy
        return (s.offload != "none", o.per_gpu_bytes, s.tp * s.pp)

    def options_at(self, n, spec=None):
        """Every valid strategy on exactly n GPUs with the lightest levers, evaluated (what 'also tried' lists)."""
        if spec is not None:
            return [o for o in (self.evaluate(s, spec) for s in candidates(self.shape, spec, n, self.topo.gpus_per_node))
                    if o]
        levers = self.lever_sets()
        return [o for o in (self.evaluate(s) for s in self._lightest(self.structures(n), levers)) if o]

    def fewest_gpus(self, levers=None, offload=True, start=1):
        """(chosen Option, the other plans on that count) for the fewest GPUs (≥ start) where a plan fits, or
        (None, [])."""
        n = self._grid_search(lambda k: self.feasible(k, levers, offload) is not None, start)
        if n is None:
            return None, []
        fitting, misses = self.ranked_at(n, levers, offload)
        if not fitting:  # the lightest plan fits, the ranked search tried it too
            fitting = [self.feasible(n, levers, offload)]
        return fitting[0], fitting + misses

    def best_at(self, n, levers=None):
        """The fastest plan that fits on exactly n GPUs, or None."""
        fitting, _ = self.ranked_at(n, levers)
        return fitting[0] if fitting else None

    def at_least(self, n_min, seconds_ok=None, likes=()):
        """The fastest fitting plan on the fewest grid counts ≥ n_min, or None; with `seconds_ok(option)`, the first
        count where a plan satisfies it (a deadline). GPUs added for speed are searched with the plain data-parallel
        strategies (hybrid sharding across nodes) and the layouts in `likes` (the fewest plan, the fewest without
        offload) grown in their data-parallel dimension; the count found gets the fastest plan of all."""
        levers = self.lever_sets()
        _, gpn = self.counts()
        likes = [x for x in likes if x is not None]

        def quick(n):
            family = [Strategy(gpus=n, zero=z) for z in ((0, 1, 2, 3) if n > 1 else (0,))]
            if n > gpn > 1 and n % gpn == 0:
                family += [Strategy(gpus=n, zero=z, shard=gpn) for z in (2, 3)]
            for x in likes:
                if n % (x.tp * x.pp * x.cp) == 0 and n > 1 and not (x.shard and n % x.shard):
                    family.append(replace(x, gpus=n, ckpt="", micro_batch=0))
            opts = [o for o in (self._best_levers(s, levers) for s in family) if o is not None and o.fits]
            return min(opts, key=self._speed_rank) if opts else None

        def ok(n):
            if n < n_min:
                return False
            b = quick(n)
            return b is not None and (seconds_ok is None or seconds_ok(b))
        n = self._grid_search(ok)
        if n is None:
            return None
        best = self.best_at(n)
        if best is not None and seconds_ok is not None and best.strategy not in likes:
            # the fastest plan there may be a layout the family lacked: grown or shrunk, it may finish on fewer
            likes.append(replace(best.strategy, ckpt="", micro_batch=0))
            fewer = self._grid_search(lambda k: k < n and ok(k), n_min)
            if fewer is not None:
                n, best = fewer, self.best_at(fewer)
        return best if best is not None and (seconds_ok is None or seconds_ok(best)) else quick(n)

    # ------------------------------------------------------------------ levers and why plans lost

    def lever_report(self, chosen):
        """For each lever the fewest plan pulls: the fewest GPUs without it ('fits with --grad-ckpt on 2 GPUs;
        without it, 4'), and the plan there."""
        s, out = chosen.strategy, []
        n = s.gpus
        if s.ckpt in ("full", "selective"):
            without = self.fewest_gpus(levers=self.lever_sets(("none",)), start=n)[0]
            out.append({"lever": "gradient checkpointing", "flag": "--grad-ckpt", "gpus": n,
                        "gpus_without": without.strategy.gpus if without else None, "option": without})
        if s.offload != "none":
            without = self.fewest_gpus(offload=False, start=n)[0]
            out.append({"lever": "offload", "flag": f"--offload {s.offload}", "gpus": n,
                        "gpus_without": without.strategy.gpus if without else None, "option": without})
        if s.micro_batch and s.micro_batch < s.natural_batch(self.spec):
            without = self.fewest_gpus(levers=self.lever_sets(micro=False), start=n)[0]
            out.append({"lever": "micro-batch 1 with gradient accumulation",
                        "flag": f"--batch 1 --grad-accum {self.spec.batch * self.spec.grad_accum}", "gpus": n,
                        "gpus_without": without.strategy.gpus if without else None, "option": without})
        return out

    def why_lost(self, o, winner):
        """One line: why an option lost to the winner."""
        if not o.gpu_fits:
            return f"does not fit: {o.per_gpu_bytes / 2**30:.2f} GiB per GPU > {self.usable_bytes / 2**30:.2f} GiB usable"
        if not o.fits:
            return (f"host RAM {o.host_bytes_per_node / 2**30:,.0f} GiB per node > {self.host_ram_usable / 2**30:,.0f} "
                    f"GiB usable of {self.topo.host_ram_bytes / 2**30:,.0f}")
        if o.step and winner.step:
            slower = o.step.seconds / winner.step.seconds - 1
            if abs(slower) < 0.005:
                more = o.strategy.offload != "none" or o.strategy.ckpt != winner.strategy.ckpt
                return "as fast, " + ("but pulls more levers" if more else "with more machinery")
            cause = _cause(o.step)
            return f"{slower:+.0%} per step" + (f" ({cause})" if cause else "")
        return f"{o.per_gpu_bytes / 2**30:.2f} GiB per GPU"

    # ------------------------------------------------------------------ limits

    def _largest(self, fits_at, lo, cap):
        """Largest v in [lo, cap] with fits_at(v), fits_at monotone; lo − 1 when even lo does not fit."""
        if lo > cap or not fits_at(lo):
            return lo - 1
        good = lo
        step = max(1, lo)
        while good < cap:  # gallop up, then bisect
            nxt = min(cap, good + step)
            if not fits_at(nxt):
                bad = nxt
                break
            good, step = nxt, step * 2
        else:
            return good
        while bad - good > 1:
            mid = (good + bad) // 2
            if fits_at(mid):
                good = mid
            else:
                bad = mid
        return good

    def _fits(self, spec):
        try:
            return self.predict(spec).peak_device_bytes <= self.usable_bytes
        except SpecError:
            return False

    def largest_batch(self, spec):
        """Most concurrent sequences (inference) or largest micro-batch (training) that fit with this plan."""
        b = self._largest(lambda v: self._fits(spec.replace(batch=v)), 1, BATCH_CAP)
        return {"value": b, "binds": "memory" if b < BATCH_CAP else f"search cap {BATCH_CAP}"}

    def longest_context(self, spec):
        """Longest prompt (+ the --gen tokens) or training sequence that fits with this plan."""
        gen = spec.gen if spec.mode == "inference" else 0
        window = self.shape.max_positions
        cap = (window - gen) if window else SEQ_CAP
        cp = spec.cp
        fits = (lambda v: self._fits(spec.replace(seq=v * cp))) if cp > 1 else (lambda v: self._fits(spec.replace(seq=v)))
        s = self._largest(fits, 1, cap // cp) * cp
        if s >= cap - cp + 1:
            binds = f"the model's context window ({window:,} positions)" if window else f"search cap {SEQ_CAP:,}"
        else:
            binds = "memory"
        return {"seq": s, "context": s + gen if s > 0 else 0, "binds": binds}

    # ------------------------------------------------------------------ time

    def matmul_peak(self, spec):
        """Peak dense FLOP/s of one GPU for this workload's matmuls, and the tensor path."""
        return self.hw.matmul_flops(spec.dtype, spec.compute_dtype)

    def inference_speed(self, spec):
        """Prefill time (lower bound, from FLOPs) and decode tokens/s (upper bound, from bandwidth or FLOPs)."""
        s, shape, hw = self.predict(spec).spec, self.shape, self.hw
        peak, path = self.matmul_peak(s)
        tp = s.tp  # TP GPUs work at once; layer-split and pipeline stages take turns on one sequence batch
        B, S, N = s.batch, s.seq, s.gen
        pf = prefill_flops(shape, B, S)
        prefill_s = pf / (peak * tp)
        ctx = S + N / 2 if N else S  # mean context over the generation
        st = weight_storage(shape, s.dtype, s.compute_dtype, s.double_quant, s.group_size)
        w_read = weight_bytes_read_per_step(shape, st.weight_bytes + st.quant_state_bytes, B) / tp
        compressed = shape.is_mla and s.mla_cache == "compressed"
        kv_div = 1 if compressed or tp == 1 else min(tp, shape.n_kv_heads)
        kv_read = kv_bytes_read_per_step(shape, B, ctx, DTYPE_BYTES[s.kv_dtype], s.mla_cache) / kv_div
        bw_s = (w_read + kv_read) / hw.bandwidth_bytes_per_s
        fl_s = B * decode_flops_per_token(shape, ctx) / (peak * tp)
        step = max(bw_s, fl_s)
        out = {
            "matmul_path": path, "peak_flops_per_gpu": peak,
            "prefill_flops": pf, "prefill_seconds_min": prefill_s, "prefill_binds": "compute",
            "decode_context_mean": ctx, "decode_bytes_per_step_per_gpu": int(w_read + kv_read),
            "decode_step_seconds_min": step,
            "decode_tokens_per_s_per_sequence_max": 1 / step,
            "decode_tokens_per_s_total_max": B / step,
            "decode_binds": "bandwidth" if bw_s >= fl_s else "compute",
        }
        if N:
            out["request_seconds_min"] = prefill_s + N * step
        return out

    def trainable_params(self, spec):
        """Adapter parameters for LoRA/QLoRA (their weight gradients), 0 otherwise."""
        if spec.method not in ("lora", "qlora"):
            return 0
        return lora_params(resolve_targets(self.shape, spec.lora_targets), spec.lora_rank)

    def training_time(self, spec, tokens, mfu, deadline_s=None):
        """FLOPs for `tokens` trained tokens, time on the plan's GPUs at `mfu` (compute only), and the GPUs
        compute alone needs for a deadline."""
        s = self.predict(spec).spec
        peak, path = self.matmul_peak(s)
        per_token = self.flops_per_token(s)
        total = per_token * tokens
        rate = peak * mfu
        out = {"tokens": tokens, "flops_per_token": per_token, "flops": total, "matmul_path": path,
               "peak_flops_per_gpu": peak, "mfu": mfu, "sustained_flops_per_gpu": rate,
               "seconds_on_plan": total / (rate * s.gpus), "gpus_on_plan": s.gpus}
        if deadline_s:
            out["deadline_seconds"] = deadline_s
            out["gpus_for_compute"] = gpus_for_deadline(total, deadline_s, rate)
        return out

    @staticmethod
    def seconds_for(option, tokens):
        """Wall time to train `tokens` tokens on a plan: steps × step time (communication included)."""
        per_step = option.step.tokens_per_gpu * option.strategy.gpus
        return tokens / per_step * option.step.seconds

    # ------------------------------------------------------------------ the whole answer

    def answer(self, tokens=None, deadline_s=None, mfu=None, tokens_per_byte=None, data_bytes=None,
               fastest_on=None):
        """Every question at once, as a JSON-ready dict (bytes as integers)."""
        if mfu is not None and mfu != self.mfu:
            self.mfu = mfu
            self._options.clear()
            self._ranked.clear()
            self._est.clear()
        mfu = self.mfu
        s = self.spec
        method = s.method if self.train else None
        fit = self.fit()
        chosen, opts = self.fewest_gpus()
        if not fit["fits"]:
            # what the user's own plan can hold instead: the longest sequence at their batch
            fit["longest_context"] = self.longest_context(self.user_spec)
        t = self.topo
        ans = {
            "model": model_label(self.shape.name), "mode": s.mode, "method": method,
            "gpu": {"name": self.hw.name, "memory_bytes": self.hw.memory_bytes, "memory_gb_base": self.hw.memory_gb_base,
                    "reported_total_bytes": self.hw.reported_total_bytes or None, "usable_bytes": self.usable_bytes,
                    "bandwidth_bytes_per_s": self.hw.bandwidth_bytes_per_s},
            "topology": {"gpus_per_node": t.gpus_per_node, "node": self.node.name, "max_nodes": t.max_nodes or None,
                         "fast_link": t.fast_name or None, "fast_domain": t.fast_domain,
                         "fast_bytes_per_s": t.fast_bw, "pcie": t.pcie_name, "pcie_bytes_per_s": t.pcie_bw,
                         "network": t.net_name or None, "network_bytes_per_s_per_gpu": t.net_bw_per_gpu,
                         "host_ram_bytes_per_node": t.host_ram_bytes or None, "basis": list(t.basis)},
            "safety_margin": self.margin, "calibrated": self.calibrated, "overheads_source": self.overheads.source,
            "max_gpus": self.max_gpus, "fit": fit,
            "fewest": None, "candidates": [o.to_dict(method) for o in opts],
            "gpus_needed": None, "strategy": None, "strategy_spec": None, "per_gpu_bytes": None,
            "largest_batch": None, "longest_context": None, "time": None, "binds": "memory",
            "levers": [], "fastest": None, "cheapest": None,
            "assumptions": self.assumptions(mfu, tokens_per_byte, data_bytes is not None),
        }
        if chosen is None:
            ans["fewest"] = {"gpus": None, "note": f"does not fit on up to {self.max_gpus:,} × {self.hw.name} "
                                                   "with any strategy tried"}
            return ans
        ans["fewest"] = self._plan_dict(chosen, method)
        ans["fewest"]["runner_ups"] = self._runner_ups(chosen, opts, method)
        final = chosen
        plan_spec = self.user_spec if fit["fits"] else chosen.strategy.apply(self.base)
        if self.train:
            levers = self.lever_report(chosen)
            ans["levers"] = [{k: v for k, v in x.items() if k != "option"} for x in levers]
            n_fast = fastest_on or self._default_fastest_count(chosen, levers)
            fitting, misses = self.ranked_at(n_fast)
            if fitting:
                ans["fastest"] = self._plan_dict(fitting[0], method)
                ans["fastest"]["runner_ups"] = self._runner_ups(fitting[0], fitting + misses, method)
            else:
                ans["fastest"] = {"gpus": n_fast, "note": f"nothing fits on {n_fast} × {self.hw.name}"}
            cheap = self.cheapest(chosen, [x["option"] for x in levers] + fitting[:1])
            ans["cheapest"] = self._plan_dict(cheap, method)
            ans["cheapest"]["gpu_seconds_per_million_tokens"] = cheap.seconds_per_token * 1e6
        # limits and speed on the user's own plan when it fits, else on the fewest-GPU plan
        limits = self.predict(plan_spec).spec
        ans["limits_on"] = (strategy_of(limits).label(limits.method) if fit["fits"] else
                            chosen.strategy.label(method) + "".join(f" + {x}" for x in chosen.strategy.levers(self.spec)))
        ans["largest_batch"] = self.largest_batch(plan_spec)
        ans["longest_context"] = self.longest_context(plan_spec)
        if s.mode == "inference":
            tm = self.inference_speed(plan_spec)
            tm["on"] = ans["limits_on"]
            ans["time"] = tm
        elif tokens:
            tm = self.training_time(chosen.strategy.apply(self.base), tokens, mfu, deadline_s)
            if data_bytes is not None:
                tm["data_bytes"], tm["tokens_per_byte"] = data_bytes, tokens_per_byte
            tm.pop("seconds_on_plan")
            tm.pop("gpus_on_plan")
            tm["seconds_on_fewest"] = self.seconds_for(chosen, tokens)
            if deadline_s:
                need = max(chosen.strategy.gpus, tm["gpus_for_compute"])
                if self.seconds_for(chosen, tokens) <= deadline_s:
                    best = chosen
                else:
                    no_offload = self.fewest_gpus(offload=False, start=chosen.strategy.gpus)[0]
                    best = self.at_least(need, lambda o: self.seconds_for(o, tokens) <= deadline_s,
                                         (chosen.strategy, no_offload and no_offload.strategy))
                tm["gpus_for_deadline"] = best.strategy.gpus if best else None
                if best is not None:
                    final = best
                    tm["seconds_on_deadline_plan"] = self.seconds_for(best, tokens)
                    ans["binds"] = "compute" if best.strategy.gpus > chosen.strategy.gpus else "memory"
                else:
                    final = None
                    ans["binds"] = "compute"
                    tm["note"] = f"no plan finishes within the deadline on up to {self.max_gpus:,} × {self.hw.name}"
            ans["time"] = tm
        if final is not None:
            ans["gpus_needed"] = final.strategy.gpus
            ans["strategy"] = final.strategy.label(method)
            ans["strategy_spec"] = final.strategy.to_dict(method)
            ans["per_gpu_bytes"] = final.per_gpu_bytes
            ans["framework"] = final.framework
            ans["plan_levers"] = final.strategy.levers(self.spec)
        return ans

    def _default_fastest_count(self, fewest, levers):
        """'Fastest on N': the user's --gpus when given; else whole nodes from the fewest count — or, when the fewest
        plan offloads, from the fewest count that needs no offload (offload trades GPUs for speed)."""
        n_min = fewest.strategy.gpus
        if self.user_spec.gpus > 1:
            return max(self.user_spec.gpus, n_min)
        no_offload = [x["gpus_without"] for x in levers if x["lever"] == "offload" and x["gpus_without"]]
        n = max([n_min] + no_offload)
        gpn = self.topo.gpus_per_node
        return min(self.max_gpus, max(gpn, -(-n // gpn) * gpn))

    def cheapest(self, fewest, others):
        """The plan with the fewest GPU-seconds per token. Every GPU trains the same tokens per step, so more GPUs
        cost less per token only where they drop a lever that slows each GPU (offload, checkpointing): the
        candidates are the fewest plan, the best plan on the counts where each lever drops, and the fastest."""
        best = fewest
        for o in others:
            if o is None:
                continue
            b = self.best_at(o.strategy.gpus) or o
            if b.seconds_per_token < best.seconds_per_token * 0.999:
                best = b
        return best

    def _plan_dict(self, o, method):
        d = {"gpus": o.strategy.gpus, "strategy": o.strategy.label(method), "per_gpu_bytes": o.per_gpu_bytes,
             "peak_phase": o.peak_phase, "binds": "memory", "framework": o.framework,
             "levers": o.strategy.levers(self.spec), "strategy_spec": o.strategy.to_dict(method)}
        if o.host_bytes_per_node:
            d["host_bytes_per_node"] = o.host_bytes_per_node
            d["nodes"] = self.topo.nodes_for(o.strategy.gpus)
        if o.step:
            d["step"] = o.step.to_dict()
            d["tokens_per_second"] = o.step.tokens_per_gpu * o.strategy.gpus / o.step.seconds
        return d

    def _runner_ups(self, winner, opts, method, k=3):
        """The next plans and the lightest that did not fit, each with why it lost."""
        fit = [o for o in opts if o.fits and o is not winner and o.strategy != winner.strategy]
        miss = [o for o in opts if not o.fits]
        pick = fit[:k] + miss[:1]
        return [{"strategy": o.strategy.label(method), "gpus": o.strategy.gpus, "per_gpu_bytes": o.per_gpu_bytes,
                 "fits": o.fits, "framework": o.framework, "levers": o.strategy.levers(self.spec),
                 "seconds_per_step": o.step.seconds if o.step else None, "why": self.why_lost(o, winner)}
                for o in pick]

    def assumptions(self, mfu, tokens_per_byte, from_bytes):
        """What every number rests on, printed with the answer."""
        a = [
            f"memory: formulas.predict per GPU (the GPU that needs the most); device overheads: "
            f"{self.overheads.source}",
            f"usable memory: {'reported total' if self.hw.reported_total_bytes else 'nominal capacity'} of the "
            f"{self.hw.name} less a {self.margin:.0%} safety margin",
            *[f"topology: {b}" for b in self.topo.basis],
        ]
        if self.spec.mode == "inference":
            a += ["strategies per GPU count: 1 GPU; layer split and TP = n inside a node; TP inside a node × pipeline "
                  "stages; never TP on bitsandbytes weights; most headroom wins",
                  "times use dense peak tensor throughput and peak bandwidth from formulas/catalog/hardware.json; "
                  "communication between GPUs is not counted",
                  "prefill time ≥ 2·N·tokens + causal attention FLOPs at peak (a lower bound); decode tokens/s ≤ "
                  "bandwidth / bytes read per step (weights, MoE experts actually routed to, whole KV cache), or the "
                  "FLOP bound if lower (upper bounds; real decode reaches ~70-90 % of peak bandwidth)"]
            return a
        a += [
            "strategies per GPU count: DDP, ZeRO-1/2/3, + optimizer or parameter offload (NVMe where the host RAM "
            "does not hold it), FSDP-QLoRA, hybrid sharding (FSDP inside a node, replicas across nodes); TP (+SP) "
            "inside a node only and never on bitsandbytes weights (bitsandbytes bases: data parallelism only), × DDP, "
            "FSDP or the distributed optimizer; pipeline stages; context parallelism from "
            f"{CP_MIN_SEQ:,} tokens; expert parallelism for MoE; beyond one node, whole nodes",
            "levers tried where the workload does not set them: gradient checkpointing (none, selective every 2nd "
            "layer where torchtitan runs the plan, full), micro-batch 1 with gradient accumulation; the fastest "
            "fitting plan wins",
            f"time per step: FLOPs at dense peak × MFU {mfu:.0%} (6·N full, 4·N LoRA/QLoRA, + the recomputed forward "
            "under checkpointing, + attention; Kaplan et al. 2020, Korthikanti et al. 2022); the 1F1B pipeline bubble; "
            "collectives by NCCL's ring volumes over the link's one-way peak, data-parallel ones overlapped with "
            "compute, tensor-parallel and expert all-to-alls not; offload copies over PCIe, the CPU optimizer step at "
            f"{CPU_ADAM_BYTES_PER_PARAM} bytes per parameter over host memory bandwidth",
            "global batch: every GPU trains micro-batch × grad-accum sequences per step (as Hugging Face's Trainer "
            "counts it); GPU-seconds per token rank the cheapest",
        ]
        if from_bytes:
            a.append(f"{tokens_per_byte:g} tokens per byte of text (about {1 / tokens_per_byte:g} bytes per "
                     "BPE token, typical of English; an assumption — a flag)")
        return a


def _cause(step):
    """What a step's time goes to beyond the compute, in words ('TP all-reduce 1.2 s')."""
    if step.binds == "compute":
        return ""
    if step.binds in step.exposed:
        return f"{step.binds} {_secs(step.exposed[step.binds])}"
    if step.binds == "pipeline bubble":
        return f"pipeline bubble {_secs(step.bubble)}"
    busy = step.links.get(step.binds, 0.0)
    return f"{step.binds} busy {_secs(busy)} vs compute {_secs(step.compute + step.bubble)}"


def _secs(s):
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.1f} s"


# ------------------------------------------------------------------ the seeds-style fine-tuning table

# The seed table's rows (../shared/seeds/003): R1 and its distills, the method, the GPU type each
# row used, and the GPU counts the seed gives per data size (bytes of text, decimal).
SEED_ROWS = (
    dict(model="deepseek-ai/DeepSeek-R1", method="lora", dtype="bf16", gpu="A100 80GB",
         seed_gpus={10**6: 16, 10**9: 64, 10**10: 128, 10**11: 192}),
    dict(model="deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", method="qlora", dtype="bf16", gpu="A10G",
         seed_gpus={10**6: 1, 10**9: 2, 10**10: 4, 10**11: 8}),
    dict(model="deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", method="qlora", dtype="bf16", gpu="A100 40GB",
         seed_gpus={10**6: 1, 10**9: 4, 10**10: 8, 10**11: 16}),
    dict(model="deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", method="lora", dtype="bf16", gpu="A100 80GB",
         seed_gpus={10**9: 4, 10**10: 8, 10**11: 32}),
    dict(model="deepseek-ai/DeepSeek-R1-Distill-Llama-8B", method="qlora", dtype="bf16", gpu="A10G",
         seed_gpus={10**6: 1, 10**9: 2, 10**10: 4, 10**11: 8}),
    dict(model="deepseek-ai/DeepSeek-R1-Distill-Llama-70B", method="lora", dtype="bf16", gpu="A100 80GB",
         seed_gpus={10**6: 8, 10**9: 32, 10**10: 64, 10**11: 128}),
)
SEED_DATA_BYTES = (10**3, 10**6, 10**9, 10**10, 10**11, 10**12)  # 1K … 1T bytes of text (decimal)


def finetune_table(rows, data_bytes, deadline_s, base_spec, gpu=None, tokens_per_byte=DEFAULT_TOKENS_PER_BYTE,
                   mfu=DEFAULT_MFU, margin=0.0, max_gpus=DEFAULT_MAX_GPUS, overheads_for=None, **topology_kw):
    """One entry per row × data size: GPUs needed to finish within the deadline.

    A row is a dict with model, method, dtype and optionally gpu (used when `gpu` is None) and
    seed_gpus (the seed's count per data size, copied into the output for comparison).
    `overheads_for(gpu name)` gives each GPU's device overheads (default: uncalibrated)."""
    out = []
    for r in rows:
        spec = base_spec.replace(model=r["model"], method=r["method"], dtype=r["dtype"], mode="train")
        name = gpu or r.get("gpu") or "A100 80GB"
        pl = Planner(spec, name, margin, max_gpus, overheads_for(name) if overheads_for else DEFAULT_OVERHEADS,
                     mfu=mfu, **topology_kw)
        chosen, _ = pl.fewest_gpus()
        no_offload = pl.fewest_gpus(offload=False, start=chosen.strategy.gpus)[0] if chosen else None
        likes = (chosen and chosen.strategy, no_offload and no_offload.strategy)
        for size in data_bytes:
            tokens = size * tokens_per_byte
            row = {"model": model_label(pl.shape.name), "method": r["method"], "dtype": pl.spec.dtype, "gpu": pl.hw.name,
                   "data_bytes": size, "tokens": tokens, "seed_gpus": (r.get("seed_gpus") or {}).get(size)}
            if chosen is None:
                row.update(gpus=None, strategy=f"no fit on ≤ {max_gpus}", per_gpu_bytes=None, seconds=None,
                           binds="memory", gpus_for_memory=None, gpus_for_compute=None, flops=None, framework=None)
                out.append(row)
                continue
            t = pl.training_time(chosen.strategy.apply(pl.base), tokens, mfu, deadline_s)
            need = max(chosen.strategy.gpus, t["gpus_for_compute"])
            if pl.seconds_for(chosen, tokens) <= deadline_s:
                best = chosen
            else:
                best = pl.at_least(need, lambda o: pl.seconds_for(o, tokens) <= deadline_s, likes)
            row.update(gpus_for_memory=chosen.strategy.gpus, gpus_for_compute=t["gpus_for_compute"], flops=t["flops"],
                       binds="compute" if best is not chosen else "memory")
            if best is None:
                row.update(gpus=None, strategy=f"not within the deadline on ≤ {pl.max_gpus:,}", per_gpu_bytes=None,
                           seconds=None, framework=None)
            else:
                row.update(gpus=best.strategy.gpus, strategy=best.strategy.label(pl.spec.method),
                           per_gpu_bytes=best.per_gpu_bytes, seconds=pl.seconds_for(best, tokens),
                           framework=best.framework)
            out.append(row)
    return out
