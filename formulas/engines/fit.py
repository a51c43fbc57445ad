"""llama.cpp's `--fit`: the context, -ngl, tensor split and expert placement llama-server picks for free memory.

A port of common/fit.cpp `common_params_fit_impl` (ggml-org/llama.cpp@0c1e57098; the fit moved from src/ to
common/ in 2026). llama.cpp measures each candidate with a dry run of its loader (no_alloc); here the dry run
is formulas/engines/llamacpp.py `predict_model`, the same buffers per device. The steps, as in the source:

1. (L262-361) measure the defaults (all layers on the GPUs, n_ctx = the trained context × streams when -c is
   unset); if every device keeps its margin (--fit-target, default 1024 MiB) free, nothing changes;
2. (L365-448) with -c unset, lower the context toward --fit-ctx (default 4096) by linear interpolation between
   the memory at the trained context and at the minimum, rounded down to 256 × streams; with several devices
   the target is lowered by (n_devices + 1) × one layer's bytes / 2 (dense) or / 6 (MoE) for the waste of whole
   layers; a single device that now fits is done;
3. (L652-721) fill devices back to front with whole layers (for a MoE model: with every expert tensor in host
   memory, `blk.N.ffn_(up|down|gate_up|gate)_(ch|)exps=CPU`), each device's count found by false position
   between "none more" and "all the rest";
4. (L730-843, MoE models whose dense weights fit with room to spare) convert the dense-only layers into full
   layers front to back, then try to fit one more layer partly: its up (and then gate) projections or only its
   attention on the device, the rest on the next device or the CPU.

The answer is what `llama-fit-params` prints (tools/fit-params/fit-params.cpp L39-70):
`-c N -ngl N [-ts a,b,…] [-ot "pattern=BUFT,…"]`.
"""

import dataclasses
from dataclasses import dataclass

from .llamacpp import MIB, hparams_of, predict_model

FIT_TARGET_BYTES = 1024 * MIB  # common/common.h L483: fit_params_target default 1024 MiB per device
FIT_CTX_MIN = 4096  # common/common.h L480: fit_params_min_ctx
_PATTERNS = {  # get_overflow_pattern (L486-520): what of layer il leaves the device
    "attn": r"blk\.{il}\.ffn_(gate|up|gate_up|down).*",
    "up": r"blk\.{il}\.ffn_(gate|gate_up|down).*",
    "gate": r"blk\.{il}\.ffn_down.*",
    "moe": r"blk\.{il}\.ffn_(up|down|gate_up|gate)_(ch|)exps",
}
MOE_ALL = r"blk\.\d+\.ffn_(up|down|gate_up|gate)_(ch|)exps"  # L618


class FitFailure(Exception):
    """llama.cpp's fit gives up (common_params_fit_exception): the reason, in its words."""


@dataclass
class _Ngl:
    n_layer: int = 0  # layers on the device (the output layer counts as one on the last)
    n_part: int = 0  # of them, partial layers (MoE tensors elsewhere)
    overflow: str = "moe"  # what the first partial layer sends away

    def n_full(self):
        return self.n_layer - self.n_part


@dataclass(frozen=True)
class FitResult:
    """What --fit chose and what it leaves on each device."""

    n_ctx: int
    n_gpu_layers: int
    tensor_split: tuple  # layers per device (the -ts llama-fit-params prints), () for one device
    overrides: tuple  # ((pattern, buffer), …) the -ot list
    buffers: object  # LlamaCppBuffers of the chosen settings
    device_bytes: tuple  # model + context + compute per device
    free_bytes: tuple  # free memory per device the fit worked against
    margin_bytes: tuple
    host_bytes: int
    changed: bool  # False: the defaults already fit
    log: tuple  # the steps taken, as llama.cpp traces them

    def flags(self):
        """The line llama-fit-params prints."""
        out = f"-c {self.n_ctx} -ngl {self.n_gpu_layers}"
        if len(self.tensor_split) > 1:
            out += " -ts " + ",".join(str(x) for x in self.tensor_split)
        if self.overrides:
            out += ' -ot "' + ",".join(f"{p}={b}" for p, b in self.overrides) + '"'
        return out


def _dev_bytes(r, nd):
    return [r.device_bytes(g) for g in range(nd)]


def fit_params(model, settings, free_bytes, margin_bytes=None, n_ctx_min=FIT_CTX_MIN, host_free_bytes=None):
    """Port of common_params_fit_impl. `settings`: the user's (ctx 0 = unset, gpu_layers "all" = unset);
    free_bytes: free memory of each GPU; margin_bytes: --fit-target per GPU (default 1024 MiB each)."""
    hp = hparams_of(model)
    nd = len(free_bytes)
    margins = list(margin_bytes) if margin_bytes is not None else [FIT_TARGET_BYTES] * max(nd, 1)
    if len(margins) == 1 and nd > 1:
        margins = margins * nd
    s = dataclasses.replace(settings, gpus=max(nd, 1), device="cuda" if nd else "cpu")
    log = []
    n_streams = 1 if _unified(s) else max(1, s.parallel)
    n_ctx_auto = s.ctx == 0
    hp_ngl, hp_nct, hp_nex = hp.n_layer, hp.n_ctx_train, hp.n_expert
    n_ctx_max = hp_nct * n_streams
    n_ctx_min_total = n_ctx_min * n_streams
    if n_ctx_auto:
        s = dataclasses.replace(s, ctx=n_ctx_max)

    def measure(st):
        r = predict_model(model, st)
        return r, _dev_bytes(r, nd), r.host_bytes

    full, used, host = measure(s)
    if nd == 0:
        if host_free_bytes is None or host_free_bytes - host >= margins[0]:
            return _result(s, full, (), margins, False, log)
        raise FitFailure("was unable to fit model into system memory by reducing context, abort")
    proj_free = [f - u for f, u in zip(free_bytes, used)]
    log.append("projected: " + ", ".join(f"CUDA{i} {u // MIB} MiB used, {p // MIB} MiB free vs. target "
                                         f"{m // MIB}" for i, (u, p, m) in enumerate(zip(used, proj_free, margins))))
    if all(p >= m for p, m in zip(proj_free, margins)):
        log.append("targets for free memory can be met on all devices, no changes needed")
        return _result(s, full, free_bytes, margins, False, log)
    # step 2: the context
    surplus = sum(proj_free) - sum(margins)
    sum_used = sum(used)
    if surplus < 0:
        if n_ctx_auto and n_ctx_max > n_ctx_min_total:
            target = sum(free_bytes) - sum(margins)
            if nd > 1:
                sum_model = sum(full.model_buffer_bytes)
                per_layer = sum_model // min(hp_ngl + 1 if s.gpu_layers == "all" else s.gpu_layers, hp_ngl)
                target -= (nd + 1) * per_layer // (2 if hp_nex == 0 else 6)
            s_min = dataclasses.replace(s, ctx=n_ctx_min_total)
            _, used_min, _ = measure(s_min)
            sum_min = sum(used_min)
            if target > sum_min:
                ctx = n_ctx_min_total + (n_ctx_max - n_ctx_min_total) * (target - sum_min) // (sum_used - sum_min)
                align = 256 * n_streams
                ctx = max(ctx - ctx % align, n_ctx_min_total)
                s = dataclasses.replace(s, ctx=ctx)
                log.append(f"context size reduced from {n_ctx_max} to {ctx}")
                if nd <= 1:
                    log.append("entire model can be fit by reducing context")
                    r = predict_model(model, s)
                    return _result(s, r, free_bytes, margins, True, log)
                log.append("entire model should be fit across devices by reducing context")
            else:
                s = s_min
                log.append(f"context size reduced from {n_ctx_max} to {n_ctx_min_total} -> need "
                           f"{(sum_used - sum_min) // MIB} MiB less memory in total")
        elif n_ctx_auto:
            log.append(f"default model context size is {n_ctx_max} which is <= the min. context size of "
                       f"{n_ctx_min_total} -> no change")
        else:
            log.append(f"context size set by user to {s.ctx} -> no change")
    if settings.gpu_layers != "all":
        raise FitFailure(f"n_gpu_layers already set by user to {settings.gpu_layers}, abort")
    if nd > 1 and settings.tensor_split:
        raise FitFailure("model_params::tensor_split already set by user, abort")
    if nd > 1 and s.split_mode == "row":
        raise FitFailure("changing weight allocation for LLAMA_SPLIT_MODE_ROW not implemented, abort")
    if settings.overrides or settings.cpu_moe or settings.n_cpu_moe:
        raise FitFailure("model_params::tensor_buft_overrides already set by user, abort")
    s = dataclasses.replace(s, cpu_moe=False, n_cpu_moe=0, overrides=())

    def settings_for(ngl, overflow):
        """set_ngl_tensor_split_tbo (L535-584)."""
        n_gpu = sum(n.n_layer for n in ngl)
        ts = tuple(float(n.n_layer) for n in ngl) if nd > 1 else None
        il0 = hp_ngl + 1 - n_gpu
        ovr = []
        for d in range(nd):
            il0 += ngl[d].n_full()
            for il in range(il0, il0 + ngl[d].n_part):
                kind = ngl[d].overflow if il == il0 else "moe"
                buft = overflow[d] if il == il0 else "CPU"
                ovr.append((_PATTERNS[kind].format(il=il), buft))
            il0 += ngl[d].n_part
        if nd > 1 and ts is not None and sum(ts) == 0:
            ts = None
        return dataclasses.replace(s, gpu_layers=n_gpu, tensor_split=ts, overrides=tuple(ovr))

    def mem_for(ngl, overflow):
        _, dev, _ = measure(settings_for(ngl, overflow))
        return dev

    surplus_cpu_moe = 0
    if hp_nex > 0:
        _, dev, _ = measure(dataclasses.replace(s, overrides=((MOE_ALL, "CPU"),)))
        surplus_cpu_moe = sum(f - u - m for f, u, m in zip(free_bytes, dev, margins))
        log.append(("with only dense weights in device memory there is a total surplus of "
                    if surplus_cpu_moe > 0 else "with only dense weights in device memory there is still a total "
                    "deficit of ") + f"{abs(surplus_cpu_moe) // MIB} MiB")
    targets = [f - m for f, m in zip(free_bytes, margins)]
    overflow = ["CPU"] * nd
    ngl = [_Ngl() for _ in range(nd)]
    mem = mem_for(ngl, overflow)
    # step 3: fill back to front
    for d in range(nd - 1, -1, -1):
        unassigned = hp_ngl + 1 - sum(ngl[j].n_layer for j in range(d + 1, nd))
        high = [dataclasses.replace(n) for n in ngl]
        high[d].n_layer = unassigned
        if hp_nex > 0:
            high[d].n_part = high[d].n_layer if d < nd - 1 else high[d].n_layer - 1
        if high[d].n_layer > 0:
            mem_high = mem_for(high, overflow)
            if mem_high[d] > targets[d]:
                delta = high[d].n_layer - ngl[d].n_layer
                while delta > 1:
                    step = delta * (targets[d] - mem[d]) // (mem_high[d] - mem[d])
                    step = min(max(step, 1), delta - 1)
                    test = [dataclasses.replace(n) for n in ngl]
                    test[d].n_layer += step
                    if hp_nex:
                        test[d].n_part += step - 1 if d == nd - 1 and test[d].n_part == 0 else step
                    mem_test = mem_for(test, overflow)
                    if mem_test[d] <= targets[d]:
                        ngl, mem = test, mem_test
                    else:
                        high, mem_high = test, mem_test
                    delta = high[d].n_layer - ngl[d].n_layer
            else:
                ngl, mem = high, mem_high
        log.append(f"CUDA{d}: {ngl[d].n_layer} layers, {mem[d] // MIB} MiB used, "
                   f"{(free_bytes[d] - mem[d]) // MIB} MiB free")
    if hp_nex == 0 or surplus_cpu_moe <= 0:
        st = settings_for(ngl, overflow)
        return _result(st, predict_model(model, st), free_bytes, margins, True, log)
    # step 4: dense-only layers become full layers, front to back
    dense_start = nd
    for d in range(nd - 1, -1, -1):
        if ngl[d].n_layer > 0:
            dense_start = d
            continue
        break
    d = 0
    while d <= dense_start < nd:
        high = [dataclasses.replace(n) for n in ngl]
        for j in range(dense_start, nd):
            move = high[j].n_layer if j < nd - 1 else high[j].n_layer - 1
            high[d].n_layer += move
            high[j].n_layer -= move
            high[j].n_part = 0
        dense_start_high = nd - 1
        mem_high = mem_for(high, overflow)
        if mem_high[d] > targets[d]:
            delta = high[d].n_full() - ngl[d].n_full()
            while delta > 1:
                step = delta * (targets[d] - mem[d]) // (mem_high[d] - mem[d])
                step = min(max(step, 1), delta - 1)
                test = [dataclasses.replace(n) for n in ngl]
                ds_test = dense_start
                converted = 0
                while ds_test < nd:
                    k = min(step - converted, test[ds_test].n_part)
                    test[ds_test].n_layer -= k
                    test[ds_test].n_part -= k
                    test[d].n_layer += k
                    converted += k
                    if test[ds_test].n_part > 0:
                        break
                    ds_test += 1
                mem_test = mem_for(test, overflow)
                if mem_test[d] <= targets[d]:
                    ngl, mem, dense_start = test, mem_test, ds_test
                else:
                    high, mem_high, dense_start_high = test, mem_test, ds_test
                delta = high[d].n_full() - ngl[d].n_full()
        else:
            ngl, mem, dense_start = high, mem_high, dense_start_high
        # try to fit at least part of one more layer
        if dense_start < nd and ngl[dense_start].n_layer > (0 if d < nd - 1 else 1):
            test = [dataclasses.replace(n) for n in ngl]
            ds_test = dense_start
            test[ds_test].n_layer -= 1
            test[ds_test].n_part -= 1
            test[d].n_layer += 1
            test[d].n_part += 1
            if test[ds_test].n_part == 0:
                ds_test += 1
            test[d].overflow = "up"
            ovf_test = list(overflow)
            if d < nd - 1:
                ovf_test[d] = f"CUDA{d + 1}"
            mem_test = mem_for(test, ovf_test)
            if mem_test[d] < targets[d] and (d + 1 == nd or mem_test[d + 1] < targets[d + 1]):
                ngl, overflow, mem, dense_start = test, ovf_test, mem_test, ds_test
                test = [dataclasses.replace(n) for n in test]
                test[d].overflow = "gate"
                mem_test = mem_for(test, ovf_test)
                if mem_test[d] < targets[d] and (d + 1 == nd or mem_test[d + 1] < targets[d + 1]):
                    ngl, overflow, mem, dense_start = test, ovf_test, mem_test, ds_test
            else:
                test[d].overflow = "attn"
                mem_test = mem_for(test, ovf_test)
                if mem_test[d] < targets[d] and (d + 1 == nd or mem_test[d + 1] < targets[d + 1]):
                    ngl, overflow, mem, dense_start = test, ovf_test, mem_test, ds_test
        log.append(f"CUDA{d}: {ngl[d].n_layer} layers ({ngl[d].n_part} overflowing), {mem[d] // MIB} MiB used, "
                   f"{(free_bytes[d] - mem[d]) // MIB} MiB free")
        d += 1
    st = settings_for(ngl, overflow)
    return _result(st, predict_model(model, st), free_bytes, margins, True, log)


def _unified(s):
    return s.kv_unified if s.kv_unified is not None else s.engine == "ollama"


def _result(s, r, free, margins, changed, log):
    nd = len(r.model_buffer_bytes)
    ngl = s.gpu_layers if s.gpu_layers != "all" else -1  # llama_model_default_params: -1, all layers
    ts = tuple(int(x) for x in s.tensor_split) if s.tensor_split and nd > 1 else ()
    return FitResult(n_ctx=s.ctx, n_gpu_layers=ngl, tensor_split=ts, overrides=tuple(s.overrides), buffers=r,
                     device_bytes=tuple(_dev_bytes(r, nd)), free_bytes=tuple(free), margin_bytes=tuple(margins),
                     host_bytes=r.host_bytes, changed=changed, log=tuple(log))

