"""llama.cpp and Ollama: the buffers the engine allocates, as its log prints them, for any GGUF.

llama.cpp does not hold activations the way transformers does. At load it allocates
(1) model buffers: the GGUF tensors, `token_embd` always in host RAM (the input layer stays on the CPU),
repeating layers and the output layer on the devices that `-ngl`, the split and `-ot` give them;
(2) memory: a KV buffer per device (`llama_kv_cache`: full-attention layers n_ctx cells, sliding-window
layers only their window unless --swa-full; MLA keeps one compressed K row), and for recurrent layers
(Mamba, gated delta nets) an RS buffer of one state per sequence; (3) a compute buffer per backend, sized
by ggml-gallocr for the worst-case graph (n_ubatch tokens against the full cache). Ollama runs the same
engine with n_ctx = num_ctx × num_parallel.

The model is a GGUF header (formulas/engines/gguf.py): read from a file or converted from a config.json
(formulas/engines/convert.py) and quantized by llama.cpp's own rules (formulas/engines/quantize.py).

Modelled version: llama.cpp as vendored by llama-cpp-python 0.3.36 (ggml-org/llama.cpp@0c1e57098, 2026-10).
Model and KV/RS buffers are exact rules; the compute buffer is a replay of the reserve graph through a copy
of ggml-gallocr (`compute_buffer_estimate`), checked on the CPU (docs/engines.md).
"""

import re
from dataclasses import asdict, dataclass, field

from .gguf import GGUFModel, ggml_row_size

MIB = 1 << 20

_KV_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1",
             "iq4_nl": "IQ4_NL", "q5_0": "Q5_0", "q5_1": "Q5_1"}  # common/arg.cpp kv_cache_types
KV_CACHE_TYPES = tuple(_KV_TYPES)
CPU_ALIGNMENT = 32  # ggml/src/ggml-impl.h TENSOR_ALIGNMENT (CPU and CUDA_Host buffer types)
CUDA_ALIGNMENT = 128  # ggml-cuda.cu ggml_backend_cuda_buffer_type_get_alignment
CUDA_MATRIX_ROW_PADDING = 512  # ggml-cuda/common.cuh MATRIX_ROW_PADDING: quantized rows padded (get_alloc_size)
KV_PAD = 256  # llama-context.cpp L290: cparams.n_ctx = GGML_PAD(cparams.n_ctx, 256)
KV_PAD_LEGACY_FA, KV_PAD_LEGACY = 256, 32  # llama_kv_cache_unified::get_padding before PR #17046
LLAMA_VERSION = "llama-cpp-python 0.3.36 (ggml-org/llama.cpp@0c1e57098)"

# common/common.h L1198: --cpu-moe and --n-cpu-moe put these on the CPU (`blk\.N` prefixed for --n-cpu-moe)
FFN_EXPS_REGEX = r"\.ffn_(up|down|gate|gate_up)_(ch|)exps"

# Ollama defaults by version. Sources: num_ctx 2048 → 4096 in v0.6.7 (ollama/ollama PR #10452);
# OLLAMA_NUM_PARALLEL unset → 4 if it fits, else 1, since v0.2.0 (PR #4218), → 1 from v0.11.5 (envconfig);
# OLLAMA_FLASH_ATTENTION unset → off, OLLAMA_KV_CACHE_TYPE unset → f16 (envconfig/config.go).
# The newer VRAM-tiered num_ctx is formulas/engines/ollama.py's.
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
    flash_attn: bool = False  # -fa on/off (None: llama.cpp's auto = on for CPU and CUDA)
    kv_dtype: str = "f16"  # -ctk/-ctv: f16 | q8_0 | q4_0 … (K and V alike unless kv_dtype_v)
    gpu_layers: object = "all"  # -ngl: int or "all"
    gpus: int = 1  # CUDA devices
    tensor_split: tuple = None  # -ts proportions; None = llama.cpp's default (free memory; equal cards → even)
    ollama_version: str = None  # selects Ollama's defaults
    device: str = "cuda"  # cuda | cpu (cpu: no devices, everything in host buffers)
    use_mmap: bool = False  # host model buffer as one mapped file range (CPU_Mapped) instead of an allocation
    kv_pad: int = KV_PAD  # cells n_ctx is padded to; KV_PAD_LEGACY(_FA) for llama.cpp before PR #17046
    kv_unified: bool = None  # one KV stream for all sequences; None = the engine's default (Ollama yes, llama.cpp no)
    legacy_layer_start: bool = False  # older builds: i_gpu_start = max(n_layer − ngl, 0), not max(n_layer + 1 − ngl, 0)
    kv_dtype_v: str = ""  # -ctv when it differs from -ctk
    swa_full: bool = False  # --swa-full: sliding-window layers keep every cell
    overrides: tuple = ()  # -ot: ((regex, "CPU" | "CUDA<n>"), …) in order, first match wins
    cpu_moe: bool = False  # --cpu-moe
    n_cpu_moe: int = 0  # --n-cpu-moe N
    split_mode: str = "layer"  # -sm layer | row | none
    main_gpu: int = 0  # -mg (split mode none / row: the device holding the rest)
    offload_kqv: bool = True  # --no-kv-offload turns it off: KV in host RAM
    op_offload: bool = True  # --no-op-offload: host weights of big batches are not copied to the GPU
    n_rs_seq: int = 0  # recurrent rollback cells per sequence (llama_context_params.n_rs_seq)


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
    arch: str = ""
    swa_cells: int = 0  # cells of the sliding-window cache (0: none)
    rs_buffer_bytes: list = field(default_factory=list)  # recurrent states per GPU
    host_rs_buffer_bytes: int = 0
    model_tensor_bytes: int = 0  # llama_model_size(): ggml_nbytes over the loaded tensors
    host_mapped: bool = False  # the host model buffer is the mapped file (CPU_Mapped)
    output_buffer_bytes: int = 0  # llama_context's host output buffer (logits of n_seq_max rows)

    def to_json(self):
        """Plain dict of the buffers (JSON-ready)."""
        return asdict(self)

    def device_bytes(self, g):
        """model + KV/RS + compute on GPU g (what llama.cpp's memory breakdown calls self)."""
        rs = self.rs_buffer_bytes[g] if self.rs_buffer_bytes else 0
        return self.model_buffer_bytes[g] + self.kv_buffer_bytes[g] + rs + self.compute_buffer_bytes[g]

    @property
    def host_bytes(self):
        """model + KV/RS + compute + output in host RAM."""
        return (self.host_model_buffer_bytes + self.host_kv_buffer_bytes + self.host_rs_buffer_bytes
                + self.host_compute_buffer_bytes + self.output_buffer_bytes)


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
    return ggml_row_size(ggml_type, n)


def _pad(x, a):
    return -(-x // a) * a


# ------------------------------------------------------------------ the model's hyper-parameters, as llama.cpp reads them

@dataclass(frozen=True)
class Hparams:
    """llama_hparams after load_hparams / load_arch_hparams (per layer where llama.cpp keeps arrays)."""

    arch: str
    n_layer_all: int
    n_layer: int  # without the next-token-prediction layers
    n_embd: int
    n_vocab: int
    n_ctx_train: int
    n_head: tuple
    n_head_kv: tuple
    n_ff: tuple
    head_k: int  # n_embd_head_k (full-attention layers)
    head_v: int
    head_k_swa: int
    head_v_swa: int
    is_swa: tuple
    n_swa: int
    is_recr: tuple
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_ff_shexp: int
    n_layer_dense_lead: int
    is_mla: bool
    kv_lora_rank: int
    q_lora_rank: int
    head_k_mla: int
    head_v_mla: int
    n_rot: int
    ssm_d_conv: int
    ssm_d_inner: int
    ssm_d_state: int
    ssm_n_group: int
    ssm_dt_rank: int
    model_type_70b: bool
    attn_bias: bool = False  # separate q/k/v biases (Qwen2, gpt-oss, GLM-4)
    shexp_gate: bool = False  # a sigmoid gate on the shared expert (ffn_gate_inp_shexp)
    n_pos_per_embd: int = 1  # positions per token: 4 under M-RoPE (Qwen3.5, llama-hparams.cpp n_pos_per_embd)
    n_expert_groups_bias: bool = False  # DeepSeek-V3's exp_probs_b: selection on biased probabilities
    expert_weights_norm: bool = False  # the selected experts' weights renormalised (sum_rows, div)
    qk_norm: bool = False  # per-head q/k RMS norms (Qwen3, Gemma 3)

    def n_embd_k_gqa(self, il):
        return (self.head_k_swa if self.is_swa[il] else self.head_k) * self.n_head_kv[il]

    def n_embd_v_gqa(self, il):
        return (self.head_v_swa if self.is_swa[il] else self.head_v) * self.n_head_kv[il]

    @property
    def n_embd_r(self):
        """Conv state per sequence (llama-hparams.cpp n_embd_r, Mamba-2 / gated delta net)."""
        return (self.ssm_d_conv - 1 if self.ssm_d_conv > 0 else 0) * (self.ssm_d_inner + 2 * self.ssm_n_group * self.ssm_d_state)

    @property
    def n_embd_s(self):
        """Recurrent state per sequence (n_embd_s: ssm_d_state × ssm_d_inner)."""
        return self.ssm_d_state * self.ssm_d_inner

    @property
    def hybrid(self):
        return any(self.is_recr) and not all(self.is_recr)


def _arr(v, n, default=0):
    if v is None:
        return (default,) * n
    if isinstance(v, (list, tuple)):
        out = [int(x) for x in v][:n]
        return tuple(out + [out[-1] if out else default] * (n - len(out)))
    return (int(v),) * n


def hparams_of(model):
    """Hparams of a GGUFModel, as llama_model_base::load_hparams and the arch's load_arch_hparams read them."""
    m, arch = model, model.arch
    L = int(m.key("block_count") or 0)
    if L <= 0:
        raise ValueError(f"{m.source or 'GGUF'}: metadata has no {arch}.block_count")
    nextn = int(m.key("nextn_predict_layers") or 0)
    H = int(m.key("embedding_length"))
    emb = m.tensor("token_embd.weight")
    V = int(emb.shape[1]) if emb else int(m.key("vocab_size") or 0)
    n_head = _arr(m.key("attention.head_count"), L)
    n_head_kv = _arr(m.key("attention.head_count_kv"), L) if m.key("attention.head_count_kv") is not None else n_head
    n_ff = _arr(m.key("feed_forward_length"), L)
    h0 = n_head[0] or max(n_head) or 1
    head_k = int(m.key("attention.key_length") or (H // h0 if max(n_head) else 0))
    head_v = int(m.key("attention.value_length") or (H // h0 if max(n_head) else 0))
    head_k_swa = int(m.key("attention.key_length_swa") or head_k)
    head_v_swa = int(m.key("attention.value_length_swa") or head_v)
    n_rot = int(m.key("rope.dimension_count") or head_k)
    # sliding windows: src/models/{gemma2,gemma3,openai-moe,phi3}.cpp load_arch_hparams + load_swa_pattern
    is_swa = (False,) * L
    n_swa = int(m.key("attention.sliding_window") or 0)
    pattern = m.key("attention.sliding_window_pattern")
    default_pattern = {"gemma2": 2, "gpt-oss": 2, "gemma3": 6}.get(arch)
    if arch == "gemma2" and not n_swa:
        n_swa = 4096
    if default_pattern and n_swa > 0:
        if isinstance(pattern, list):
            is_swa = tuple(bool(x) for x in pattern[:L]) + (False,) * max(0, L - len(pattern))
        else:
            p = int(pattern or default_pattern)
            is_swa = tuple(p == 0 or i % p < p - 1 for i in range(L))
    else:
        n_swa = 0 if arch in ("phi3",) or not default_pattern else n_swa
    # recurrent layers: nemotron_h (no heads and no FFN), qwen3next / qwen35 (array or interval)
    is_recr = (False,) * L
    if arch in ("nemotron_h", "nemotron_h_moe"):
        is_recr = tuple(i < L - nextn and n_head_kv[i] == 0 and n_ff[i] == 0 for i in range(L))
    elif arch in ("qwen3next", "qwen35", "qwen35moe"):
        rl = m.key("attention.recurrent_layers")
        if isinstance(rl, list):
            is_recr = tuple(bool(x) for x in rl[:L]) + (False,) * max(0, L - len(rl))
        else:
            interval = int(m.key("full_attention_interval") or 4)
            is_recr = tuple(i < L - nextn and (i + 1) % interval != 0 for i in range(L))
    elif arch in ("mamba", "mamba2"):
        is_recr = (True,) * L
    n_expert = int(m.key("expert_count") or 0)
    n_ff_exp = int(m.key("expert_feed_forward_length") or 0)
    used = m.key("expert_used_count") or 0
    used = max(used) if isinstance(used, list) else int(used)
    if n_expert and not n_ff_exp:
        n_ff_exp = n_ff[0] // max(used, 1) if arch not in ("llama",) else n_ff[0]
    is_70b = (arch == "llama" and L == 80 and n_head[0] != n_head_kv[0]) or (arch == "qwen2" and L == 80)
    return Hparams(
        arch=arch, n_layer_all=L, n_layer=L - nextn, n_embd=H, n_vocab=V,
        n_ctx_train=int(m.key("context_length") or 0), n_head=n_head, n_head_kv=n_head_kv, n_ff=n_ff,
        head_k=head_k, head_v=head_v, head_k_swa=head_k_swa, head_v_swa=head_v_swa, is_swa=is_swa, n_swa=n_swa,
        is_recr=is_recr, n_expert=n_expert, n_expert_used=used, n_ff_exp=n_ff_exp,
        n_ff_shexp=int(m.key("expert_shared_feed_forward_length") or 0)
        or n_ff_exp * int(m.key("expert_shared_count") or 0),
        n_layer_dense_lead=int(m.key("leading_dense_block_count") or 0),
        is_mla=bool(m.key("attention.key_length_mla")) and bool(m.key("attention.value_length_mla")),
        kv_lora_rank=int(m.key("attention.kv_lora_rank") or 0), q_lora_rank=int(m.key("attention.q_lora_rank") or 0),
        head_k_mla=int(m.key("attention.key_length_mla") or 0), head_v_mla=int(m.key("attention.value_length_mla") or 0),
        n_rot=n_rot, ssm_d_conv=int(m.key("ssm.conv_kernel") or 0), ssm_d_inner=int(m.key("ssm.inner_size") or 0),
        ssm_d_state=int(m.key("ssm.state_size") or 0), ssm_n_group=int(m.key("ssm.group_count") or 0),
        ssm_dt_rank=int(m.key("ssm.time_step_rank") or 0), model_type_70b=is_70b,
        attn_bias=m.tensor("blk.0.attn_q.bias") is not None or any(t.name.endswith("attn_q.bias") for t in m.tensors[:64]),
        qk_norm=any(t.name.endswith("attn_q_norm.weight") for t in m.tensors),
        shexp_gate=any(t.name.endswith("ffn_gate_inp_shexp.weight") for t in m.tensors),
        n_pos_per_embd=4 if arch in ("qwen35", "qwen35moe", "qwen2vl", "qwen3vl", "qwen3vlmoe") else 1,
        n_expert_groups_bias=any(t.name.endswith("exp_probs_b.bias") for t in m.tensors),
        expert_weights_norm=bool(m.key("expert_weights_norm")),
    )


def quant_facts(hp):
    """What the quantizer reads of the model (llama-quant.cpp: hparams.n_expert, n_gqa() of layer 0, LLM_TYPE_70B)."""
    gqa = hp.n_head[0] // hp.n_head_kv[0] if hp.n_head_kv[0] else 0
    return {"n_expert": hp.n_expert, "n_gqa0": gqa, "is_70b": hp.model_type_70b, "n_layer_all": hp.n_layer_all}


# ------------------------------------------------------------------ from a config or a file to the GGUF llama.cpp loads

def model_for(source, dtype=None, name="config"):
    """The GGUFModel llama.cpp would load: a GGUFModel as is, or a config.json dict converted and quantized.

    dtype: a llama-quantize file type (q4_k_m, iq1_s, mxfp4_moe …), f16/bf16/f32, or None / "stored" for the
    converted file as convert_hf_to_gguf writes it."""
    from .convert import convert_config
    from .quantize import FTYPES, ftype_of, quantize_model
    from .recipes import RECIPES

    if isinstance(source, GGUFModel):
        if dtype not in (None, "", "stored"):
            raise ValueError(f"--dtype {dtype}: a GGUF file's tensors already have their types; leave --dtype out")
        return source
    src_dtype = None
    ftype = None
    recipe = RECIPES.get(str(dtype).lower()) if dtype else None
    if recipe:
        model = convert_config(source, None, name)
        return quantize_model(model, recipe["base"], quant_facts(hparams_of(model)), recipe["tensor_types"],
                              recipe.get("output_type"), recipe.get("embd_type"))
    if dtype not in (None, "", "stored"):
        ftype = ftype_of(dtype)
        if ftype in ("f16", "bf16", "f32"):
            src_dtype, ftype = ftype, None
    model = convert_config(source, src_dtype, name)
    if ftype is None or FTYPES[ftype][1] == model.tensors[0].ggml_type:
        return model
    return quantize_model(model, ftype, quant_facts(hparams_of(model)))


# ------------------------------------------------------------------ where each tensor goes

def layer_devices(n_layers, gpu_layers, gpus, tensor_split=None, legacy_start=False):
    """Device of each repeating layer and of the output layer (-1 = CPU). Source: llama-model.cpp load_tensors
    L1590-1610: `i_gpu_start = std::max(n_layer_all + 1 - n_gpu_layers, 0)` (the output layer is one of the -ngl);
    older builds had `std::max((int) hparams.n_layer - n_gpu_layers, 0)` (`legacy_start`)."""
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


def override_list(s):
    """The -ot list llama.cpp builds from the flags, in its order: -ot first, then --cpu-moe / --n-cpu-moe
    (common/arg.cpp L2754-2775 push back in command-line order; vramlab takes -ot first)."""
    out = list(s.overrides or ())
    if s.cpu_moe:
        out.append((FFN_EXPS_REGEX, "CPU"))
    for i in range(s.n_cpu_moe):
        out.append((rf"blk\.{i}{FFN_EXPS_REGEX}", "CPU"))
    return out


def _buffer_of(name, layer_dev, overrides):
    """Buffer ("CPU" / "CUDA<n>") of one tensor: an -ot match first (llama-model-loader.cpp L1235-1259), else its layer's device."""
    for pattern, buft in overrides:
        if re.search(pattern, name):
            return buft
    return "CPU" if layer_dev < 0 else f"CUDA{layer_dev}"


def _cuda_alloc_bytes(t):
    """ggml_backend_cuda_buffer_type_get_alloc_size (ggml-cuda.cu L903-920): quantized rows padded to 512 once."""
    size = t.nbytes
    if t.ggml_type not in ("F32", "F16", "BF16", "I32") and t.shape[0] % CUDA_MATRIX_ROW_PADDING:
        size += ggml_row_size(t.ggml_type, CUDA_MATRIX_ROW_PADDING - t.shape[0] % CUDA_MATRIX_ROW_PADDING)
    return size


_INPUT_TENSORS = ("token_embd.weight", "position_embd.weight", "token_types.weight", "per_layer_token_embd.weight")


def _skipped(t, hp, load_mtp=False):
    """Tensors the loader does not create: multi-token-prediction layers unless asked (TENSOR_SKIP)."""
    return not load_mtp and t.layer >= hp.n_layer and hp.n_layer < hp.n_layer_all


@dataclass(frozen=True)
class Placement:
    """Which buffer holds each loaded tensor, and the device of every layer."""

    layer_dev: tuple  # per repeating layer, -1 = CPU
    out_dev: int
    where: tuple  # (GGUFTensor, buffer name) per loaded tensor, in file order
    duplicated: tuple  # (GGUFTensor, buffer name): token_embd copied as the output of a tied model


def place(model, hp, s, gpus):
    """Placement of every tensor under settings `s` on `gpus` CUDA devices (0: CPU only)."""
    if s.split_mode == "none" and gpus:
        lay, out = layer_devices(hp.n_layer_all, s.gpu_layers, 1, None, s.legacy_layer_start)
        lay = [s.main_gpu if d >= 0 else -1 for d in lay]
        out = s.main_gpu if out >= 0 else -1
    else:
        lay, out = layer_devices(hp.n_layer_all, s.gpu_layers, gpus, s.tensor_split, s.legacy_layer_start)
    ovr = override_list(s) if gpus else []
    where = []
    for t in model.tensors:
        if _skipped(t, hp):
            continue
        if t.name in _INPUT_TENSORS:
            dev = -1
        elif t.layer >= 0:
            dev = lay[t.layer]
        elif t.name.startswith("rope_") or t.name.startswith("rope_freqs"):
            dev = lay[0]  # created by layer 0 (duplicated into the other layers' buffers, see below)
        else:
            dev = out
        where.append((t, "CPU" if t.name in _INPUT_TENSORS else _buffer_of(t.name, dev, ovr)))
    dup = []
    names = {t.name for t in model.tensors}
    emb = model.tensor("token_embd.weight")
    if emb is not None and "output.weight" not in names:
        # TENSOR_DUPLICATED: the tied output is token_embd created again in the output layer's buffer
        # (llama-model-loader.cpp L1370-1385: one copy per buffer type; none when it is the same buffer)
        ob = _buffer_of("output.weight", out, ovr) if gpus else "CPU"
        if ob != "CPU":
            dup.append((emb, ob))
    rope = [t for t in model.tensors if t.name in ("rope_freqs.weight", "rope_factors_long.weight",
                                                   "rope_factors_short.weight")]
    for t in rope:  # one per distinct layer buffer besides layer 0's
        seen = {"CPU" if lay[0] < 0 else f"CUDA{lay[0]}"}
        for d in lay:
            b = "CPU" if d < 0 else f"CUDA{d}"
            if b not in seen:
                seen.add(b)
                dup.append((t, b))
    return Placement(tuple(lay), out, tuple(where), tuple(dup))


def model_buffers(placement, gpus, use_mmap=False, row_split=None):
    """{buffer name: bytes} of the model buffers (ggml_backend_alloc_ctx_tensors_from_buft: each tensor padded).

    row_split: with -sm row, the proportions by which the CUDA split buffer type spreads each layer's matrix rows
    over the GPUs (llama-model.cpp make_gpu_buft_list puts it first in every GPU's list); approximated as exact
    proportions of the bytes (ggml-cuda rounds each device's row range, which this does not)."""
    out = {}
    host = []
    total = sum(row_split) if row_split else 0
    for t, b in list(placement.where) + list(placement.duplicated):
        if b == "CPU":
            host.append(t.nbytes)
        elif row_split and t.layer >= 0 and len(t.shape) >= 2 and t.name.endswith(".weight") and "_norm" not in t.name:
            size = _pad(_cuda_alloc_bytes(t), CUDA_ALIGNMENT)
            for g, share in enumerate(row_split):
                out[f"CUDA{g}"] = out.get(f"CUDA{g}", 0) + size * share // total
        else:
            out[b] = out.get(b, 0) + _pad(_cuda_alloc_bytes(t), CUDA_ALIGNMENT)
    if host:
        if use_mmap:  # one mapped range: tensors padded to the GGUF alignment (32) but the last
            out["CPU"] = sum(_pad(x, 32) for x in host[:-1]) + host[-1]
        else:
            out["CPU"] = sum(_pad(x, CPU_ALIGNMENT) for x in host)
    return out


# ------------------------------------------------------------------ the KV cache and recurrent states

def _unified(s):
    # llama_context_default_params: kv_unified false; Ollama's runners (and llama.cpp before the split KV
    # streams) keep one cache of num_ctx × num_parallel cells that every sequence attends over.
    return s.kv_unified if s.kv_unified is not None else s.engine == "ollama"


def kv_cells(settings):
    """(n_ctx cells, n_ctx_seq, n_ctx as asked): -c padded (llama.cpp) or num_ctx × num_parallel (Ollama). Source: llama-context.cpp L285-306."""
    s = settings
    n_seq = s.parallel if s.parallel > 0 else 4
    ctx = s.ctx
    if s.engine == "ollama" and s.ollama_version is not None:
        num_ctx, _, _, _ = ollama_defaults(s.ollama_version)
        ctx = (ctx or num_ctx) * n_seq
    elif s.engine == "ollama":
        ctx = (ctx or 4096) * n_seq
    elif ctx <= 0:
        raise ValueError(f"ctx {ctx}: llama.cpp needs the context size (-c) as a positive integer")
    n_ctx = _pad(ctx, s.kv_pad)
    if _unified(s):
        return n_ctx, n_ctx, ctx
    n_ctx_seq = _pad(n_ctx // n_seq, s.kv_pad)
    return n_ctx_seq * n_seq, n_ctx_seq, ctx


def swa_cells(hp, n_ctx_seq, n_seq, unified, ubatch, swa_full):
    """Cells of the sliding-window cache per stream (llama-kv-cache-iswa.cpp L69-81)."""
    if swa_full:
        return n_ctx_seq
    return _pad(min(n_ctx_seq, hp.n_swa * (n_seq if unified else 1) + ubatch), 256)


def _attn_layers(hp):
    """Layers with a KV cache: all but the recurrent ones (and for nemotron_h, only its attention layers)."""
    if hp.arch in ("nemotron_h", "nemotron_h_moe"):
        return [i for i in range(hp.n_layer) if not hp.is_recr[i] and hp.n_ff[i] == 0 and hp.n_head_kv[i] > 0]
    if any(hp.is_recr):
        return [i for i in range(hp.n_layer) if not hp.is_recr[i]]
    return list(range(hp.n_layer if hp.n_layer < hp.n_layer_all else hp.n_layer_all))


def kv_layer_bytes(hp, il, cells, n_stream, type_k, type_v, v_trans):
    """(K bytes, V bytes) of one layer's cache: [n_embd_k_gqa, cells, n_stream] (llama-kv-cache.cpp L164-235).

    MLA keeps K only (the compressed kv_lora_rank + rope row; V is a view of it)."""
    k = ggml_row_size(type_k, hp.n_embd_k_gqa(il)) * cells * n_stream
    if hp.is_mla:
        return k, 0
    nv = max(hp.n_embd_v_gqa(i) for i in range(hp.n_layer_all)) if v_trans else hp.n_embd_v_gqa(il)
    return k, ggml_row_size(type_v, nv) * cells * n_stream


# ------------------------------------------------------------------ the compute buffer: ggml-gallocr in miniature

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
        size = _pad(max(nbytes, 1), self.align)
        if name in self.at and self.users.get(name) == -1:  # an output under a reused name: it stays, renamed
            k = f"{name}@{len(self.at)}"
            self.at[k], self.users[k] = self.at.pop(name), self.users.pop(name)
        if name in self.at:
            raise AssertionError(f"replay bug: {name} allocated while still alive")
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

    def add_uses(self, name, k):
        if self.users.get(name, 0) > 0:
            self.users[name] += k


@dataclass(frozen=True)
class GraphShape:
    """What the reserve graph of one backend covers (tokens, cells, which layers, whether the output is here)."""

    n_tokens: int  # n_ubatch (≤ n_batch, ≤ n_ctx)
    n_kv: int  # cells one stream attends over in full-attention layers
    n_kv_swa: int  # … in sliding-window layers
    n_outputs: int  # rows of logits (n_ubatch at reserve); 0 when the output layer is elsewhere
    flash_attn: bool
    layers: tuple  # layer indices built on this backend
    with_embd: bool = True  # the input layer (token rows) is here
    n_seqs: int = 1  # sequences of the reserve ubatch (n_seq_max)
    n_stream: int = 1
    n_copies: int = 1  # pipeline parallelism: the scheduler keeps 4 copies of each input (ggml-backend.cpp L1411)
    kv_copies: tuple = ()  # (layer, K bytes, V bytes) of host caches whose attention this device runs (op offload)
    weight_copies: tuple = ()  # (layer, bytes): the largest host FFN weight of a layer this device runs; -1 output


def _attn_block(a, hp, g, il, x, arch):
    """Attention of one layer: norm → projections → scores or flash attention → output projection.
    Source: llama-graph.cpp build_attn / build_attn_mha (L2616-2750) and the arch's graph in src/models/."""
    T, H, f4 = g.n_tokens, hp.n_embd, 4
    swa = hp.is_swa[il]
    nkv = g.n_kv_swa if swa else g.n_kv
    nh = hp.n_head[il]
    if hp.is_mla:
        hd_q = hp.head_k_mla  # nope + rope
        hd_k = hp.head_k  # kv_lora_rank + rope (the cache row)
        hd_v = hp.kv_lora_rank  # attention runs in the compressed space; v_b decompresses after
        kvh = 1
    else:
        hd_q = hd_k = hp.head_k_swa if swa else hp.head_k
        hd_v = hp.head_v_swa if swa else hp.head_v
        kvh = hp.n_head_kv[il]
    a.new("norm", H * T * f4)
    a.use(x)
    a.new("normw", H * T * f4, uses=3, inplace_of="norm")
    fused_qkv = arch in ("phi3", "gpt2", "starcoder", "gptneox")
    if fused_qkv:
        a.users["normw"] = 1  # one matmul reads it
    if hp.is_mla:
        # src/models/deepseek2.cpp (is_mla): q (via q_a, its norm and q_b with q-LoRA), q_nope × k_b (absorbed),
        # rope of q_pe, concat; kv_a_mqa, the norm of its compressed part, rope of k_pe, concat into the cache row
        a.users["normw"] = 2  # q (or q_a) and kv_a_mqa read it
        if hp.q_lora_rank:
            a.new("qa", hp.q_lora_rank * T * f4)
            a.use("normw")
            a.new("qan", hp.q_lora_rank * T * f4)  # rms_norm (a new tensor: q_a is read by it only once? no: in place)
            a.use("qa")
            a.new("q", nh * hd_q * T * f4, uses=2)
            a.use("qan")
        else:
            a.new("q", nh * hd_q * T * f4, uses=2)
            a.use("normw")
        a.new("qnope_abs", hp.kv_lora_rank * nh * T * f4)  # q_nope × k_b (absorbed)
        a.use("q")
        a.new("qpe", hp.n_rot * nh * T * f4)  # rope of the q_pe view
        a.use("q", "inp_pos")
        a.new("qcat", (hp.kv_lora_rank + hp.n_rot) * nh * T * f4)
        a.use("qnope_abs", "qpe")
        a.new("kva", hd_k * T * f4, uses=2)  # kv_a_mqa: [kv_lora_rank + rope, T]
        a.use("normw")
        a.new("kvn", hp.kv_lora_rank * T * f4)  # rms_norm of the compressed view, × weight in place
        a.use("kva")
        a.new("kpe", hp.n_rot * T * f4)  # rope of the k_pe view
        a.use("kva", "inp_pos")
        a.new("kcat", hd_k * T * f4)
        a.use("kvn", "kpe")
        a.use("kcat", "k_idxs")
        q_name = "qcat"
    else:
        widths = (("q", nh * hd_q), ("v", kvh * hd_v), ("k", kvh * hd_k))  # build_attn expands q, v, k
        if fused_qkv:
            # llama-graph.cpp build_qkv L1663-1700: one matmul (+ bias in place); Q, K, V are views of it, roped
            # into new tensors (a view is never overwritten in place); V goes to the cache from the view
            a.new("qkv", sum(w for _, w in widths) * T * f4, uses=3)
            a.use("normw")
            if hp.attn_bias:
                a.new("qkvb", sum(w for _, w in widths) * T * f4, uses=3, inplace_of="qkv")
                a.at["qkv"], a.users["qkv"] = a.at.pop("qkvb"), a.users.pop("qkvb")
            for name, width in widths:
                if name != "v" and hp.n_rot:
                    a.new(name + "r", width * T * f4)
                    a.use("qkv", "inp_pos")
            a.use("kr" if hp.n_rot else "qkv", "k_idxs", "qkv", "v_idxs")
            q_name = "qr" if hp.n_rot else "qkv"
            if not hp.n_rot:
                a.add_uses("qkv", 1)  # Q, the view, is read by the scores
        else:
            for name, width in widths:
                a.new(name, width * T * f4)
                a.use("normw")
                if hp.attn_bias:
                    a.new(name + "b", width * T * f4, inplace_of=name)
                    a.new(name, width * T * f4, inplace_of=name + "b")
                if name != "v" and hp.qk_norm:  # q_norm / k_norm: RMS norm of the reshaped view, × weight
                    a.new(name + "n", width * T * f4)
                    a.use(name)
                    a.new(name, width * T * f4, inplace_of=name + "n")
                if name != "v" and hp.n_rot:
                    a.new(name + "r", width * T * f4)  # rope of a reshaped view: measured not in place
                    a.use(name, "inp_pos")
            a.use("kr" if hp.n_rot else "k", "k_idxs", "v", "v_idxs")  # ggml_set_rows into the cache
            q_name = "qr" if hp.n_rot else "q"
    mask = "kq_mask_swa" if swa else "kq_mask"
    copied = {c[0]: c[1:] for c in g.kv_copies}.get(il)
    if copied:  # a host cache read by this device: its K (and V) views copied in at the split's start
        a.new("k_copy", copied[0])
        if copied[1]:
            a.new("v_copy", copied[1])
    if g.flash_attn:
        a.new("att", hd_v * nh * T * f4)  # flash_attn_ext output [hd, n_head, T]; reshape_2d is a view
        a.use(q_name, mask)
        if copied:
            a.use("k_copy", *(("v_copy",) if copied[1] else ()))
    else:
        a.new("kq", nkv * T * nh * f4)
        a.use(q_name, *(("k_copy",) if copied and copied[1] else ()))
        a.new("kqs", nkv * T * nh * f4, inplace_of="kq")  # soft_max_ext in place
        a.use(mask)
        a.new("kqv", hd_v * T * nh * f4)
        a.use("kqs", *((("v_copy",) if copied[1] else ("k_copy",)) if copied else ()))  # MLA: V is K's view
        a.new("att", nh * hd_v * T * f4)  # cont of the permuted kqv
        a.use("kqv")
    if hp.is_mla:
        a.new("att_v", hp.head_v_mla * nh * T * f4)  # v_b decompression (llama-graph.cpp build_attn_mha v_mla)
        a.use("att")
        if g.flash_attn:
            a.new("att_c", hp.head_v_mla * nh * T * f4)  # cont of its permutation
            a.use("att_v")
            a.at["att_v"], a.users["att_v"] = a.at.pop("att_c"), a.users.pop("att_c")
        a.new("o", H * T * f4)
        a.use("att_v")
    else:
        a.new("o", H * T * f4)
        a.use("att")
    return "o"


def _is_moe_layer(hp, il):
    return bool(hp.n_expert) and il >= hp.n_layer_dense_lead


def _ffn_readers(hp, il, arch):
    """How many matmuls read the FFN's input (it is freed after the last)."""
    if _is_moe_layer(hp, il):
        return 3 + (2 + hp.shexp_gate if hp.n_ff_shexp else 0)  # router, up, gate (+ the shared expert's)
    gated = arch not in ("gpt2", "starcoder", "gptneox", "nemotron_h")
    return 2 if gated and arch not in ("phi3", "glm4") else 1


def _ffn_block(a, hp, g, il, x, rows, arch):
    """Feed-forward of one layer: dense (gated or not) or mixture of experts (+ shared expert)."""
    H, f4 = hp.n_embd, 4
    if _is_moe_layer(hp, il):
        # llama-graph.cpp build_moe_ffn L2007-2370: router logits, probabilities, top-k (a view of the argsort),
        # the selected experts' weights, then up / gate / activation / down over [n_ff_exp, k, n_tokens]
        E, k, ff = hp.n_expert, hp.n_expert_used, hp.n_ff_exp
        a.new("logits", E * rows * f4)
        a.use(x)
        a.new("probs", E * rows * f4, uses=2, inplace_of="logits")  # soft_max / sigmoid in place
        sel = "probs"
        if arch == "deepseek2" and hp.n_expert_groups_bias:
            a.new("sel", E * rows * f4)  # probs + exp_probs_b: a new tensor, probs is read again
            a.use("probs")
            sel = "sel"
        a.new("argsort", E * rows * 4, uses=1)  # argsort_top_k: the top-k is a view of it
        a.use(sel)
        a.add_uses("argsort", 3)  # read by get_rows and the three expert matmuls
        a.new("w", k * rows * f4)
        a.use("probs", "argsort")
        if hp.expert_weights_norm:
            a.new("wsum", rows * f4)
            a.new("wn", k * rows * f4, inplace_of="w")
            a.use("wsum")
        # graph order (GGML_SCHED_DEBUG=2 on the CPU): gate, up, their GLU, down — swiglu's sources expand in order
        a.new("gate", ff * k * rows * f4)
        a.use(x, "argsort")
        a.new("up", ff * k * rows * f4)
        a.use(x, "argsort")
        a.new("act", ff * k * rows * f4)
        a.use("gate", "up")
        a.new("down", H * k * rows * f4)
        a.use("act", "argsort")
        a.new("wd", H * k * rows * f4, inplace_of="down")  # × weights, in place
        a.use("wn" if hp.expert_weights_norm else "w")
        a.new("moe", H * rows * f4)  # the first add of the per-expert views; the others add in place
        a.use("wd")
        out = "moe"
        if hp.n_ff_shexp:
            if hp.shexp_gate:  # qwen2moe / qwen3next: sigmoid(ffn_gate_inp_shexp · x) scales the shared expert
                a.new("sg", rows * f4)
                a.use(x)
            a.new("sgate", hp.n_ff_shexp * rows * f4)
            a.use(x)
            a.new("sup", hp.n_ff_shexp * rows * f4)
            a.use(x)
            a.new("sact", hp.n_ff_shexp * rows * f4)
            a.use("sgate", "sup")
            a.new("sdown", H * rows * f4)
            a.use("sact")
            if hp.shexp_gate:
                a.new("sdg", H * rows * f4, inplace_of="sdown")
                a.use("sg")
                a.at["sdown"], a.users["sdown"] = a.at.pop("sdg"), a.users.pop("sdg")
            a.new("ffo", H * rows * f4, inplace_of="moe")
            a.use("sdown")
            out = "ffo"
        return out
    ff = hp.n_ff[il]
    gated = arch not in ("gpt2", "starcoder", "gptneox", "nemotron_h")
    fused_up = arch in ("phi3", "glm4")
    if gated and fused_up:
        a.new("upg", 2 * ff * rows * f4)
        a.use(x)
        a.new("act", ff * rows * f4)
        a.use("upg")
    elif gated:
        a.new("gate", ff * rows * f4)
        a.use(x)
        a.new("up", ff * rows * f4)
        a.use(x)
        a.new("act", ff * rows * f4)
        a.use("gate", "up")
    else:
        a.new("up", ff * rows * f4)
        a.use(x)
        a.new("act", ff * rows * f4, inplace_of="up")
    a.new("down", H * rows * f4)
    a.use("act")
    return "down"


def graph_inputs(hp, g):
    """The reserve graph's inputs, in the order they are built: (name, bytes, consumers). Tokens and the
    vector-embeddings input (llama-graph.cpp build_inp_embd L2376-2463), positions, the KV row indices (one per
    value for a transposed V cache), the KQ masks — f32, f16 with flash attention — one per cache, the recurrent
    state copies, the output ids. On a GPU they all live in the host's compute buffer (graph inputs go to the
    CPU backend, ggml-backend.cpp L944-949) and each device holds a copy of those its layers read."""
    T = g.n_tokens
    attn_layers = [il for il in g.layers if not hp.is_recr[il] and (hp.n_head_kv[il] or hp.is_mla)]
    out = []
    if g.with_embd:
        out += [("inp_tokens", 4 * T, 1), ("inp_embd", hp.n_embd * T * 4, 0)]
    if attn_layers:
        if hp.n_rot:
            out.append(("inp_pos", 4 * T * hp.n_pos_per_embd, 2 * len(attn_layers)))
        out.append(("k_idxs", 8 * T, len(attn_layers)))
        if not hp.is_mla:
            vk = max(hp.n_embd_v_gqa(il) for il in attn_layers)
            out.append(("v_idxs", 8 * T * (1 if g.flash_attn else vk), len(attn_layers)))
        n_swa_layers = sum(1 for il in attn_layers if hp.is_swa[il])
        if n_swa_layers < len(attn_layers):
            out.append(("kq_mask", g.n_kv * T * (2 if g.flash_attn else 4), len(attn_layers) - n_swa_layers))
        if n_swa_layers:
            out.append(("kq_mask_swa", g.n_kv_swa * T * (2 if g.flash_attn else 4), n_swa_layers))
    if any(hp.is_recr[il] for il in g.layers):
        out.append(("inp_s_copy", 4 * g.n_seqs, 1 << 20))
    if g.n_outputs:
        out.append(("out_ids", 4 * g.n_outputs, 2))
    return out


def compute_buffer_estimate(hp, g, align=CPU_ALIGNMENT, arch=None):
    """Bytes ggml-gallocr reserves for the worst-case graph of `g.layers` + (when here) the output.

    Replays the reserve graph (n_tokens = n_ubatch tokens against n_kv cells per stream) node by node in graph
    order through `_Gallocr`: the inputs first (tokens, the vector-embeddings input, positions, KV row indices
    — one per value for a transposed V cache —, the KQ masks f32 (f16 with flash attention), one per cache,
    output ids), per layer the attention (or the recurrent mixer) and the FFN, then the logits
    n_vocab × n_outputs f32 (an output, never reused)."""
    arch = arch or hp.arch
    T, H, f4 = g.n_tokens, hp.n_embd, 4
    L = len(g.layers)
    attn_layers = [il for il in g.layers if not hp.is_recr[il] and (hp.n_head_kv[il] or hp.is_mla)]
    a = _Gallocr(align)
    for name, nbytes, uses in graph_inputs(hp, g):
        if g.n_copies > 1 and not g.with_embd:
            # pipeline parallelism (ggml-backend.cpp L1376-1386, L1563-1590): every input this device's splits
            # take from another backend is held in n_copies copies, outputs that gallocr never frees
            for c in range(g.n_copies):
                a.new(name if c == 0 else f"{name}#{c}", nbytes, output=True)
        else:
            a.new(name, nbytes, uses=uses, output=name == "inp_embd")
    if g.n_copies > 1 and not g.with_embd:
        for c in range(1, g.n_copies):
            a.new(f"x#{c}", H * T * f4, output=True)
    a.new("x", H * T * f4, uses=2, output=g.n_copies > 1 and not g.with_embd)
    if g.with_embd:
        a.use("inp_tokens")
    wcopy = dict(g.weight_copies)
    for n, il in enumerate(g.layers):
        last = n == L - 1 and g.n_outputs
        if hp.is_recr[il]:
            _recurrent_block(a, hp, g, il, "x")
            a.new("o", H * T * f4)
            a.use("mix")
        elif hp.n_head_kv[il] or hp.is_mla:
            _attn_block(a, hp, g, il, "x", arch)
        else:  # nemotron_h MLP-only layer
            a.new("norm", H * T * f4)
            a.use("x")
            a.new("normw", H * T * f4, uses=_ffn_readers(hp, il, arch), inplace_of="norm")
            if il in wcopy:
                a.new("w_copy", wcopy[il])
            _ffn_block(a, hp, g, il, "normw", T, arch)
            if il in wcopy:
                a.use("w_copy")
            a.new("o", H * T * f4)
            a.use("down")
            a.new("x2", H * T * f4, uses=2, inplace_of="o")
            a.use("x")
            a.at["x"], a.users["x"] = a.at.pop("x2"), a.users.pop("x2")
            continue
        if last:  # ggml_get_rows(cur, inp_out_ids), ggml_get_rows(inpSA, inp_out_ids)
            a.new("o2", H * g.n_outputs * f4)
            a.use("o", "out_ids")
            a.new("x2", H * g.n_outputs * f4)
            a.use("x", "out_ids")
            a.new("res", H * g.n_outputs * f4, uses=2, inplace_of="o2")
            a.use("x2")
            rows = g.n_outputs
        else:
            a.new("res", H * T * f4, uses=2, inplace_of="o")
            a.use("x")
            rows = T
        if arch == "nemotron_h" and not hp.n_ff[il]:
            a.at["x"], a.users["x"] = a.at.pop("res"), a.users.pop("res")
            continue
        a.new("fn", H * rows * f4)
        a.use("res")
        a.new("fnw", H * rows * f4, uses=_ffn_readers(hp, il, arch), inplace_of="fn")
        if il in wcopy:  # op offload: one host weight at a time is copied in for its op (held here over the FFN)
            a.new("w_copy", wcopy[il])
        out = _ffn_block(a, hp, g, il, "fnw", rows, arch)
        if il in wcopy:
            a.use("w_copy")
        a.new("x", H * rows * f4, uses=2, inplace_of=out)
        a.use("res")
    if g.n_outputs:
        a.new("onorm", H * g.n_outputs * f4)
        a.use("x", "x")
        a.new("result_norm", H * g.n_outputs * f4, inplace_of="onorm", output=True)
        if -1 in wcopy:
            a.new("w_copy", wcopy[-1])
        a.new("result_output", hp.n_vocab * g.n_outputs * f4, output=True)
        if -1 in wcopy:
            a.use("w_copy")
    return a.max


def _recurrent_block(a, hp, g, il, x):
    """A Mamba-2 / gated-delta-net mixer: input projection, conv over the states, scan, gated norm, output."""
    T, H, f4 = g.n_tokens, hp.n_embd, 4
    d_inner, conv_dim = hp.ssm_d_inner, hp.ssm_d_inner + 2 * hp.ssm_n_group * hp.ssm_d_state
    a.new("norm", H * T * f4)
    a.use(x)
    a.new("normw", H * T * f4, uses=2, inplace_of="norm")
    a.new("zxbcdt", (d_inner + conv_dim + hp.ssm_dt_rank) * T * f4)
    a.use("normw")
    a.new("conv_x", (conv_dim * (T + hp.ssm_d_conv - 1)) * f4)
    a.new("conv", conv_dim * T * f4)
    a.use("conv_x")
    a.new("y", (d_inner * T + hp.n_embd_s * g.n_seqs) * f4)
    a.use("conv", "zxbcdt")
    a.new("mix", d_inner * T * f4)
    a.use("y", "normw")


# ------------------------------------------------------------------ the prediction

def predict_llamacpp(source, dtype_or_settings=None, settings=None):
    """Every buffer llama.cpp (or Ollama) allocates (bytes).

    predict_llamacpp(model, settings) with a GGUFModel, or predict_llamacpp(config_or_shape, dtype, settings)
    with a config.json dict (or a catalog ModelShape, read back to its config) to convert and quantize."""
    if settings is None and isinstance(dtype_or_settings, LlamaCppSettings):
        settings, dtype = dtype_or_settings, None
    else:
        dtype = dtype_or_settings
    s = settings or LlamaCppSettings()
    model = model_for(_config_of(source) if not isinstance(source, (GGUFModel, dict)) else source, dtype,
                      getattr(source, "name", "config"))
    return predict_model(model, s)


def _config_of(shape):
    """The config.json behind a ModelShape (catalog name, cut to its layer count)."""
    from ..catalog import load_config

    name = shape.name.split("[:")[0]
    cfg = dict(load_config(name))
    if cfg.get("num_hidden_layers") != shape.n_layers:
        cfg = cut_config(cfg, shape.n_layers)
    return cfg


def cut_config(cfg, n_layers):
    """A config with its first n_layers decoder layers (per-layer lists cut alike); every shape otherwise real."""
    cfg = dict(cfg)
    key = "n_layer" if "n_layer" in cfg else "num_hidden_layers"
    cfg[key] = n_layers
    for k in ("layer_types", "no_rope_layers"):
        if isinstance(cfg.get(k), list):
            cfg[k] = cfg[k][:n_layers]
    if isinstance(cfg.get("hybrid_override_pattern"), str):
        cfg["hybrid_override_pattern"] = cfg["hybrid_override_pattern"][:n_layers]
    if "first_k_dense_replace" in cfg and cfg["first_k_dense_replace"]:
        cfg["first_k_dense_replace"] = min(cfg["first_k_dense_replace"], max(n_layers - 1, 0))
    cfg.pop("max_window_layers", None)
    return cfg


def _check(s):
    if s.engine not in ("llama.cpp", "ollama"):
        raise ValueError(f"engine {s.engine!r}: allowed llama.cpp, ollama")
    if s.device not in ("cuda", "cpu"):
        raise ValueError(f"device {s.device!r}: allowed cuda, cpu")
    for name, v in (("kv_dtype", s.kv_dtype), ("kv_dtype_v", s.kv_dtype_v or s.kv_dtype)):
        if v not in _KV_TYPES:
            raise ValueError(f"{name} {v!r}: allowed {', '.join(_KV_TYPES)}")
    if s.ubatch <= 0 or s.batch <= 0 or s.parallel < 0:
        raise ValueError(f"ubatch {s.ubatch}, batch {s.batch}, parallel {s.parallel}: must be positive")
    if s.gpu_layers != "all" and (not isinstance(s.gpu_layers, int) or s.gpu_layers < 0):
        raise ValueError(f"gpu_layers {s.gpu_layers!r}: a non-negative integer or 'all'")
    if s.split_mode not in ("layer", "row", "none"):
        raise ValueError(f"split_mode {s.split_mode!r}: allowed layer, row, none")
    if s.n_cpu_moe < 0:
        raise ValueError(f"n_cpu_moe {s.n_cpu_moe}: must be ≥ 0")
    gpus = 0 if s.device == "cpu" else s.gpus
    if s.device == "cuda" and gpus < 1:
        raise ValueError(f"gpus {s.gpus}: at least 1 on device cuda")
    for pattern, buft in s.overrides or ():
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"-ot {pattern}={buft}: not a regular expression ({e})") from None
        if buft != "CPU" and not (buft.startswith("CUDA") and buft[4:].isdigit() and int(buft[4:]) < max(gpus, 1)):
            raise ValueError(f"-ot {pattern}={buft}: buffer type must be CPU or CUDA0…CUDA{max(gpus, 1) - 1}")
    return gpus


def predict_model(model, s):
    """Every buffer llama.cpp allocates for a GGUFModel under settings `s`."""
    gpus = _check(s)
    hp = hparams_of(model)
    flash = s.flash_attn
    if flash is None:
        flash = True  # LLAMA_FLASH_ATTN_TYPE_AUTO resolves to enabled on CPU and CUDA (llama-context.cpp L557)
    if s.engine == "ollama" and s.ollama_version is not None and not flash:
        flash = ollama_defaults(s.ollama_version)[2]
    type_k, type_v = _KV_TYPES[s.kv_dtype], _KV_TYPES[s.kv_dtype_v or s.kv_dtype]
    if type_v not in ("F16", "F32", "BF16") and not flash:
        raise ValueError(f"kv_dtype {s.kv_dtype_v or s.kv_dtype}: a quantized V cache requires flash attention "
                         "(llama.cpp refuses it without)")
    notes = []
    pl = place(model, hp, s, gpus)
    row = None
    if s.split_mode == "row" and gpus > 1:
        row = tuple(int(x * 1000) for x in (s.tensor_split or (1,) * gpus))
        notes.append("-sm row: matrix rows spread over the GPUs in proportion (ggml-cuda's rounding of row ranges "
                     "not modelled)")
    bufs = model_buffers(pl, gpus, s.use_mmap, row)
    n_ctx, n_ctx_seq, n_ctx_asked = kv_cells(s)
    n_seq = s.parallel if s.parallel > 0 else 4
    unified = _unified(s)
    n_stream = 1 if unified else n_seq
    T = min(s.ubatch, s.batch, n_ctx_asked)
    swa = swa_cells(hp, n_ctx_seq, n_seq, unified, T, s.swa_full) if any(hp.is_swa) else 0
    kv_dev = {}
    v_trans = not flash
    for il in _attn_layers(hp):
        cells = swa if hp.is_swa[il] else n_ctx_seq
        k, v = kv_layer_bytes(hp, il, cells, n_stream, type_k, type_v, v_trans)
        d = pl.layer_dev[il] if s.offload_kqv else -1
        kv_dev[d] = kv_dev.get(d, 0) + k + v
    rs_dev = {}
    rows = max(1, n_seq) * (1 + s.n_rs_seq)
    for il in range(hp.n_layer):
        if hp.is_recr[il]:
            d = pl.layer_dev[il] if s.offload_kqv else -1
            rs_dev[d] = rs_dev.get(d, 0) + (hp.n_embd_r + hp.n_embd_s) * 4 * rows
    gsh = dict(n_tokens=T, n_kv=n_ctx_seq, n_kv_swa=swa or n_ctx_seq, flash_attn=flash, n_seqs=n_seq,
               n_stream=n_stream)
    gpu_compute = [0] * gpus
    lay = pl.layer_dev
    if gpus == 0:
        host_compute = compute_buffer_estimate(hp, GraphShape(n_outputs=T, layers=tuple(range(hp.n_layer)), **gsh))
    else:
        host_layers = tuple(i for i in range(hp.n_layer) if lay[i] < 0)
        out_host = pl.out_dev < 0
        # ggml-backend.cpp L951-990 with ggml-cuda.cu L5636-5655: with op offload (the default), an op whose weight
        # is in host memory runs on the first GPU when its batch is ≥ 32 tokens; the ops around it follow it there
        # (the scheduler's expansion passes), so a host layer is computed on CUDA0 and the host keeps the inputs
        offload = s.op_offload and T >= 32
        # llama-context.cpp L428-457: pipeline parallelism (4 copies of every input) with several GPUs, every layer
        # and the output on them, layer split, KV offloaded and no tensor overrides
        pp = (gpus > 1 and s.split_mode == "layer" and s.offload_kqv and not host_layers and not out_host
              and not (s.overrides or s.cpu_moe or s.n_cpu_moe))
        n_copies = 4 if pp else 1
        if (host_layers or out_host) and not offload:
            host_compute = compute_buffer_estimate(hp, GraphShape(n_outputs=T if out_host else 0, layers=host_layers
                                                                  or (hp.n_layer - 1,), **gsh))
        else:
            full = GraphShape(n_outputs=T, layers=tuple(range(hp.n_layer)), **gsh)
            host_compute = n_copies * sum(_pad(b, CPU_ALIGNMENT) for _, b, _ in graph_inputs(hp, full))
            host_compute += _pad(hp.n_embd * T * 4, CPU_ALIGNMENT)  # the token rows (get_rows stays on the CPU)
            cur = [_pad(hp.n_embd_k_gqa(il) * T * 4, CPU_ALIGNMENT) + _pad(hp.n_embd_v_gqa(il) * T * 4, CPU_ALIGNMENT)
                   for il in host_layers if il in _attn_layers(hp)]
            host_compute += max(cur, default=0)  # a host layer's K and V rows, copied back to store into its cache
        attn = set(_attn_layers(hp))
        for gi in range(gpus):
            layers = tuple(i for i in range(hp.n_layer) if lay[i] == gi)
            extra = host_layers if offload and gi == 0 else ()
            here = pl.out_dev == gi or (offload and gi == 0 and out_host)
            kv_copies = tuple((il, *kv_layer_bytes(hp, il, swa if hp.is_swa[il] else n_ctx_seq, n_stream, type_k,
                                                   type_v, v_trans)) for il in extra if il in attn)
            every = tuple(sorted(extra + layers))
            wc = _host_weight_copies(pl, hp) if offload and gi == 0 else ()
            if every or here:
                gpu_compute[gi] = compute_buffer_estimate(
                    hp, GraphShape(n_outputs=T if here else 0, layers=every or (hp.n_layer - 1,), with_embd=False,
                                   n_copies=n_copies, kv_copies=kv_copies, weight_copies=wc, **gsh), CUDA_ALIGNMENT)
            if wc and gi == 0:
                # the expert ops of layers on the other GPUs whose weights are in host memory run on CUDA0 as well
                # (the first backend that takes the op), at a time CUDA0's own activations are gone
                own = set(every)
                g0 = GraphShape(n_outputs=0, layers=(0,), with_embd=False, **gsh)
                foreign = [_offloaded_ffn_bytes(hp, g0, il, b) for il, b in wc if il >= 0 and il not in own]
                gpu_compute[0] = max([gpu_compute[0], *foreign])
            if wc:
                notes.append(f"CUDA0 runs the big-batch ops of host-resident weights, holding a copy of one at a time "
                             f"(up to {max(b for _, b in wc) / MIB:.0f} MiB; op offload, --no-op-offload avoids it)")
        if pp:
            notes.append("pipeline parallelism: each GPU and the host hold 4 copies of their graph inputs "
                         "(llama-context.cpp L428-457)")
        notes.append("CUDA compute buffers: the CPU replay of the reserve graph per device, not calibrated on a GPU")
    host_kv = kv_dev.pop(-1, 0)
    host_rs = rs_dev.pop(-1, 0)
    return LlamaCppBuffers(
        engine=s.engine, llama_cpp_version=LLAMA_VERSION, kv_cells=n_ctx, n_ctx_seq=n_ctx_seq,
        model_buffer_bytes=[bufs.get(f"CUDA{g}", 0) for g in range(gpus)], host_model_buffer_bytes=bufs.get("CPU", 0),
        kv_buffer_bytes=[kv_dev.get(g, 0) for g in range(gpus)], host_kv_buffer_bytes=host_kv,
        compute_buffer_bytes=gpu_compute, host_compute_buffer_bytes=host_compute,
        layers_per_gpu=[sum(1 for d in lay[:hp.n_layer] if d == g) for g in range(gpus)], notes=notes, arch=hp.arch,
        swa_cells=swa * n_stream if swa else 0, rs_buffer_bytes=[rs_dev.get(g, 0) for g in range(gpus)],
        host_rs_buffer_bytes=host_rs, model_tensor_bytes=sum(t.nbytes for t, _ in pl.where),
        host_mapped=s.use_mmap, output_buffer_bytes=hp.n_vocab * 4 * n_seq,
    )


def _offloaded_ffn_bytes(hp, g, il, weight_bytes):
    """CUDA0's buffer while it runs layer `il`'s FFN for another device: the normed input copied in, the host
    weight's copy and the FFN's intermediates (the replay of one FFN block)."""
    a = _Gallocr(CUDA_ALIGNMENT)
    a.new("fnw", hp.n_embd * g.n_tokens * 4, uses=_ffn_readers(hp, il, hp.arch))
    a.new("w_copy", weight_bytes)
    _ffn_block(a, hp, g, il, "fnw", g.n_tokens, hp.arch)
    return a.max


def _host_weight_copies(pl, hp):
    """(layer, bytes) of the largest host-resident FFN weight of each layer whose ops a GPU runs, and (-1, bytes)
    for a host output matrix. Each such op starts a split of its own so that the previous copy's memory is reused
    (ggml-backend.cpp L1324-1342): one copy at a time, of the tensor's full layout (MUL_MAT_ID copies only the
    used experts, into a buffer sized for all of them). token_embd is read by get_rows, which stays on the CPU
    (ggml-cuda.cu L5638); host attention weights are copied too, at ops below the attention's peak (not held)."""
    out = {}
    for t, b in pl.where:
        if b != "CPU" or len(t.shape) < 2 or t.name.startswith("token_embd"):
            continue
        key = t.layer if t.layer >= 0 and ".ffn_" in t.name else (-1 if t.name.startswith("output") else None)
        if key is not None:
            out[key] = max(out.get(key, 0), _pad(_cuda_alloc_bytes(t), CUDA_ALIGNMENT))
    return tuple(sorted(out.items()))


def log_lines(result, use_mmap=None):
    """The buffer lines llama.cpp prints (format of llama.cpp @0c1e57098: `%12s model buffer size = %8.2f MiB`)."""
    r = result
    mapped = r.host_mapped if use_mmap is None else use_mmap
    host = "CPU_Mapped" if mapped else "CPU"
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
    for g, b in enumerate(r.rs_buffer_bytes or ()):
        if b:
            lines.append(f"llama_memory_recurrent: {'CUDA%d' % g:>10} RS buffer size = {b / MIB:8.2f} MiB")
    if r.host_rs_buffer_bytes:
        lines.append(f"llama_memory_recurrent: {'CPU':>10} RS buffer size = {r.host_rs_buffer_bytes / MIB:8.2f} MiB")
    for g, b in enumerate(r.compute_buffer_bytes):
        if b:
            lines.append(f"sched_reserve: {'CUDA%d' % g:>10} compute buffer size = {b / MIB:8.2f} MiB")
    host_c = "CPU" if not r.model_buffer_bytes else "CUDA_Host"
    lines.append(f"sched_reserve: {host_c:>10} compute buffer size = {r.host_compute_buffer_bytes / MIB:8.2f} MiB")
    return lines
