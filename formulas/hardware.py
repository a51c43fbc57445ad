"""The hardware catalog: memory, bandwidth, dense tensor throughput, interconnect and price per GPU, and the node each
GPU type usually sits in (GPUs per node, NVLink domain, the network between nodes, host memory).

Facts live in `catalog/hardware.json`, each GPU with its sources; this module only reads
that file and answers lookups. Bytes are integers: `memory_bytes` is the vendor's nominal
capacity (every GDDR/HBM "GB" here is 2^30 bytes, see the file's `memory_gb_base`),
`reported_total_bytes` what nvidia-smi/rocm-smi report where a public measurement exists.
Throughput is dense (not 2:4 sparse) tensor-core FLOP/s with FP32 accumulation.
"""

import os
from dataclasses import dataclass
from functools import lru_cache

from .documents import load_json

CATALOG_PATH = os.path.join(os.path.dirname(__file__), "catalog", "hardware.json")

# Which tensor-core path a matmul in a given dtype runs on. Weight-only quantized formats
# (bitsandbytes 4-bit, GPTQ/AWQ, GGUF) dequantize and multiply in the compute dtype;
# LLM.int8 multiplies in int8; fp8 checkpoints use fp8 tensor cores where the GPU has them.
_MATMUL_PATH = {"bf16": "bf16", "fp16": "fp16", "fp8": "fp8", "int8": "int8"}


@dataclass(frozen=True)
class Hardware:
    """One GPU model, as the catalog records it."""

    name: str  # canonical name, e.g. "H100 SXM"
    aliases: tuple  # other spellings accepted by --gpu
    vendor: str
    memory_bytes: int  # nominal capacity
    memory_gb_base: str  # "2^30" or "10^9": what the vendor's "GB" means for this part
    reported_total_bytes: int  # total reported by nvidia-smi/rocm-smi, 0 when no measurement was found
    bandwidth_bytes_per_s: int  # peak memory bandwidth (decimal bytes per second, as vendors state it)
    dense_flops: dict  # "bf16" | "fp16" | "fp8" | "int8" -> FLOP/s (ops/s for int8), None where there is no such path
    interconnect: tuple  # ((name, bytes_per_s both directions summed), ...)
    price: dict  # {"amount", "currency", "kind"} or None
    sources: tuple  # URLs and datasheet names
    architecture: str = ""  # family and chip, e.g. "Ada Lovelace AD102" (formulas.device reads the chip)
    node: str = ""  # the node profile it usually sits in (catalog "nodes")

    @property
    def usable_bytes(self):
        """What a process can hope to allocate: the reported total where measured, else the nominal capacity."""
        return self.reported_total_bytes or self.memory_bytes

    def matmul_flops(self, dtype, compute_dtype="bf16"):
        """(peak dense FLOP/s, path used) for matmuls on weights stored as `dtype`. Source: the catalog."""
        path = _MATMUL_PATH.get(dtype, compute_dtype)
        if path not in self.dense_flops or self.dense_flops[path] is None:
            path = compute_dtype if compute_dtype in ("bf16", "fp16") else "bf16"
        flops = self.dense_flops.get(path)
        if flops is None and path == "fp16":
            flops, path = self.dense_flops.get("bf16"), "bf16"
        return flops, path


    def link(self, kind):
        """(name, bytes per second one way) of the first interconnect whose name contains `kind`, or None."""
        for name, both in self.interconnect:
            if kind.lower() in name.lower():
                return name, both // 2
        return None


@dataclass(frozen=True)
class Node:
    """A node (box) as the catalog's `nodes` profile describes it; bandwidths both directions summed."""

    key: str
    name: str
    gpus_per_node: int
    nvlink_domain: int  # GPUs one NVLink / Infinity Fabric domain joins (1: none)
    scale_out_name: str  # "" where nodes are not joined
    scale_out_bytes_per_s: int  # the whole node's network, both directions summed (0: none)
    host_memory_bytes: int  # 0: not one product, unknown
    host_memory_bandwidth_bytes_per_s: int  # 0: unknown
    basis: str  # "vendor system", or vramlab's assumption and why
    sources: tuple


class UnknownGPUError(ValueError):
    """A --gpu name that is not in the catalog."""


def _key(s):
    return "".join(ch for ch in s.lower() if ch.isalnum())


def _from_entry(e):
    tf = e.get("dense_tflops", {})
    return Hardware(
        name=e["name"], aliases=tuple(e.get("aliases", ())), vendor=e.get("vendor", ""),
        memory_bytes=int(e["memory_bytes"]), memory_gb_base=e.get("memory_gb_base", "2^30"),
        reported_total_bytes=int(e.get("reported_total_bytes") or 0),
        bandwidth_bytes_per_s=int(e["bandwidth_bytes_per_s"]),
        dense_flops={k: (None if v is None else v * 1e12) for k, v in tf.items()},
        interconnect=tuple((i["name"], int(i["bytes_per_s"])) for i in e.get("interconnect", ())),
        price=e.get("price"), sources=tuple(e.get("sources", ())), architecture=e.get("architecture", ""),
        node=e.get("node", ""),
    )


def _node_from(key, e):
    out = e.get("scale_out") or {}
    return Node(key=key, name=e["name"], gpus_per_node=int(e["gpus_per_node"]), nvlink_domain=int(e["nvlink_domain"]),
                scale_out_name=out.get("name", ""), scale_out_bytes_per_s=int(out.get("bytes_per_s") or 0),
                host_memory_bytes=int(e.get("host_memory_bytes") or 0),
                host_memory_bandwidth_bytes_per_s=int(e.get("host_memory_bandwidth_bytes_per_s") or 0),
                basis=e.get("basis", ""), sources=tuple(e.get("sources", ())))


@lru_cache(maxsize=1)
def _document():
    return load_json(CATALOG_PATH)


@lru_cache(maxsize=1)
def _catalog():
    return tuple(_from_entry(e) for e in _document()["gpus"])


@lru_cache(maxsize=1)
def _nodes():
    return {k: _node_from(k, e) for k, e in _document().get("nodes", {}).items() if not k.startswith("_")}


def node_of(hw):
    """The node profile a GPU type usually sits in (the catalog's `nodes`); one GPU alone where it names none."""
    node = _nodes().get(hw.node)
    if node is None:
        return Node(key="", name="one GPU", gpus_per_node=1, nvlink_domain=1, scale_out_name="", scale_out_bytes_per_s=0,
                    host_memory_bytes=0, host_memory_bandwidth_bytes_per_s=0, basis="no node profile in the catalog",
                    sources=())
    return node


@lru_cache(maxsize=1)
def _index():
    idx = {}
    for hw in _catalog():
        for alias in (hw.name,) + hw.aliases:
            idx.setdefault(_key(alias), hw)
    return idx


def hardware_names():
    """Canonical names of every GPU in the catalog."""
    return [hw.name for hw in _catalog()]


def get_hardware(name):
    """The catalog entry for a GPU name or alias; unknown names are an UnknownGPUError naming --gpu."""
    hw = _index().get(_key(name))
    if hw is None:
        raise UnknownGPUError(f"--gpu {name}: unknown GPU; known: {', '.join(hardware_names())}")
    return hw
