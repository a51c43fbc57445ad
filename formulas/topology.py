"""Topology and time per training step: the GPUs of a plan in nodes, the links between them, and what
each strategy sends over them.

A plan's ranks are laid out as Megatron-LM and torchtitan lay them out — tensor parallel innermost,
then context parallel, then data parallel, pipeline stages outermost (torchtitan b5bcd76
torchtitan/distributed/parallel_dims.py:239, mesh ["pp", "dp_replicate", "dp_shard", "cp", "tp"]) — so a
group of g ranks with stride s spans s·g consecutive ranks, and its slowest link is the NVLink domain's
when the span fits in one, the node's PCIe when it fits in a node, else the network between nodes,
whose bandwidth every GPU of a node shares.

Collectives move, per GPU, what NCCL's bus-bandwidth convention says (NVIDIA/nccl-tests
doc/PERFORMANCE.md): an all-reduce of V bytes over n ranks 2(n−1)/n · V, an all-gather or reduce-scatter
whose full result is V bytes (n−1)/n · V, an all-to-all (n−1)/n · V. Times are those bytes over the
link's peak one-way bandwidth: lower bounds, like the compute side's peak × MFU is an estimate.

The step is the spec's: a model replica of tp·pp·cp GPUs runs grad-accum micro-batches of `batch`
sequences, each GPU doing 1/(tp·pp·cp) of the replica's work (formulas.plan sizes them so every GPU
trains the workload's --batch × --grad-accum sequences per step). Compute runs at peak × MFU;
a pipeline adds its 1F1B bubble, (p − 1) / m of the ideal time for m micro-batches (Narayanan et al.
2021, *Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM*, §2.2.1). Data-
parallel collectives, ring-attention exchanges, pipeline sends and offload copies overlap with compute
(DDP buckets, FSDP prefetch, ring attention and pinned copies on side streams), so each link is busy
beside the compute and the busiest of them sets the pace; tensor-parallel all-reduces, expert all-to-alls
and the CPU optimizer step are on the critical path and add to it.
"""

from dataclasses import dataclass

from .dtypes import BNB_DTYPES

# When the catalog has no figure: assumptions, each printed with the plan that uses it.
ASSUMED_HOST_BANDWIDTH = 100 * 10**9  # bytes/s of a node's CPU memory (a few DDR5 channels) where not catalogued
ASSUMED_PCIE = ("PCIe 5.0 x16 (assumed)", 64 * 10**9)  # one way, for a GPU the catalog gives no PCIe figure
NVME_BYTES_PER_S = 7 * 10**9  # one PCIe 4.0 x4 NVMe drive per node, sequential (Samsung 990 PRO: 7,450 MB/s read)
CPU_ADAM_BYTES_PER_PARAM = 30  # a CPU AdamW step reads fp32 p, g, m, v (16 B), writes p, m, v (12 B) and a bf16 copy (2 B)


@dataclass(frozen=True)
class Topology:
    """The GPUs a plan may use, in nodes, and the one-way bandwidth of each link (bytes per second)."""

    gpu: str
    gpus_per_node: int
    max_nodes: int  # 0: as many as the search needs
    fast_name: str  # the NVLink / Infinity Fabric domain's link, "" where there is none
    fast_domain: int  # GPUs it joins (1: none)
    fast_bw: int
    pcie_name: str
    pcie_bw: int  # each GPU's host link, and between GPUs of a node outside the fast domain
    net_name: str  # between nodes, "" where nodes are not joined
    net_bw_per_gpu: int  # the node's network shared by its GPUs
    host_ram_bytes: int  # per node, 0: unknown (not checked)
    host_bw: int  # bytes/s of a node's CPU memory
    basis: tuple  # what each default rests on, for the answer's assumptions

    def link(self, span):
        """(name, one-way bytes/s) of the slowest link inside a group spanning `span` consecutive ranks."""
        if span <= 1:
            return "none", 0
        if span <= self.fast_domain:
            return self.fast_name, self.fast_bw
        if span <= self.gpus_per_node:
            return self.pcie_name, self.pcie_bw
        return self.net_name or "no network", self.net_bw_per_gpu

    def nodes_for(self, gpus):
        """Nodes `gpus` GPUs fill."""
        return -(-gpus // self.gpus_per_node)


def topology(hw, node, gpus_per_node=None, max_nodes=0, net_gbps=None, host_ram_bytes=None):
    """The topology of GPU type `hw` in its catalog node profile `node`, with the user's overrides."""
    gpn = gpus_per_node or node.gpus_per_node
    basis = []
    if gpus_per_node:
        basis.append(f"{gpn} GPUs per node (--gpus-per-node)")
    else:
        basis.append(f"{gpn} GPUs per node: {node.name} ({node.basis}; --gpus-per-node to change)")
    fast = next(((n, b // 2) for n, b in hw.interconnect if "pcie" not in n.lower()), None)
    bridged = fast is not None and "bridge" in fast[0].lower()
    domain = 1 if fast is None else (2 if bridged else max(1, min(node.nvlink_domain, gpn)))
    pcie = hw.link("pcie") or ASSUMED_PCIE
    if net_gbps is not None:
        net_name, net = f"{net_gbps:g} Gb/s per node (--inter-node-gbps)", int(net_gbps * 1e9 / 8)
    else:
        net_name, net = node.scale_out_name, node.scale_out_bytes_per_s // 2
        if net:
            basis.append(f"between nodes: {net_name}, {net / 1e9:g} GB/s each way per node ({node.name}; "
                         "--inter-node-gbps to change)")
    host_bw = node.host_memory_bandwidth_bytes_per_s or ASSUMED_HOST_BANDWIDTH
    if not node.host_memory_bandwidth_bytes_per_s:
        basis.append(f"host memory bandwidth {host_bw / 1e9:g} GB/s per node (assumed; for the CPU optimizer step)")
    ram = host_ram_bytes if host_ram_bytes is not None else node.host_memory_bytes
    return Topology(gpu=hw.name, gpus_per_node=gpn, max_nodes=max_nodes,
                    fast_name=fast[0] if fast else "", fast_domain=domain, fast_bw=fast[1] if fast else 0,
                    pcie_name=pcie[0], pcie_bw=pcie[1], net_name=net_name, net_bw_per_gpu=net // gpn if net else 0,
                    host_ram_bytes=ram, host_bw=host_bw, basis=tuple(basis))


# ------------------------------------------------------------------ collectives (NCCL bus-bandwidth convention)

def all_reduce_bytes(v, n):
    """Bytes each rank sends for an all-reduce of v bytes over n ranks (ring)."""
    return 2 * (n - 1) / n * v if n > 1 else 0


def all_gather_bytes(v, n):
    """Bytes each rank sends for an all-gather (or reduce-scatter) whose full tensor is v bytes."""
    return (n - 1) / n * v if n > 1 else 0


# ------------------------------------------------------------------ what a plan sends, per step

@dataclass(frozen=True)
class StepTime:
    """Seconds of one optimizer step on one GPU, by what takes them; `seconds` is the total."""

    seconds: float
    compute: float  # FLOPs at peak × MFU
    bubble: float  # pipeline fill and drain (1F1B)
    exposed: dict  # critical-path communication: {"TP all-reduce": s, "EP all-to-all": s, "CPU optimizer step": s, …}
    links: dict  # overlapped traffic per link: {link name: seconds busy}
    binds: str  # "compute", or the link or exposed term that adds the most
    tokens_per_gpu: int  # tokens one GPU trains on per step

    def to_dict(self):
        return {"seconds": self.seconds, "compute_seconds": self.compute, "bubble_seconds": self.bubble,
                "exposed_seconds": dict(self.exposed), "link_busy_seconds": dict(self.links), "binds": self.binds,
                "tokens_per_gpu": self.tokens_per_gpu}


def step_time(spec, st, topo, flops_per_token, flops_per_s):
    """Time of one optimizer step of validated training `spec` (FLOPs per token at `flops_per_s` sustained).

    `st` is `formulas.predict.workload_static(spec)`: the weight, gradient and trainable bytes."""
    shape = st.shape
    tp, pp, cp, ep = spec.tp, spec.pp, spec.cp, spec.ep
    dp = spec.gpus // (tp * pp * cp)
    shard = dp * cp  # what ZeRO / FSDP shards over (torchtitan: dp_shard × cp)
    b, S = spec.batch, spec.seq  # the replica's micro-batch
    m = spec.grad_accum  # micro-batches per replica per step
    tokens = b * S * m // (tp * pp * cp)  # per GPU per step (a replica's tokens, its work shared by tp·pp·cp GPUs)
    compute = flops_per_token * tokens / flops_per_s
    bubble = compute * (pp - 1) / m if pp > 1 else 0.0
    H, cb = shape.hidden, st.cb
    L_stage = -(-shape.n_layers // pp)
    recompute = (shape.n_layers // spec.ckpt_every) / shape.n_layers if spec.grad_ckpt else 0.0
    links, exposed = {}, {}

    def busy(span, nbytes, what=None):
        name, bw = topo.link(span)
        if nbytes <= 0:
            return
        if not bw:
            raise ValueError(f"no link for a group spanning {span} GPUs")
        if what:
            exposed[what] = exposed.get(what, 0.0) + nbytes / bw
        else:
            links[name] = links.get(name, 0.0) + nbytes / bw

    # this GPU's share of a layer's weights: linears / tp, routed experts / (tp · ep)
    dense_lin = st.tp_lin_frac - st.ep_frac
    layer_share = (1 - st.tp_lin_frac) + dense_lin / tp + st.ep_frac / (tp * ep)
    stage = min(1.0, L_stage / shape.n_layers)
    w_all = st.w_layers + st.w_embed + st.w_head + st.w_other
    w_local = st.w_layers * layer_share * stage + (st.w_embed + st.w_head) / (pp if pp > 1 else 1) + st.w_other
    g_local = st.grads * (w_local / w_all if w_all else 1)
    # tensor parallel: 2 all-reduces of the hidden state per layer forward, 2 backward, 2 more per recomputed
    # forward (sequence parallel: an all-gather and a reduce-scatter in place of each, the same bytes)
    if tp > 1:
        act = b * (S // cp) * H * cb
        busy(tp, m * L_stage * (4 + 2 * recompute) * all_reduce_bytes(act, tp), "TP all-reduce")
    # context parallel (ring attention): each layer passes its K and V chunk around the ring forward, and K, V
    # with their gradients backward
    if cp > 1:
        kv = 2 * b * (S // cp) * shape.n_kv_heads * shape.head_dim * cb
        busy(tp * cp, m * L_stage * 3 * (cp - 1) * kv)
    # expert parallel: a MoE layer's tokens to their experts' ranks and back, forward and backward
    if ep > 1 and shape.n_moe_layers:
        routed = b * (S // cp) * shape.experts_per_token * H * cb
        moe_stage = -(-shape.n_moe_layers // pp)
        busy(tp * cp * ep, m * moe_stage * 4 * all_gather_bytes(routed, ep), "EP all-to-all")
    # pipeline: each micro-batch's activation forward and its gradient backward cross a stage boundary
    if pp > 1:
        busy(tp * cp * dp * 2, m * 2 * b * (S // cp) * H * cb)
    # data parallel over dp × cp ranks; hybrid sharding shards over groups of shard_gpus and all-reduces the
    # sharded gradients across the groups
    fsdp_cpu = spec.offload == "params" and spec.zero >= 2
    if shard > 1:
        group = spec.shard_gpus if (spec.zero and spec.shard_gpus) else shard
        span = tp * group  # the group's ranks at stride tp (context-parallel ranks inside it)
        gathered = w_local * (cb / 4 if (spec.precision == "master" and spec.method == "full") else 1)
        if spec.zero == 3:  # FSDP: gather for the forward and again for the backward, reduce-scatter, every micro-batch
            busy(span, m * (2 * all_gather_bytes(gathered, group) + all_gather_bytes(g_local, group)))
        elif spec.zero == 2:  # gathered once, kept to the backward; gradients reduce-scattered per micro-batch
            busy(span, m * (all_gather_bytes(gathered, group) + all_gather_bytes(g_local, group)))
        else:  # DDP / ZeRO-1: one all-reduce (or reduce-scatter + all-gather) of the gradients per step
            busy(span, all_reduce_bytes(g_local, group))
        if group < shard:  # the replicas' all-reduce of each group's gradient shards, once per step
            busy(tp * cp * dp, all_reduce_bytes(g_local / group, shard // group))
    # offload: copies over each GPU's own PCIe link, and the optimizer step on the node's CPUs
    shard_div = (spec.shard_gpus or shard) if spec.zero else 1
    trainable_shard = st.n_trainable * (w_local / w_all if w_all else 1) / shard_div
    if fsdp_cpu:
        busy_pcie(links, topo, m * (2 * w_local / shard_div + g_local / shard_div))
    elif spec.offload == "optimizer":
        busy_pcie(links, topo, g_local / shard_div + trainable_shard * cb)
    if fsdp_cpu or spec.offload == "optimizer":
        on_node = min(topo.gpus_per_node, spec.gpus)
        exposed["CPU optimizer step"] = CPU_ADAM_BYTES_PER_PARAM * trainable_shard * on_node / topo.host_bw
    busiest = max(links.values(), default=0.0)
    total = max(compute + bubble, busiest) + sum(exposed.values())
    # what binds: whatever adds the most time beyond the compute (5 % of the step at least), else the compute
    adds = dict(exposed)
    if bubble:
        adds["pipeline bubble"] = bubble
    if busiest > compute + bubble:
        adds[max(links, key=links.get)] = busiest - compute - bubble
    binds = max(adds, key=adds.get) if adds and max(adds.values()) > 0.05 * total else "compute"
    return StepTime(seconds=total, compute=compute, bubble=bubble, exposed=exposed, links=links, binds=binds,
                    tokens_per_gpu=tokens)


def busy_pcie(links, topo, nbytes):
    """Host ↔ GPU copies, on each GPU's own PCIe link (the link a node without NVLink also runs its collectives on)."""
    links[topo.pcie_name] = links.get(topo.pcie_name, 0.0) + nbytes / topo.pcie_bw


def nvme_seconds(spec, st, topo):
    """Reading and writing the offloaded optimizer state and parameters from NVMe once per step (ZeRO-Infinity)."""
    on_node = min(topo.gpus_per_node, spec.gpus)
    shard = spec.shard_gpus or spec.gpus // (spec.tp * spec.pp)
    per_gpu = (st.opt_state + st.master + st.w_layers + st.w_embed + st.w_head) / max(1, shard)
    return 2 * per_gpu * on_node / NVME_BYTES_PER_S


def tp_allowed(dtype):
    """Tensor parallelism splits weight matrices along a dimension: not bitsandbytes 4/8-bit ones. A 4-bit
    weight is a flat packed buffer (bitsandbytes 0.50.2 bitsandbytes/nn/modules.py:497, `assert
    module.weight.shape[1] == 1`) with per-block quantization state beside it, an LLM.int8 weight keeps its
    row scales apart (Int8Params.SCB): neither is a matrix the colwise / rowwise styles can cut."""
    return dtype not in BNB_DTYPES
