"""`vramlab predict|plan --engine llama.cpp|ollama`: the model as llama.cpp loads it, placed by the flags, by --fit,
or by Ollama's scheduler; every buffer per device and in host RAM.

The model is a GGUF header: `--model path.gguf` (split files found from any part), `--model ORG/REPO --gguf FILE`
(the Hub, range requests of the headers only), or a config.json (catalog name, path, Hub id) converted and
quantized as llama.cpp's tools would (`--dtype`, default Q4_K_M: Ollama's default tag and llama.cpp's `-hf`
default; a checkpoint that ships MXFP4 experts, gpt-oss, keeps them). No torch, no weights.
"""

import json
import os

from formulas.units import GiB, parse_size

MiB = 1 << 20
ENGINE_DEFAULT_DTYPE = "q4_k_m"  # common/arg.cpp L3061 (-hf: "default to Q4_K_M"); Ollama's library tags


def _gib(n):
    return f"{n / GiB:.2f}"


# ------------------------------------------------------------------ the model

def _asked_dtype(a):
    """--dtype as given, or None when it was left out (the engine's default applies)."""
    from .common import DefaultDtype

    return None if a.dtype is None or isinstance(a.dtype, DefaultDtype) else a.dtype


def engine_model(a):
    """(GGUFModel, label, how it was obtained) for --model / --gguf / --dtype."""
    from formulas.engines.llamacpp import model_for

    from ..engines import gguf_io

    model = a.model
    asked = _asked_dtype(a)
    if getattr(a, "gguf", None):
        from ..hub import split_id

        parsed = split_id(model)
        if parsed is None:
            raise ValueError(f"--gguf {a.gguf}: give the Hub repo as --model ORG/NAME")
        if asked:
            raise ValueError(f"--dtype {asked}: a GGUF file's tensors already have their types; leave --dtype out")
        repo, rev = parsed
        m = gguf_io.read_hub(repo, a.gguf, rev)
        return m, f"{repo}/{a.gguf}", "GGUF header (Hub, range requests)"
    if model.lower().endswith(".gguf"):
        if asked:
            raise ValueError(f"--dtype {asked}: a GGUF file's tensors already have their types; leave --dtype out")
        if not os.path.exists(model) and not os.path.exists(_first_split(model)):
            raise ValueError(f"--model {model}: no such GGUF file")
        return gguf_io.read_local(model), model, "GGUF header (local file)"
    from formulas.catalog import load_config

    from ..hub import resolve_model

    path = resolve_model(model)
    cfg = load_config(path)
    dtype = asked
    if not dtype:
        qc = cfg.get("quantization_config") or {}
        dtype = "stored" if str(qc.get("quant_method", "")).lower() == "mxfp4" else ENGINE_DEFAULT_DTYPE
    how = ("converted from config.json as stored (MXFP4 experts, the rest " + _src(cfg) + ")" if dtype == "stored"
           else f"converted from config.json, quantized {dtype}" + (" (the engine's default)" if not asked else ""))
    return model_for(cfg, dtype, model), model, how


def _src(cfg):
    return str(cfg.get("torch_dtype") or cfg.get("dtype") or "bf16").replace("torch.", "")


def _first_split(path):
    from formulas.engines.gguf import split_names

    return split_names(path)[0]


# ------------------------------------------------------------------ the devices

def parse_gpus(a, count_flag):
    """[(name, total bytes, free bytes)] per GPU from --gpu ('4x RTX 4090', 'RTX 4090,RTX 3090'), --gpus, --gpu-free."""
    from formulas.hardware import get_hardware
    from formulas.overhead import DEFAULT_OVERHEADS

    names = []
    text = a.gpu or ""
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        n, name = 1, part
        head, sep, rest = part.partition("x")
        if sep and head.strip().isdigit() and rest.strip():
            n, name = int(head.strip()), rest.strip()
        else:
            head, sep, rest = part.partition("×")
            if sep and head.strip().isdigit():
                n, name = int(head.strip()), rest.strip()
        if n < 1:
            raise ValueError(f"--gpu {part}: the count must be at least 1")
        names += [name] * n
    if names and count_flag > 1 and len(names) == 1:
        names = names * count_flag
    elif names and count_flag > 1 and len(names) != count_flag:
        raise ValueError(f"--gpus {count_flag}: --gpu names {len(names)} cards")
    free = []
    if a.gpu_free:
        try:
            free = [parse_size(x.strip(), 1) for x in a.gpu_free.split(",") if x.strip()]
        except ValueError as e:
            raise ValueError(f"--gpu-free {a.gpu_free}: {e}") from None
    if not names and not free:
        # no card named: --gpus anonymous GPUs of unknown size (0: the CPU alone)
        return [("GPU", 0, 0)] * count_flag
    if not names:
        names = ["GPU"] * len(free)
    ctx = DEFAULT_OVERHEADS.cuda_context_bytes
    out = []
    for i, name in enumerate(names):
        hw = get_hardware(name) if name != "GPU" else None
        total = hw.usable_bytes if hw else (free[i] if i < len(free) else 0)
        f = free[i] if i < len(free) else (free[0] if len(free) == 1 else total - ctx)
        out.append((hw.name if hw else name, total, f))
    if free and len(free) not in (1, len(out)):
        raise ValueError(f"--gpu-free {a.gpu_free}: one size, or one per GPU ({len(out)})")
    return out


def _overrides(a):
    out = []
    for item in a.override_tensor or ():
        for part in item.split(","):
            part = part.strip()
            if not part:
                continue
            pattern, sep, buft = part.rpartition("=")
            if not sep or not pattern:
                raise ValueError(f"-ot {part}: give PATTERN=BUFFER, e.g. 'exps=CPU' or 'blk\\.1[0-9]\\.=CUDA1'")
            out.append((pattern, buft.strip()))
    return tuple(out)


def _int(flag, text):
    try:
        n = int(text)
    except (TypeError, ValueError):
        raise ValueError(f"{flag} {text}: give a whole number") from None
    if n < 0:
        raise ValueError(f"{flag} {text}: must be ≥ 0")
    return n


def settings_from_args(a, taken, n_gpus, for_fit=False):
    """LlamaCppSettings from the flags (spec flags the engine reads: --kv-dtype, --gpus)."""
    from formulas.engines.llamacpp import LlamaCppSettings

    kw = dict(engine=a.engine, ubatch=a.ubatch, gpus=max(n_gpus, 1), device="cuda" if n_gpus else "cpu",
              ollama_version=a.ollama_version, swa_full=a.swa_full, overrides=_overrides(a), cpu_moe=a.cpu_moe,
              n_cpu_moe=_int("--n-cpu-moe", a.n_cpu_moe) if a.n_cpu_moe is not None else 0,
              split_mode=a.split_mode, offload_kqv=not a.no_kv_offload, op_offload=not a.no_op_offload)
    if a.gpu_layers not in (None, "all", "auto", "-1"):
        kw["gpu_layers"] = _int("--gpu-layers", a.gpu_layers)
    if a.tensor_split:
        try:
            kw["tensor_split"] = tuple(float(x) for x in a.tensor_split.replace("/", ",").split(","))
        except ValueError:
            raise ValueError(f"--tensor-split {a.tensor_split}: give proportions, e.g. 3,1") from None
        if len(kw["tensor_split"]) != max(n_gpus, 1):
            raise ValueError(f"--tensor-split {a.tensor_split}: {len(kw['tensor_split'])} proportions for "
                             f"{max(n_gpus, 1)} GPUs")
    kw["ctx"] = a.ctx if a.ctx else 0
    if a.parallel is not None:
        kw["parallel"] = _int("--parallel", a.parallel)
    kw["flash_attn"] = None if a.flash_attn in (None, "auto") else a.flash_attn == "on"
    kv = taken.get("kv_dtype")
    if kv:
        from formulas.engines.llamacpp import KV_CACHE_TYPES

        if kv not in KV_CACHE_TYPES:
            raise ValueError(f"--kv-dtype {kv}: llama.cpp's -ctk/-ctv take {', '.join(KV_CACHE_TYPES)}")
        kw["kv_dtype"] = kv
    return LlamaCppSettings(**kw)


# ------------------------------------------------------------------ predict

def _device_lines(r, gpus, ctx_bytes):
    out = []
    for g, (name, total, free) in enumerate(gpus):
        b = r.device_bytes(g)
        seen = b + ctx_bytes
        rs = r.rs_buffer_bytes[g] if r.rs_buffer_bytes else 0
        line = (f"  CUDA{g} {name}: model {_gib(r.model_buffer_bytes[g])} + KV {_gib(r.kv_buffer_bytes[g] + rs)} "
                f"+ compute {_gib(r.compute_buffer_bytes[g])} = {_gib(b)} GiB; with the CUDA context {_gib(seen)} GiB")
        if total:
            verdict = "fits" if seen <= total else "does not fit"
            line += f" of {_gib(total)} GiB: {verdict}, margin {(total - seen) / GiB:+.2f} GiB"
        out.append(line)
    return out


def _host_line(r, host_ram):
    line = (f"  host RAM: model {_gib(r.host_model_buffer_bytes)} + KV {_gib(r.host_kv_buffer_bytes + r.host_rs_buffer_bytes)}"
            f" + compute {_gib(r.host_compute_buffer_bytes)} + output {_gib(r.output_buffer_bytes)} = {_gib(r.host_bytes)} GiB")
    if host_ram:
        line += (f" of {_gib(host_ram)} GiB: " + ("fits" if r.host_bytes <= host_ram else "does not fit")
                 + f", margin {(host_ram - r.host_bytes) / GiB:+.2f} GiB")
    return line


def _launch_flags(s, ngl=None):
    out = f"-c {s.ctx} -np {s.parallel} -ub {s.ubatch}"
    fa = "auto" if s.flash_attn is None else ("on" if s.flash_attn else "off")
    out += f" -fa {fa} -ctk {s.kv_dtype}"
    n = ngl if ngl is not None else s.gpu_layers
    out += f" -ngl {n}"
    if s.tensor_split:
        out += " -ts " + ",".join(f"{x:g}" for x in s.tensor_split)
    if s.split_mode != "layer":
        out += f" -sm {s.split_mode}"
    if s.cpu_moe:
        out += " --cpu-moe"
    if s.n_cpu_moe:
        out += f" --n-cpu-moe {s.n_cpu_moe}"
    if s.overrides:
        out += ' -ot "' + ",".join(f"{p}={b}" for p, b in s.overrides) + '"'
    if s.swa_full:
        out += " --swa-full"
    return out


def cmd_predict_llamacpp(a, taken):
    """predict --engine llama.cpp|ollama (text or --json)."""
    import dataclasses

    from formulas.engines.llamacpp import log_lines, predict_model
    from formulas.overhead import DEFAULT_OVERHEADS

    model, label, how = engine_model(a)
    gpus = parse_gpus(a, taken.get("gpus") or 1)
    host_ram = parse_size(a.host_ram, 1) if a.host_ram else None
    ctx_bytes = DEFAULT_OVERHEADS.cuda_context_bytes
    n_params = sum(t.numel for t in model.tensors)
    head = [f"{label} · {model.arch} · {n_params:,} parameters in the GGUF · {model.tensor_bytes / GiB:.2f} GiB of "
            f"tensors · {how}"]
    if a.engine == "ollama":
        return _ollama(a, model, head, gpus, host_ram, ctx_bytes)
    s = settings_from_args(a, taken, len(gpus))
    fit = None
    if a.fit:
        from formulas.engines.fit import FIT_CTX_MIN, FitFailure, fit_params

        if not gpus:
            raise ValueError("--fit: name the GPUs (--gpu '2x RTX 4090' or --gpu-free 22GiB,22GiB)")
        margins = [parse_size(x.strip() + ("MiB" if x.strip().isdigit() else ""), 0)
                   for x in (a.fit_target or "1024").split(",")]
        try:
            fit = fit_params(model, s, [f for _, _, f in gpus], margins, a.fit_ctx or FIT_CTX_MIN, host_ram)
        except FitFailure as e:
            raise ValueError(f"--fit: llama.cpp would give up: {e}") from None
        r = fit.buffers
        s = dataclasses.replace(s, ctx=fit.n_ctx)
    else:
        if not s.ctx:
            s = dataclasses.replace(s, ctx=a.seq + a.gen if a.seq else 4096)
        r = predict_model(model, s)
    if a.json:
        obj = {"model": label, "arch": model.arch, "source": how, "tensor_bytes": model.tensor_bytes,
               "settings": {k: v for k, v in dataclasses.asdict(s).items()}, "engine": r.to_json(),
               "devices": [{"name": n, "total_bytes": t, "free_bytes": f, "buffers_bytes": r.device_bytes(g),
                            "with_cuda_context_bytes": r.device_bytes(g) + ctx_bytes,
                            "fits": r.device_bytes(g) + ctx_bytes <= t if t else None}
                           for g, (n, t, f) in enumerate(gpus)],
               "host_bytes": r.host_bytes, "host_ram_bytes": host_ram,
               "peak_device_bytes": max([r.device_bytes(g) + ctx_bytes for g in range(len(gpus))] or [0])}
        if fit:
            obj["fit"] = {"flags": fit.flags(), "n_ctx": fit.n_ctx, "n_gpu_layers": fit.n_gpu_layers,
                          "tensor_split": list(fit.tensor_split), "overrides": [list(o) for o in fit.overrides],
                          "changed": fit.changed, "log": list(fit.log)}
        print(json.dumps(obj, indent=2))
        return 0
    out = head
    if fit:
        out.append(f"llama-fit-params would print: {fit.flags()}")
        out.append(f"  (margin {', '.join(str(m // MiB) for m in fit.margin_bytes)} MiB per device, minimum context "
                   f"{a.fit_ctx or 4096}; free {', '.join(_gib(f) for f in fit.free_bytes)} GiB)")
    else:
        out.append(f"settings: {_launch_flags(s)}")
    out += ["", f"what {'llama.cpp' if a.engine == 'llama.cpp' else a.engine} would log:"]
    out += [f"  {ln}" for ln in log_lines(r)]
    out += ["", "per device (llama.cpp's buffers; nvidia-smi adds the CUDA context):"]
    out += _device_lines(r, gpus, ctx_bytes)
    out.append(_host_line(r, host_ram))
    out += [f"note: {n}" for n in r.notes]
    print("\n".join(out))
    return 0


def _ollama_env(a):
    from formulas.engines.ollama import OllamaEnv

    kw = {}
    names = {"OLLAMA_NUM_PARALLEL": ("num_parallel", int), "OLLAMA_FLASH_ATTENTION": ("flash_attention", _bool),
             "OLLAMA_KV_CACHE_TYPE": ("kv_cache_type", str), "OLLAMA_SCHED_SPREAD": ("sched_spread", _bool),
             "OLLAMA_GPU_OVERHEAD": ("gpu_overhead", lambda v: parse_size(v)), "OLLAMA_CONTEXT_LENGTH": ("context_length", int)}
    for item in a.ollama_env or ():
        key, sep, value = item.partition("=")
        if not sep or key not in names:
            raise ValueError(f"--ollama-env {item}: give KEY=VALUE with KEY one of {', '.join(names)}")
        field, conv = names[key]
        try:
            kw[field] = conv(value)
        except ValueError:
            raise ValueError(f"--ollama-env {item}: {value!r} is not a value {key} takes") from None
    if a.parallel is not None:
        kw["num_parallel"] = _int("--parallel", a.parallel)
    if a.flash_attn in ("on", "off"):
        kw["flash_attention"] = a.flash_attn == "on"
    return OllamaEnv(**kw)


def _bool(v):
    if v.lower() in ("1", "true", "on", "yes"):
        return True
    if v.lower() in ("0", "false", "off", "no", ""):
        return False
    raise ValueError(v)


def ollama_answer(a, model, gpus, host_ram, num_ctx=0):
    from formulas.engines.ollama import ollama_plan

    env = _ollama_env(a)
    if env.kv_cache_type and env.kv_cache_type not in ("f16", "q8_0", "q4_0"):
        raise ValueError(f"--ollama-env OLLAMA_KV_CACHE_TYPE={env.kv_cache_type}: Ollama takes f16, q8_0, q4_0")
    return ollama_plan(model, [f for _, _, f in gpus], [t for _, t, _ in gpus], a.ollama_version, env,
                       num_ctx or a.ctx, host_ram, a.ubatch)


def _ollama(a, model, head, gpus, host_ram, ctx_bytes):
    from formulas.engines.llamacpp import log_lines

    if not gpus:
        raise ValueError("--engine ollama: name the GPUs (--gpu 'RTX 4090', '2x RTX 4090') or --gpu-free SIZE")
    ans = ollama_answer(a, model, gpus, host_ram)
    r = ans.buffers
    used = [gpus[g] for g in ans.gpus_used]
    if a.json:
        obj = {"model": head[0], "ollama": ans.to_json(),
               "devices": [{"name": n, "total_bytes": t, "buffers_bytes": ans.device_bytes[i],
                            "with_cuda_context_bytes": ans.device_bytes[i] + ctx_bytes,
                            "fits": ans.device_bytes[i] + ctx_bytes <= t} for i, (n, t, _) in enumerate(used)],
               "host_bytes": ans.host_bytes,
               "peak_device_bytes": max([b + ctx_bytes for b in ans.device_bytes] or [0])}
        print(json.dumps(obj, indent=2))
        return 0
    fa = "auto" if ans.flash_attn is None else ("on" if ans.flash_attn else "off")
    sched = ("llama-server --fit places the layers" if ans.scheduler == "fit"
             else "Ollama's own estimate sets -ngl (llm/memory.go)")
    out = head + [f"ollama {ans.version}: num_ctx {ans.num_ctx:,} × num_parallel {ans.num_parallel}, flash attention "
                  f"{fa}, KV {ans.kv_type}; {sched}",
                  f"  GPUs given: {', '.join(f'{gpus[g][0]} #{g}' for g in ans.gpus_used) or 'none'}; -ngl "
                  f"{ans.n_gpu_layers}" + (f" -ts {','.join(str(x) for x in ans.tensor_split)}" if ans.tensor_split else "")
                  + (' -ot "' + ",".join(f"{p}={b}" for p, b in ans.overrides) + '"' if ans.overrides else ""),
                  "", "what ollama would log:"]
    out += [f"  {ln}" for ln in log_lines(r)]
    out += ["", "per device (llama.cpp's buffers; nvidia-smi adds the CUDA context):"]
    out += _device_lines(r, used, ctx_bytes)
    out.append(_host_line(r, host_ram))
    out += [f"note: {n}" for n in list(ans.notes) + list(r.notes)]
    print("\n".join(out))
    return 0


# ------------------------------------------------------------------ plan

def cmd_plan_llamacpp(a, taken, margin):
    """plan --engine llama.cpp|ollama --users N --ctx L --gpu G: fewest GPUs of that type, then the largest context
    per user and the most users on them — each from the engine's own placement."""
    import dataclasses

    from formulas.engines.llamacpp import predict_model
    from formulas.hardware import get_hardware
    from formulas.overhead import DEFAULT_OVERHEADS

    from .engines import MAX_ENGINE_GPUS

    model, label, how = engine_model(a)
    gpu = get_hardware(a.gpu)
    ctx_bytes = DEFAULT_OVERHEADS.cuda_context_bytes
    usable = int(gpu.usable_bytes * (1 - margin))
    users = a.users if a.users is not None else (a.batch or 1)
    ctx = a.ctx or (a.seq + a.gen)

    def attempt(g, n, length):
        devices = [(gpu.name, usable, usable - ctx_bytes)] * g
        if a.engine == "ollama":
            try:
                ans = ollama_answer(a, model, devices, None, length) if n == 1 else _ollama_users(a, model, devices,
                                                                                                  n, length)
            except ValueError:
                return False, None
            r = ans.buffers
            n_layer = int(model.key("block_count"))
            offloaded = sum(r.layers_per_gpu) >= n_layer and not any(b == "CPU" for _, b in ans.overrides)
            return offloaded and all(b + ctx_bytes <= usable for b in ans.device_bytes), ans
        s = settings_from_args(a, taken, g)
        s = dataclasses.replace(s, ctx=n * length, parallel=n, gpus=g, device="cuda")
        try:
            r = predict_model(model, s)
        except ValueError:
            return False, None
        ok = all(r.device_bytes(i) + ctx_bytes <= usable for i in range(g))
        return ok, r

    fewest = next((g for g in range(1, MAX_ENGINE_GPUS + 1) if attempt(g, users, ctx)[0]), None)
    ans = {"engine": a.engine, "model": label, "source": how, "users": users, "ctx": ctx,
           "usable_bytes_per_gpu": usable, "fewest": None, "largest_ctx_per_user": None, "most_users": None}
    if fewest is not None:
        _, r = attempt(fewest, users, ctx)
        r = r.buffers if hasattr(r, "buffers") else r
        ans["fewest"] = {"gpus": fewest, "peak_device_bytes": max(r.device_bytes(i) for i in range(fewest)) + ctx_bytes,
                         "host_bytes": r.host_bytes}

        def largest(ok_at, hi):
            lo = 0
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if ok_at(mid) else (lo, mid - 1)
            return lo

        limit = int(model.key("context_length") or 1 << 20)
        ans["largest_ctx_per_user"] = largest(lambda L: L > 0 and attempt(fewest, users, L)[0], limit)
        ans["most_users"] = largest(lambda n: n > 0 and attempt(fewest, n, ctx)[0], 256)
    if a.json:
        print(json.dumps(ans, indent=2))
        return 0
    out = [f"{label} · {how}",
           f"{a.engine} on {gpu.name}: {users} user{'s' if users != 1 else ''} × {ctx:,} tokens "
           f"({usable / GiB:.2f} GiB usable per GPU, with the CUDA context)"]
    f = ans["fewest"]
    if f is None:
        out.append(f"fewest GPUs: does not fit on up to {MAX_ENGINE_GPUS} × {gpu.name} with every layer on the GPUs")
    else:
        out.append(f"fewest GPUs: {f['gpus']} (layers split over {f['gpus']}), {f['peak_device_bytes'] / GiB:.2f} GiB "
                   f"on the fullest GPU, {f['host_bytes'] / GiB:.2f} GiB of host RAM")
        out.append(f"largest context per user at {users} on {f['gpus']}: {ans['largest_ctx_per_user']:,} tokens")
        out.append(f"most users at {ctx:,} tokens on {f['gpus']}: {ans['most_users']:,}")
    print("\n".join(out))
    return 0


def _ollama_users(a, model, devices, n, length):
    import dataclasses

    from formulas.engines.ollama import ollama_plan

    env = dataclasses.replace(_ollama_env(a), num_parallel=n)
    return ollama_plan(model, [f for _, _, f in devices], [t for _, t, _ in devices], a.ollama_version, env, length,
                       None, a.ubatch)
