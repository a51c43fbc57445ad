"""llama.cpp and Ollama: the buffers the engine allocates, as its log prints them.

llama.cpp does not hold activations the way transformers does. At load it allocates
(1) model buffers: the GGUF tensors, `token_embd` always in host RAM (the input layer
stays on the CPU), repeating layers and the output layer on the devices that `-ngl` and
the split give them; (2) a KV buffer of `kv_cells` cells per device at `type_k`/`type_v`;
(3) a compute buffer per backend, sized by ggml-gallocr for the worst-case graph
(n_ubatch tokens against the full KV cache). Ollama runs the same engine with
n_ctx = num_ctx × num_parallel.

Modelled version: llama.cpp as vendored by llama-cpp-python 0.3.36 (ggml-org/llama.cpp
@0c1e57098, llama.cpp 0.5.0 era). Model and KV buffers are exact rules; the compute buffer
is a liveness estimate of the reserve graph (see `compute_buffer_estimate`). Architectures:
the Llama-style dense family (llama, mistral, qwen2, qwen3); others raise ValueError.
"""

from dataclasses import asdict, dataclass

from ..dtypes import GGUF_DTYPES

MIB = 1 << 20

# (bytes per block, elements per block). Source: ggml/src/ggml-common.h static_asserts.
_BLOCKS = {
    "F32": (4, 1), "F16": (2, 1), "Q8_0": (34, 32), "Q4_0": (18, 32), "Q4_1": (20, 32),
    "Q5_0": (22, 32), "Q5_1": (24, 32), "Q2_K": (84, 256), "Q3_K": (110, 256),
    "Q4_K": (144, 256), "Q5_K": (176, 256), "Q6_K": (210, 256),
}
_KV_TYPES = {"f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0", "f32": "F32"}
# llama-quant.cpp tensor_type_fallback: a type whose block does not divide ne[0].
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
# ftype → default type of its quantized tensors (llama-quant.cpp llama_model_quantize_impl switch).
_FTYPE_BASE = {"q8_0": "Q8_0", "q6_k": "Q6_K", "q5_k_m": "Q5_K", "q4_k_m": "Q4_K", "q4_0": "Q4_0",
               "q3_k_m": "Q3_K", "q2_k": "Q2_K"}
CPU_ALIGNMENT = 32  # ggml/src/ggml-impl.h TENSOR_ALIGNMENT (CPU buffer type)
CUDA_ALIGNMENT = 128  # ggml-cuda.cu ggml_backend_cuda_buffer_type_get_alignment
CUDA_MATRIX_ROW_PADDING = 512  # ggml-cuda/common.cuh: quantized rows padded to a multiple of 512
KV_PAD = 256  # llama-context.cpp: cparams.n_ctx = GGML_PAD(cparams.n_ctx, 256) (after PR #17046)
KV_PAD_LEGACY_FA, KV_PAD_LEGACY = 256, 32  # llama_kv_cache_unified::get_padding before that
_DENSE_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# Ollama defaults by version. Sources: num_ctx 2048 → 4096 in v0.6.7 (ollama/ollama PR #10452);
# OLLAMA_NUM_PARALLEL unset → 4 if it fits, else 1, since v0.2.0 (PR #4218, maintainer comment #9246);
# OLLAMA_FLASH_ATTENTION unset → off, OLLAMA_KV_CACHE_TYPE unset → f16 (envconfig/config.go).
# Newer Ollama sizes num_ctx by VRAM (< 24 GiB: 4k, 24–48: 32k, ≥ 48: 256k; docs/context-length.mdx
# @948f693); that tier is not modelled here: pass ctx explicitly for those versions.
OLLAMA_DEFAULTS = (
    # (first version, num_ctx, num_parallel (0 = auto: 4 if it fits else 1), flash_attn, kv_dtype)
    ("0.2.0", 2048, 0, False, "f16"),
    ("0.6.7", 4096, 0, False, "f16"),
)


@dataclass(frozen=True)
class LlamaCppSettings:
    """How llama.cpp / Ollama is started (llama-server flags / Ollama options)."""

    engine: str = "llama.cpp"  # llama.cpp | ollama
    ctx: int = 0  # llama.cpp: -c total cells; Ollama: num_ctx per sequence; 0 = engine default
    parallel: int = 1  # -np / OLLAMA_NUM_PARALLEL (0 = Ollama's auto, taken as 4 here)
    ubatch: int = 512  # -ub: tokens per compute graph
    batch: int = 2048  # -b: logical batch (bounds n_outputs)
    flash_attn: bool = False  # -fa
    kv_dtype: str = "f16"  # -ctk/-ctv: f16 | q8_0 | q4_0 (K and V alike)
    gpu_layers: object = "all"  # -ngl: int or "all"
    gpus: int = 1  # CUDA devices
    tensor_split: tuple = None  # -ts proportions; None = llama.cpp's default (free memory; equal cards → even)
    ollama_version: str = None  # selects Ollama's defaults
    device: str = "cuda"  # cuda | cpu (cpu: no devices, everything in host buffers)
    use_mmap: bool = False  # host model buffer as one mapped file range (CPU_Mapped) instead of an allocation
    kv_pad: int = KV_PAD  # cells n_ctx is padded to; KV_PAD_LEGACY(_FA) for llama.cpp before PR #17046
    kv_unified: bool = None  # one KV stream for all sequences; None = the engine's default (Ollama yes, llama.cpp no)
    legacy_layer_start: bool = False  # older builds: i_gpu_start = max(n_layer − ngl, 0), not max(n_layer + 1 − ngl, 0)


@dataclass(frozen=True)
class LlamaCppBuffers:
    """Bytes of every buffer llama.cpp logs; lists hold one entry per GPU."""

    engine: str
    llama_cpp_version: str
    kv_cells: int
    n_ctx_seq: int
    model_buffer_bytes: list
    host_model_buffer_bytes: int
    kv_buffer_bytes: list
    host_kv_buffer_bytes: int
    compute_buffer_bytes: list
    host_compute_buffer_bytes: int
    layers_per_gpu: list
    notes: list

    def to_json(self):
        """Plain dict of the buffers (JSON-ready)."""
        return asdict(self)


def _version_key(v):
    return tuple(int(x) for x in str(v).split(".")[:3] if x.isdigit())


def ollama_defaults(version):
    """(num_ctx, num_parallel, flash_attn, kv_dtype) Ollama used by default at `version` (None = newest row)."""
    rows = OLLAMA_DEFAULTS
    if version is None:
        return rows[-1][1:]
    key = _version_key(version)
    chosen = None
    for row in rows:
        if _version_key(row[0]) <= key:
            chosen = row
    if chosen is None:
        raise ValueError(f"ollama_version {version!r}: modelled from {rows[0][0]} on")
    return chosen[1:]


def ggml_row_bytes(ggml_type, n):
    """Bytes of n elements of one GGML type (ggml_row_size)."""
    nbytes, blk = _BLOCKS[ggml_type]
    if n % blk:
        raise ValueError(f"{n} elements are not a whole number of {ggml_type} blocks ({blk})")
    return n // blk * nbytes


def _pad(x, a):
    return -(-x // a) * a


def _use_more_bits(i, n):
    # llama-quant.cpp use_more_bits
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _is_70b(shape):
    # llama.cpp LLM_TYPE_70B: an 80-layer Llama (llama-model.cpp load_hparams, LLM_ARCH_LLAMA case 80).
    return shape.model_type in ("llama", "mistral") and shape.n_layers == 80


def _quant_type(ftype, category, ne0, i, n, shape, tied):
    """GGML type llama_model_quantize gives one 2-D weight. Source: src/llama-quant.cpp llama_tensor_get_type(_impl)."""
    base = _FTYPE_BASE[ftype]
    t = base
    gqa = shape.n_heads // max(shape.n_kv_heads, 1)
    if category == "output" or (tied and category == "token_embd"):
        if ne0 % _BLOCKS[base][1]:
            t = "Q8_0"
        elif base != "Q8_0":
            t = "Q6_K"
    elif category == "attn_v":
        if ftype == "q2_k":
            t = "Q4_K" if gqa >= 4 else "Q3_K"
        elif ftype == "q3_k_m":
            t = "Q5_K" if i < 2 else "Q4_K"
        elif ftype in ("q4_k_m", "q5_k_m") and _use_more_bits(i, n):
            t = "Q6_K"
        if _is_70b(shape) and t in ("Q3_K", "Q4_K"):
            t = "Q5_K"
    elif category == "ffn_down":
        if ftype == "q2_k":
            t = "Q3_K"
        elif ftype == "q3_k_m":
            t = "Q5_K" if i < n // 16 else "Q4_K"
        elif ftype in ("q4_k_m", "q5_k_m") and _use_more_bits(i, n):
            t = "Q6_K"
    elif category == "attn_output":
        t = {"q2_k": "Q3_K", "q3_k_m": "Q4_K"}.get(ftype, base)
    if ne0 % _BLOCKS[t][1]:  # tensor_type_fallback
        t = _FALLBACK.get(t, t)
        if ne0 % _BLOCKS[t][1]:
            t = "F16"
    return t


def gguf_tensors(shape, dtype):
    """[(gguf name, layer index or -1 / 'out', ggml type, ne0, ne1)] of a llama.cpp-quantized GGUF of `shape`.

    The tensor list is convert_hf_to_gguf's for the Llama-style family (llama.cpp names);
    1-D tensors are F32. rope_freqs (Llama 3 rope scaling, hd/2 floats) is not listed."""
    if shape.model_type not in _DENSE_TYPES:
        raise ValueError(f"engine llama.cpp: model_type {shape.model_type!r} not modelled (supported: {', '.join(_DENSE_TYPES)})")
    if dtype not in GGUF_DTYPES:
        raise ValueError(f"engine llama.cpp: dtype {dtype!r} is not a GGUF type (allowed: {', '.join(GGUF_DTYPES)})")
    H, L, hd = shape.hidden, shape.n_layers, shape.head_dim
    q_out, kv_out, inter = shape.n_heads * hd, shape.n_kv_heads * hd, shape.intermediate
    tied = shape.tie_embeddings
    bias = shape.model_type == "qwen2"
    out = [("token_embd.weight", -1, _quant_type(dtype, "token_embd", H, 0, L, shape, tied), H, shape.vocab)]
    for i in range(L):
        p = f"blk.{i}."
        mats = [("attn_q", H, q_out), ("attn_k", H, kv_out), ("attn_v", H, kv_out), ("attn_output", q_out, H),
                ("ffn_gate", H, inter), ("ffn_up", H, inter), ("ffn_down", inter, H)]
        out.append((p + "attn_norm.weight", i, "F32", H, 1))
        for cat, ne0, ne1 in mats:
            out.append((p + cat + ".weight", i, _quant_type(dtype, cat, ne0, i, L, shape, tied), ne0, ne1))
            if bias and cat in ("attn_q", "attn_k", "attn_v"):
                out.append((p + cat + ".bias", i, "F32", ne1, 1))
        if shape.qk_norm:
            out.append((p + "attn_q_norm.weight", i, "F32", hd, 1))
            out.append((p + "attn_k_norm.weight", i, "F32", hd, 1))
        out.append((p + "ffn_norm.weight", i, "F32", H, 1))
    out.append(("output_norm.weight", "out", "F32", H, 1))
    if not tied:
        out.append(("output.weight", "out", _quant_type(dtype, "output", H, 0, L, shape, tied), H, shape.vocab))
    return out


def _tensor_bytes(t):
    _, _, typ, ne0, ne1 = t
    return ggml_row_bytes(typ, ne0) * ne1


def _cuda_alloc_bytes(t):
    # ggml_backend_cuda_buffer_type_get_alloc_size: quantized rows padded to MATRIX_ROW_PADDING.
    _, _, typ, ne0, ne1 = t
    size = ggml_row_bytes(typ, ne0) * ne1
    if typ not in ("F32", "F16") and ne0 % CUDA_MATRIX_ROW_PADDING:
        size += ggml_row_bytes(typ, CUDA_MATRIX_ROW_PADDING - ne0 % CUDA_MATRIX_ROW_PADDING)
    return size


def layer_devices(n_layers, gpu_layers, gpus, tensor_split=None, legacy_start=False):
    """Device of each repeating layer and of the output layer (-1 = CPU). Source: llama-model.cpp load_tensors:
    `i_gpu_start = std::max(n_layer_all + 1 - n_gpu_layers, 0)` (the output layer is one of the -ngl); older
    builds had `std::max((int) hparams.n_layer - n_gpu_layers, 0)` (`legacy_start`)."""
    ngl = n_layers + 1 if gpu_layers == "all" else int(gpu_layers)
    if gpus == 0:
        return [-1] * n_layers, -1
    split = list(tensor_split) if tensor_split else [1.0] * gpus
    if len(split) != gpus or any(x < 0 for x in split) or sum(split) <= 0:
        raise ValueError(f"tensor_split {tensor_split!r}: need {gpus} non-negative proportions")
    total, acc, points = sum(split), 0.0, []
    for x in split:
        acc += x
        points.append(acc / total)
    start = max(n_layers - ngl, 0) if legacy_start else max(n_layers + 1 - ngl, 0)
    act = min(ngl, n_layers + 1)

    def dev(il):
        if il < start or il - start >= act:
            return -1
        f = (il - start) / act
        return next((k for k, p in enumerate(points) if p > f), gpus - 1)  # std::upper_bound

    return [dev(i) for i in range(n_layers)], dev(n_layers)


def _unified(s):
    # llama_context_default_params: kv_unified false; Ollama's runners (and llama.cpp before the split KV
    # streams) keep one cache of num_ctx × num_parallel cells that every sequence attends over.
    return s.kv_unified if s.kv_unified is not None else s.engine == "ollama"


def kv_cells(settings):
    """(n_ctx cells, n_ctx_seq, n_ctx as asked): -c padded (llama.cpp) or num_ctx × num_parallel (Ollama). Source: llama-context.cpp."""
    s = settings
    n_seq = s.parallel if s.parallel > 0 else 4
    ctx = s.ctx
    if s.engine == "ollama":
        num_ctx, _, _, _ = ollama_defaults(s.ollama_version)
        ctx = (ctx or num_ctx) * n_seq
    elif ctx <= 0:
        raise ValueError(f"ctx {ctx}: llama.cpp needs the context size (-c) as a positive integer")
    n_ctx = _pad(ctx, s.kv_pad)
    if _unified(s):
        return n_ctx, n_ctx, ctx
    n_ctx_seq = _pad(n_ctx // n_seq, s.kv_pad)
    return n_ctx_seq * n_seq, n_ctx_seq, ctx


class _Gallocr:
    """ggml-gallocr in miniature: a best-fit free list over one address range; the buffer is its high-water mark.

    Source: ggml/src/ggml-alloc.c — ggml_dyn_tallocr_alloc (best fit among the free blocks but the last,
    else the last), ggml_dyn_tallocr_free_tensor (merge with neighbours), ggml_gallocr_allocate_node (in
    place over a parent whose only consumer this is, for ggml_op_can_inplace ops), parents freed after
    their last consumer, graph outputs never."""

    def __init__(self, align):
        self.align, self.free, self.max = align, [[0, 1 << 62]], 0
        self.at, self.users = {}, {}

    def _alloc(self, size):
        best, best_size = -1, None
        for i, (_, sz) in enumerate(self.free[:-1]):
            if sz >= size and (best_size is None or sz <= best_size):
                best, best_size = i, sz
        if best < 0:
            best = len(self.free) - 1
        off, sz = self.free[best]
        if sz == size and best < len(self.free) - 1:
            del self.free[best]
        else:
            self.free[best] = [off + size, sz - size]
        self.max = max(self.max, off + size)
        return off

    def _release(self, off, size):
        fl = self.free
        for i, (o, sz) in enumerate(fl):
            if o + sz == off:  # after block i: grow it, and merge with the next if they now touch
                fl[i][1] += size
                if i + 1 < len(fl) and fl[i][0] + fl[i][1] == fl[i + 1][0]:
                    fl[i][1] += fl[i + 1][1]
                    del fl[i + 1]
                return
            if off + size == o:
                fl[i] = [off, sz + size]
                return
        fl.append([off, size])
        fl.sort()

    def new(self, name, nbytes, uses=1, inplace_of=None, output=False):
        """Allocate `name` (reusing `inplace_of` when it is its parent's last use), then retire that parent."""
        size = _pad(nbytes, self.align)
        if inplace_of is not None and self.users.get(inplace_of) == 1 and self.at[inplace_of][1] >= size:
            off, psize = self.at.pop(inplace_of)
            self.users.pop(inplace_of)
            if psize > size:
                self._release(off + size, psize - size)
            self.at[name] = (off, size)
        else:
            self.at[name] = (self._alloc(size), size)
            if inplace_of is not None:
                self.use(inplace_of)
        self.users[name] = -1 if output else uses

    def use(self, *names):
        """One consumer of each name is done; a tensor with none left is freed."""
        for n in names:
            if self.users.get(n, 0) <= 0:
                continue
            self.users[n] -= 1
            if self.users[n] == 0:
                self._release(*self.at.pop(n))
                self.users.pop(n)


def compute_buffer_estimate(shape, n_tokens, n_kv, flash_attn, kv_type, n_outputs, align=CPU_ALIGNMENT, n_layers=1,
                            with_embd=True, n_stream=1):
    """Bytes ggml-gallocr reserves for the worst-case graph of `n_layers` Llama-style layers + output.

    Replays the reserve graph (n_tokens = n_ubatch tokens against n_kv cells per stream) of llama-graph.cpp
    build_attn / models/qwen2.cpp node by node in graph order through `_Gallocr`: the inputs first (tokens,
    positions, KV row indices, the KQ mask f32 — f16 with flash attention —, output ids), per layer the norm,
    Q (+bias, Qwen3's q_norm, rope — measured not in place), V, K likewise, the scores n_kv × n_tokens × n_head f32 (soft_max in place) or the flash-attention
    output, the FFN intermediates, then the logits n_vocab × n_outputs f32 (an output, never reused)."""
    T, H, nh, hd = n_tokens, shape.hidden, shape.n_heads, shape.head_dim
    kvh, inter, f4 = shape.n_kv_heads, shape.intermediate, 4
    bias = shape.model_type == "qwen2"
    L = n_layers
    a = _Gallocr(align)
    if with_embd:
        a.new("inp_tokens", 4 * T)
        a.new("inp_embd", H * T * f4, output=True)  # the vector-embeddings input, built beside the tokens path
    a.new("inp_pos", 4 * T, uses=2 * L)
    a.new("k_idxs", 8 * T, uses=L)
    # a transposed V cache (no flash attention) is written element by element: one index per value
    a.new("v_idxs", 8 * T * (1 if flash_attn else kvh * hd), uses=L)
    a.new("kq_mask", n_kv * T * (2 if flash_attn else 4), uses=L)
    if n_outputs:
        a.new("out_ids", 4 * n_outputs, uses=2)
    a.new("x", H * T * f4, uses=2)  # get_rows(token_embd), or the copy of the host's inp_embd
    if with_embd:
        a.use("inp_tokens")
    for il in range(L):
        last = il == L - 1 and n_outputs
        a.new("norm", H * T * f4)
        a.use("x")
        a.new("normw", H * T * f4, uses=3, inplace_of="norm")
        for name, width in (("q", nh * hd), ("v", kvh * hd), ("k", kvh * hd)):  # build_attn expands q, v, k
            a.new(name, width * T * f4)
            a.use("normw")
            if bias:
                a.new(name + "b", width * T * f4, inplace_of=name)
                a.new(name, width * T * f4, inplace_of=name + "b")
            if name != "v" and shape.qk_norm:  # Qwen3 q_norm / k_norm: RMS norm of the reshaped view, × weight
                a.new(name + "n", width * T * f4)
                a.use(name)
                a.new(name, width * T * f4, inplace_of=name + "n")
            if name != "v":
                a.new(name + "r", width * T * f4)  # rope of a reshaped view: measured not in place
                a.use(name, "inp_pos")
        a.use("kr", "k_idxs", "v", "v_idxs")  # ggml_set_rows into the cache: nothing allocated
        if flash_attn:
            a.new("att", hd * nh * T * f4)  # flash_attn_ext output [hd, n_head, T]; reshape_2d is a view
            a.use("qr", "kq_mask")
        else:
            a.new("kq", n_kv * T * nh * f4)
            a.use("qr")
            a.new("kqs", n_kv * T * nh * f4, inplace_of="kq")  # soft_max_ext in place
            a.use("kq_mask")
            a.new("kqv", hd * T * nh * f4)
            a.use("kqs")
            a.new("att", nh * hd * T * f4)  # cont of the permuted kqv
            a.use("kqv")
        a.new("o", H * T * f4)
        a.use("att")
        if last:  # ggml_get_rows(cur, inp_out_ids), ggml_get_rows(inpSA, inp_out_ids)
            a.new("o2", H * n_outputs * f4)
            a.use("o", "out_ids")
            a.new("x2", H * n_outputs * f4)
            a.use("x", "out_ids")
            a.new("res", H * n_outputs * f4, uses=2, inplace_of="o2")
            a.use("x2")
            rows = n_outputs
        else:
            a.new("res", H * T * f4, uses=2, inplace_of="o")
            a.use("x")
            rows = T
        a.new("fn", H * rows * f4)
        a.use("res")
        a.new("fnw", H * rows * f4, uses=2, inplace_of="fn")
        a.new("up", inter * rows * f4)
        a.use("fnw")
        a.new("gate", inter * rows * f4)
        a.use("fnw")
        a.new("act", inter * rows * f4)  # swiglu: a GLU op, not in place
        a.use("gate", "up")
        a.new("down", H * rows * f4)
        a.use("act")
        a.new("x", H * rows * f4, uses=2, inplace_of="down")
        a.use("res")
    if n_outputs:
        a.new("onorm", H * n_outputs * f4)
        a.use("x", "x")
        a.new("result_norm", H * n_outputs * f4, inplace_of="onorm", output=True)
        a.new("result_output", shape.vocab * n_outputs * f4, output=True)
    return a.max


def predict_llamacpp(shape, dtype, settings):
    """Every buffer llama.cpp (or Ollama) allocates for `shape` at GGUF `dtype` under `settings` (bytes)."""
    s = settings
    if s.engine not in ("llama.cpp", "ollama"):
        raise ValueError(f"engine {s.engine!r}: allowed llama.cpp, ollama")
    if s.device not in ("cuda", "cpu"):
        raise ValueError(f"device {s.device!r}: allowed cuda, cpu")
    if s.kv_dtype not in ("f16", "q8_0", "q4_0"):
        raise ValueError(f"kv_dtype {s.kv_dtype!r}: allowed f16, q8_0, q4_0")
    flash = s.flash_attn
    if s.engine == "ollama" and s.ollama_version is not None and not flash:
        flash = ollama_defaults(s.ollama_version)[2]
    if s.kv_dtype != "f16" and not flash:
        raise ValueError(f"kv_dtype {s.kv_dtype}: a quantized V cache requires flash attention (llama.cpp refuses it without)")
    if s.ubatch <= 0 or s.batch <= 0 or s.parallel < 0:
        raise ValueError(f"ubatch {s.ubatch}, batch {s.batch}, parallel {s.parallel}: must be positive")
    if s.gpu_layers != "all" and (not isinstance(s.gpu_layers, int) or s.gpu_layers < 0):
        raise ValueError(f"gpu_layers {s.gpu_layers!r}: a non-negative integer or 'all'")
    gpus = 0 if s.device == "cpu" else s.gpus
    if s.device == "cuda" and gpus < 1:
        raise ValueError(f"gpus {s.gpus}: at least 1 on device cuda")
    tensors = gguf_tensors(shape, dtype)
    L = shape.n_layers
    lay, out_dev = layer_devices(L, s.gpu_layers, gpus, s.tensor_split, s.legacy_layer_start)
    host_model = 0
    host_sizes = []
    gpu_model = [0] * gpus
    for t in tensors:
        where = t[1]
        d = -1 if where == -1 else (out_dev if where == "out" else lay[where])
        if d < 0:
            host_sizes.append(_tensor_bytes(t))
        else:
            gpu_model[d] += _pad(_cuda_alloc_bytes(t), CUDA_ALIGNMENT)
    if s.use_mmap:  # one mapped range: tensors padded to the GGUF alignment (32) but the last
        host_model = sum(_pad(x, 32) for x in host_sizes[:-1]) + (host_sizes[-1] if host_sizes else 0)
    else:
        host_model = sum(_pad(x, CPU_ALIGNMENT) for x in host_sizes)
    cells, n_ctx_seq, n_ctx_asked = kv_cells(s)
    kvt = _KV_TYPES[s.kv_dtype]
    per_layer_kv = 2 * ggml_row_bytes(kvt, shape.n_kv_heads * shape.head_dim) * cells
    host_kv = 0
    gpu_kv = [0] * gpus
    for i in range(L):
        if lay[i] < 0:
            host_kv += per_layer_kv
        else:
            gpu_kv[lay[i]] += per_layer_kv
    # llama-context.cpp: n_batch = min(n_ctx as asked, n_batch) for causal models; n_ubatch = min(n_batch, n_ubatch)
    T = min(s.ubatch, s.batch, n_ctx_asked)
    n_kv = n_ctx_seq  # the cells one stream attends over (all of them when unified); the reserve sees it full
    n_out = min(T, s.batch)
    notes = []
    gpu_compute = [0] * gpus
    if gpus == 0:
        host_compute = compute_buffer_estimate(shape, T, n_kv, flash, kvt, n_out, CPU_ALIGNMENT, L)
    else:
        # A device holds its layers' graph; the last device also the output. The host keeps the embedding
        # lookup (token_embd lives there) and any layers left on the CPU.
        host_layers = sum(1 for d in lay if d < 0)
        host_compute = _pad(4 * T, CPU_ALIGNMENT) + _pad(shape.hidden * T * 4, CPU_ALIGNMENT)
        if host_layers:
            host_compute = compute_buffer_estimate(shape, T, n_kv, flash, kvt, n_out, CPU_ALIGNMENT, host_layers)
        for g in range(gpus):
            n = sum(1 for d in lay if d == g)
            if n or out_dev == g:
                gpu_compute[g] = compute_buffer_estimate(shape, T, n_kv, flash, kvt, n_out if out_dev == g else 0,
                                                         CUDA_ALIGNMENT, max(n, 1), with_embd=False)
        notes.append("CUDA compute buffer: the CPU liveness model, not calibrated on a GPU")
    return LlamaCppBuffers(
        engine=s.engine, llama_cpp_version="llama-cpp-python 0.3.36 (ggml-org/llama.cpp@0c1e57098)",
        kv_cells=cells, n_ctx_seq=n_ctx_seq, model_buffer_bytes=gpu_model, host_model_buffer_bytes=host_model,
        kv_buffer_bytes=gpu_kv, host_kv_buffer_bytes=host_kv, compute_buffer_bytes=gpu_compute,
        host_compute_buffer_bytes=host_compute, layers_per_gpu=[sum(1 for d in lay if d == g) for g in range(gpus)],
        notes=notes)


def log_lines(result, use_mmap=False):
    """The buffer lines llama.cpp prints (format of llama.cpp @0c1e57098: `%12s model buffer size = %8.2f MiB`)."""
    r = result
    host = "CPU_Mapped" if use_mmap else "CPU"
    lines = []
    for g, b in enumerate(r.model_buffer_bytes):
        if b:
            lines.append(f"load_tensors: {'CUDA%d' % g:>12} model buffer size = {b / MIB:8.2f} MiB")
    if r.host_model_buffer_bytes:
        lines.append(f"load_tensors: {host:>12} model buffer size = {r.host_model_buffer_bytes / MIB:8.2f} MiB")
    for g, b in enumerate(r.kv_buffer_bytes):
        if b:
            lines.append(f"llama_kv_cache: {'CUDA%d' % g:>10} KV buffer size = {b / MIB:8.2f} MiB")
    if r.host_kv_buffer_bytes:
        lines.append(f"llama_kv_cache: {'CPU':>10} KV buffer size = {r.host_kv_buffer_bytes / MIB:8.2f} MiB")
    for g, b in enumerate(r.compute_buffer_bytes):
        if b:
            lines.append(f"sched_reserve: {'CUDA%d' % g:>10} compute buffer size = {b / MIB:8.2f} MiB")
    host_c = "CPU" if not r.model_buffer_bytes else "CUDA_Host"
    lines.append(f"sched_reserve: {host_c:>10} compute buffer size = {r.host_compute_buffer_bytes / MIB:8.2f} MiB")
    return lines
