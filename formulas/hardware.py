"""The hardware catalog: memory, bandwidth, dense tensor throughput, interconnect and price per GPU.

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
        price=e.get("price"), sources=tuple(e.get("sources", ())),
    )


@lru_cache(maxsize=1)
def _catalog():
    doc = load_json(CATALOG_PATH)
    return tuple(_from_entry(e) for e in doc["gpus"])


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
