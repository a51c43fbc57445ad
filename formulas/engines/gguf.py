"""GGUF files and GGML tensor types, pure Python: what a GGUF header says and how many bytes each tensor takes.

A GGUF file is a header (key/value metadata, then one record per tensor: name, shape, type, offset) and the
tensor data. Everything llama.cpp allocates for a model follows from the header, so `GGUFModel` holds only
that: the architecture, the metadata, and `GGUFTensor(name, ggml_type, shape)` for every tensor. It comes
either from a real file (`parse_header`, fed bytes by the caller — no I/O here) or from a Hugging Face config
(formulas/engines/convert.py, as llama.cpp's convert_hf_to_gguf.py would write it).

Sources (ggml-org/llama.cpp@0c1e57098, as vendored by llama-cpp-python 0.3.36): the type enum
ggml/include/ggml.h L390-433; block sizes ggml/src/ggml-common.h (the static_asserts) and gguf-py 0.19.0
`GGML_QUANT_SIZES`; the file layout ggml/src/gguf.cpp and docs/gguf.md; split files
tools/gguf-split/gguf-split.cpp (`split.no`, `split.count`, `split.tensors.count`, names `-%05d-of-%05d.gguf`).
"""

import re
import struct
from dataclasses import dataclass, field

# name → (type id, elements per block, bytes per block)
GGML_TYPES = {
    "F32": (0, 1, 4), "F16": (1, 1, 2), "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20), "Q5_0": (6, 32, 22),
    "Q5_1": (7, 32, 24), "Q8_0": (8, 32, 34), "Q8_1": (9, 32, 40), "Q2_K": (10, 256, 84), "Q3_K": (11, 256, 110),
    "Q4_K": (12, 256, 144), "Q5_K": (13, 256, 176), "Q6_K": (14, 256, 210), "Q8_K": (15, 256, 292),
    "IQ2_XXS": (16, 256, 66), "IQ2_XS": (17, 256, 74), "IQ3_XXS": (18, 256, 98), "IQ1_S": (19, 256, 50),
    "IQ4_NL": (20, 32, 18), "IQ3_S": (21, 256, 110), "IQ2_S": (22, 256, 82), "IQ4_XS": (23, 256, 136),
    "I8": (24, 1, 1), "I16": (25, 1, 2), "I32": (26, 1, 4), "I64": (27, 1, 8), "F64": (28, 1, 8),
    "IQ1_M": (29, 256, 56), "BF16": (30, 1, 2), "TQ1_0": (34, 256, 54), "TQ2_0": (35, 256, 66),
    "MXFP4": (39, 32, 17), "NVFP4": (40, 64, 36), "Q1_0": (41, 128, 18), "Q2_0": (42, 64, 18),
}
GGML_TYPE_NAMES = {v[0]: k for k, v in GGML_TYPES.items()}
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")

GGUF_MAGIC = b"GGUF"
GGUF_DEFAULT_ALIGNMENT = 32  # ggml/include/gguf.h GGUF_DEFAULT_ALIGNMENT
SPLIT_NAME = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$")


def ggml_row_size(ggml_type, n):
    """Bytes of n elements of one GGML type (ggml.c ggml_row_size); n must be whole blocks."""
    try:
        _, blk, nbytes = GGML_TYPES[ggml_type]
    except KeyError:
        raise ValueError(f"GGML type {ggml_type!r} unknown (known: {', '.join(GGML_TYPES)})") from None
    if n % blk:
        raise ValueError(f"{n} elements are not a whole number of {ggml_type} blocks ({blk})")
    return n // blk * nbytes


def block_elements(ggml_type):
    """Elements per block of a GGML type (ggml_blck_size)."""
    return GGML_TYPES[ggml_type][1]


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: its name, GGML type and shape in GGML order (ne0 = the row length)."""

    name: str
    ggml_type: str
    shape: tuple  # (ne0, ne1, ...)

    @property
    def numel(self):
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self):
        """ggml_nbytes: rows × ggml_row_size(type, ne0)."""
        rows = self.numel // self.shape[0]
        return ggml_row_size(self.ggml_type, self.shape[0]) * rows

    @property
    def layer(self):
        """Block index of a `blk.N.` tensor, else -1 (the comparator of llama-model-loader.h weight_name_comparer)."""
        m = re.match(r"blk\.(\d+)\.", self.name)
        return int(m.group(1)) if m else -1


@dataclass(frozen=True)
class GGUFModel:
    """A GGUF header: architecture, metadata (keys as written, `{arch}.` prefix included) and tensors."""

    arch: str
    metadata: dict = field(hash=False)
    tensors: tuple
    source: str = ""  # where it came from: a file, a Hub repo, or "convert: <config>"
    file_bytes: int = 0  # sum of the files' sizes when read from files; 0 otherwise

    def key(self, name, default=None):
        """Metadata `{arch}.{name}` (or a general key given in full)."""
        if name in self.metadata:
            return self.metadata[name]
        return self.metadata.get(f"{self.arch}.{name}", default)

    def tensor(self, name):
        return next((t for t in self.tensors if t.name == name), None)

    @property
    def tensor_bytes(self):
        """Sum of ggml_nbytes over the tensors (llama_model_size() when every tensor is loaded)."""
        return sum(t.nbytes for t in self.tensors)

    def ordered(self):
        """Tensors in llama-model-loader's weights_map order: non-block tensors first, then by block, then by name."""
        return sorted(self.tensors, key=lambda t: (t.layer, t.name))


# ------------------------------------------------------------------ reading a header from bytes

class NeedMoreBytes(Exception):
    """The header does not end within the bytes given; `.at_least` is how many the parser needs."""

    def __init__(self, at_least):
        super().__init__(f"need at least {at_least} bytes")
        self.at_least = at_least


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class _Reader:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, n):
        end = self.pos + n
        if end > len(self.buf):
            # ask for twice what is missing at least: a header is read in a few round trips, not one per field
            raise NeedMoreBytes(max(end, 2 * len(self.buf)))
        out = self.buf[self.pos:end]
        self.pos = end
        return out

    def scalar(self, fmt):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self):
        n = self.scalar("<Q")
        if n > 1 << 30:
            raise ValueError(f"GGUF string of {n} bytes: not a GGUF header")
        return self.take(n).decode("utf-8", "replace")

    def value(self, vtype):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            etype, n = self.scalar("<I"), self.scalar("<Q")
            if etype in _SCALARS:
                fmt = _SCALARS[etype]
                size = struct.calcsize(fmt)
                raw = self.take(size * n)
                if n > 4096:  # token lists, merges, scores: only their length matters here
                    return _LongArray(n)
                return list(struct.unpack(f"<{n}{fmt[1]}", raw))
            if n > 4096:
                for _ in range(n):
                    self.value(etype)
                return _LongArray(n)
            return [self.value(etype) for _ in range(n)]
        raise ValueError(f"GGUF metadata value type {vtype} unknown")


class _LongArray(list):
    """A long metadata array (vocabulary, merges) kept as its length only."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def __len__(self):
        return self.n


def parse_header(buf, source=""):
    """GGUFModel of one GGUF file's header, from its first bytes (raises NeedMoreBytes when `buf` is short).

    Returns (model, header_bytes): header_bytes is where the tensor data starts (after the alignment pad)."""
    r = _Reader(buf)
    if r.take(4) != GGUF_MAGIC:
        raise ValueError(f"{source or 'file'}: not a GGUF file (no GGUF magic)")
    version = r.scalar("<I")
    if version not in (2, 3):
        raise ValueError(f"{source or 'file'}: GGUF version {version} (read: 2, 3)")
    n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
    meta = {}
    for _ in range(n_kv):
        key = r.string()
        meta[key] = r.value(r.scalar("<I"))
    tensors = []
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.scalar("<I")
        shape = tuple(r.scalar("<Q") for _ in range(n_dims))
        tid = r.scalar("<I")
        r.scalar("<Q")  # offset in the data section
        if tid not in GGML_TYPE_NAMES:
            raise ValueError(f"{source or 'file'}: tensor {name} has GGML type id {tid}, unknown here")
        tensors.append(GGUFTensor(name, GGML_TYPE_NAMES[tid], shape))
    align = int(meta.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))
    header = -(-r.pos // align) * align
    arch = meta.get("general.architecture", "")
    if not arch and not int(meta.get("split.no", 0)):  # gguf-split keeps the metadata in the first file only
        raise ValueError(f"{source or 'file'}: GGUF metadata has no general.architecture")
    return GGUFModel(arch=arch, metadata=meta, tensors=tuple(tensors), source=source), header


def merge_splits(parts, source=""):
    """One GGUFModel from the headers of a split model's files (split.no 0 carries the metadata)."""
    parts = sorted(parts, key=lambda m: int(m.metadata.get("split.no", 0)))
    count = int(parts[0].metadata.get("split.count", 1))
    if len(parts) != count:
        raise ValueError(f"{source}: split.count says {count} files, {len(parts)} were read")
    tensors = tuple(t for p in parts for t in p.tensors)
    declared = parts[0].metadata.get("split.tensors.count")
    if declared is not None and int(declared) != len(tensors):
        raise ValueError(f"{source}: split.tensors.count says {declared} tensors, the files hold {len(tensors)}")
    return GGUFModel(arch=parts[0].arch, metadata=parts[0].metadata, tensors=tensors, source=source,
                     file_bytes=sum(p.file_bytes for p in parts))


def split_names(path):
    """The file names of a split model from any one of them (`x-00002-of-00005.gguf` → all five), else [path]."""
    m = SPLIT_NAME.match(path)
    if not m:
        return [path]
    prefix, n = m.group(1), int(m.group(3))
    return [f"{prefix}-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
