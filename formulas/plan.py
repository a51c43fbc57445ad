"""The planner: which GPUs, how many, how long.

Answers the questions people bring (see ../shared/seeds/): does a workload fit on GPU G and
with what margin; the fewest GPUs of type G and the strategy that makes it fit (layer split,
tensor parallel, ZeRO, offload), per-GPU memory for each; the largest batch (concurrent
users) and the longest context that fit; prefill time and decode tokens/s (bounds from FLOPs
and bandwidth); fine-tuning time for D tokens by method and the GPUs that finish it within a
deadline; and a seeds-style table of GPUs per model × data size × deadline.

Memory comes from `formulas.predict.predict` (per GPU, the worst GPU), compared with the
GPU's usable memory less a safety margin. Time comes from `formulas.throughput` and the
catalog's dense peaks. Device overheads are the caller's: `vramlab plan` passes the same
calibration table `vramlab predict` would use for that GPU (harness.analysis.calibrate), or
the uncalibrated defaults, and every answer says which. Pure like the rest of formulas/: no
torch, no pandas, no file lookups; plain predictions, a few hundred microseconds each.
"""

from dataclasses import dataclass

from .catalog import get_shape, model_label
from .dtypes import DTYPE_BYTES
from .hardware import get_hardware
from .lora import lora_params, resolve_targets
from .overhead import DEFAULT_OVERHEADS
from .predict import predict
from .spec import MAX_GPUS, SpecError, validate
from .throughput import (
    decode_flops_per_token,
    gpus_for_deadline,
    kv_bytes_read_per_step,
    prefill_flops,
    training_flops_per_token,
    weight_bytes_read_per_step,
)
from .weights import weight_storage

DEFAULT_MFU = 0.4  # model-FLOPs utilisation assumed for training time (a flag)
DEFAULT_TOKENS_PER_BYTE = 0.25  # ~4 bytes of English text per BPE token (an assumption, a flag)
DEFAULT_MAX_GPUS = 1024  # how far the fewest-GPU search looks
MAX_GPUS_LIMIT = 1 << 20  # --max-gpus beyond this is refused
EXHAUSTIVE_GPUS = 64  # up to this count every GPU count is tried
BATCH_CAP = 1 << 16  # the largest-batch search stops here
SEQ_CAP = 1 << 22  # the longest-context search stops here when the model states no window

# Simplicity: least machinery and least communication first. Used to break ties and, when
# GPUs are added for speed rather than memory, to choose the strategy outright.
ORDER = ("single", "ddp", "zero1", "zero2", "zero3", "tp", "tp_ddp", "layer_split", "tp_pp", "zero3_offload")


@dataclass(frozen=True)
class Strategy:
    """How a workload is spread over `gpus` GPUs."""

    kind: str  # one of ORDER
    gpus: int = 1
    tp: int = 1
    pp: int = 1
    zero: int = 0
    offload: str = "none"

    def apply(self, spec):
        """The spec run this way."""
        return spec.replace(gpus=self.gpus, tp=self.tp, pp=self.pp, zero=self.zero,
                            layer_split=self.kind == "layer_split", offload=self.offload)

    def label(self):
        """Short human name, e.g. 'ZeRO-3 over 8' or 'TP=4 × PP=2'."""
        n = self.gpus
        return {
            "single": "1 GPU",
            "ddp": f"DDP over {n}",
            "zero1": f"ZeRO-1 over {n}", "zero2": f"ZeRO-2 over {n}", "zero3": f"ZeRO-3 over {n}",
            "zero3_offload": f"ZeRO-3 + optimizer offload over {n}",
            "tp": f"TP={n}",
            "tp_ddp": f"TP={self.tp} × DDP={n // self.tp}",
            "layer_split": f"layer split over {n}",
            "tp_pp": f"TP={self.tp} × PP={self.pp}",
        }[self.kind]

    def to_dict(self):
        return {"kind": self.kind, "label": self.label(), "gpus": self.gpus, "tp": self.tp, "pp": self.pp,
                "zero": self.zero, "layer_split": self.kind == "layer_split", "offload": self.offload}


def strategy_of(spec):
    """The Strategy a spec's own parallelism flags describe."""
    n = spec.gpus
    if n == 1:
        return Strategy("single")
    if spec.layer_split:
        return Strategy("layer_split", n)
    if spec.zero:
        kind = "zero3_offload" if spec.zero == 3 and spec.offload == "optimizer" else f"zero{spec.zero}"
        return Strategy(kind, n, tp=spec.tp, pp=spec.pp, zero=spec.zero, offload=spec.offload)
    if spec.tp > 1 and spec.pp > 1:
        return Strategy("tp_pp", n, tp=spec.tp, pp=spec.pp, offload=spec.offload)
    if spec.tp > 1:
        return Strategy("tp" if spec.tp == n else "tp_ddp", n, tp=spec.tp, offload=spec.offload)
    return Strategy("ddp", n, pp=spec.pp, offload=spec.offload)


def _tp_ok(shape, t):
    kv = shape.n_kv_heads
    return shape.n_heads % t == 0 and (kv % t == 0 or t % kv == 0)


def _tp_degrees(shape, n):
    """Tensor-parallel degrees 1 < t < n that divide n and the heads (a divisor of the heads: a short list)."""
    return [t for t in range(2, min(n, shape.n_heads + 1)) if n % t == 0 and _tp_ok(shape, t)]


def candidates(shape, mode, n, for_speed=False):
    """Strategies to try on n GPUs: inference — layer split, TP, TP×PP; training — DDP, ZeRO-1/2/3 (+ offload), TP."""
    if n == 1:
        return [Strategy("single")]
    out = []
    if mode == "inference":
        if n <= shape.n_layers:
            out.append(Strategy("layer_split", n))
        if _tp_ok(shape, n):
            out.append(Strategy("tp", n, tp=n))
        for t in _tp_degrees(shape, n):
            if n // t <= shape.n_layers:
                out.append(Strategy("tp_pp", n, tp=t, pp=n // t))
    else:
        out += [Strategy("ddp", n), Strategy("zero1", n, zero=1), Strategy("zero2", n, zero=2),
                Strategy("zero3", n, zero=3), Strategy("zero3_offload", n, zero=3, offload="optimizer")]
        if _tp_ok(shape, n):
            out.append(Strategy("tp", n, tp=n))
        if for_speed:
            out += [Strategy("tp_ddp", n, tp=t) for t in _tp_degrees(shape, n)]
    return out


@dataclass(frozen=True)
class Option:
    """One strategy evaluated: its per-GPU peak (worst GPU) and whether it fits."""

    strategy: Strategy
    per_gpu_bytes: int  # predicted peak_device_bytes of the GPU that needs the most
    peak_phase: str
    fits: bool

    def to_dict(self):
        return {"strategy": self.strategy.label(), "gpus": self.strategy.gpus, "per_gpu_bytes": self.per_gpu_bytes,
                "peak_phase": self.peak_phase, "fits": self.fits}


class Planner:
    """Plans one workload on one GPU type. `spec` is the workload; its parallelism flags are the user's own plan.

    `overheads`: the device overheads for this GPU (a calibration table's, or the uncalibrated defaults)."""

    def __init__(self, spec, gpu, margin=0.0, max_gpus=DEFAULT_MAX_GPUS, overheads=DEFAULT_OVERHEADS):
        if not 0 <= margin < 1:
            raise SpecError(f"--margin {margin:g}: must be a fraction in [0, 1), e.g. 0.05 or 5%")
        if not 1 <= max_gpus <= MAX_GPUS_LIMIT:
            raise SpecError(f"--max-gpus {max_gpus:,}: must be an integer from 1 to {MAX_GPUS_LIMIT:,}")
        self.hw = get_hardware(gpu)
        self.overheads = overheads
        self.calibrated = overheads.calibrated
        self.margin = margin
        self.usable_bytes = int(self.hw.usable_bytes * (1 - margin))
        self.max_gpus = max_gpus
        self.shape = get_shape(spec.model)
        self.spec = validate(spec, self.shape)  # fail on bad flags before any search
        self.user_spec = spec
        # the workload without the user's parallelism: the search's starting point
        self.base = spec.replace(gpus=1, tp=1, pp=1, zero=0, layer_split=False, offload="none")
        self._cache = {}

    # ------------------------------------------------------------------ memory

    def predict(self, spec):
        """Per-GPU prediction with this GPU's overheads (cached)."""
        if spec not in self._cache:
            self._cache[spec] = predict(spec, self.overheads)
        return self._cache[spec]

    def evaluate(self, strategy, spec=None):
        """Option for one strategy, or None when the strategy is not valid for this model."""
        try:
            p = self.predict(strategy.apply(spec or self.base))
        except SpecError:
            return None
        return Option(strategy, p.peak_device_bytes, p.peak_phase, p.peak_device_bytes <= self.usable_bytes)

    def fit(self):
        """Does the workload, as given (its own --gpus/--tp/--zero …), fit? Margin = usable − per-GPU peak."""
        p = self.predict(self.user_spec)
        return {"strategy": strategy_of(p.spec).label(), "gpus": p.spec.gpus, "per_gpu_bytes": p.peak_device_bytes,
                "peak_phase": p.peak_phase, "usable_bytes": self.usable_bytes,
                "margin_bytes": self.usable_bytes - p.peak_device_bytes,
                "fits": p.peak_device_bytes <= self.usable_bytes, "binds": "memory"}

    def options_at(self, n, spec=None, for_speed=False):
        """Every valid strategy on exactly n GPUs, evaluated."""
        mode = (spec or self.base).mode
        return [o for o in (self.evaluate(s, spec) for s in candidates(self.shape, mode, n, for_speed)) if o]

    @staticmethod
    def _memory_rank(o):
        # GPUs are there for memory: the most headroom wins; offload (slow) only when nothing else fits.
        return (o.strategy.offload != "none", o.per_gpu_bytes, ORDER.index(o.strategy.kind))

    @staticmethod
    def _speed_rank(o):
        # GPUs are there for speed: the least communication wins.
        return (o.strategy.offload != "none", ORDER.index(o.strategy.kind), o.per_gpu_bytes)

    def _fitting_at(self, n, spec):
        opts = self.options_at(n, spec)
        return [o for o in opts if o.fits], opts

    def fewest_gpus(self, spec=None):
        """(chosen Option, all Options at that count) for the fewest GPUs that fit, or (None, []) up to max_gpus.

        Every count up to EXHAUSTIVE_GPUS is tried (tensor parallelism fits only where the heads divide);
        beyond, the sharded strategies only get smaller per GPU as GPUs are added, so the count doubles
        until something fits and the first fitting count is bisected: a few dozen predictions, not max_gpus."""
        for n in range(1, min(self.max_gpus, EXHAUSTIVE_GPUS) + 1):
            ok, opts = self._fitting_at(n, spec)
            if ok:
                return min(ok, key=self._memory_rank), opts
        lo = EXHAUSTIVE_GPUS  # the largest count known not to fit
        hi = lo
        while hi < self.max_gpus:
            hi = min(2 * hi, self.max_gpus)
            ok, opts = self._fitting_at(hi, spec)
            if ok:
                break
            lo = hi
        else:
            return None, []
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._fitting_at(mid, spec)[0]:
                hi = mid
            else:
                lo = mid
        ok, opts = self._fitting_at(hi, spec)
        return min(ok, key=self._memory_rank), opts

    def at_least(self, n_min, spec=None, limit=None):
        """The simplest fitting plan on the fewest GPUs ≥ n_min (GPUs added for speed), or None."""
        limit = min(limit or max(2 * n_min, n_min + 64), MAX_GPUS)  # past MAX_GPUS every spec is refused
        for n in range(max(1, n_min), limit + 1):
            ok = [o for o in self.options_at(n, spec, for_speed=True) if o.fits]
            if ok:
                return min(ok, key=self._speed_rank)
        return None

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
        s = self._largest(lambda v: self._fits(spec.replace(seq=v)), 1, cap)
        if s >= cap:
            binds = f"the model's context window ({window:,} positions)" if window else f"search cap {SEQ_CAP:,}"
        else:
            binds = "memory"
        return {"seq": s, "context": s + gen if s > 0 else 0, "binds": binds}

    # ------------------------------------------------------------------ time

    def matmul_peak(self, spec):
        """Peak dense FLOP/s of one GPU for this workload's matmuls, and the tensor path."""
        flops, path = self.hw.matmul_flops(spec.dtype, spec.compute_dtype)
        return flops, path

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
        s = self.predict(spec).spec
        if s.method not in ("lora", "qlora"):
            return 0
        return lora_params(resolve_targets(self.shape, s.lora_targets), s.lora_rank)

    def training_time(self, spec, tokens, mfu, deadline_s=None):
        """FLOPs for `tokens` trained tokens, time on the plan's GPUs at `mfu`, and the GPUs a deadline needs."""
        s = self.predict(spec).spec
        peak, path = self.matmul_peak(s)
        per_token = training_flops_per_token(self.shape, s.seq, s.method, s.trainable_layers, s.grad_ckpt,
                                             self.trainable_params(spec))
        total = per_token * tokens
        rate = peak * mfu
        out = {"tokens": tokens, "flops_per_token": per_token, "flops": total, "matmul_path": path,
               "peak_flops_per_gpu": peak, "mfu": mfu, "sustained_flops_per_gpu": rate,
               "seconds_on_plan": total / (rate * s.gpus), "gpus_on_plan": s.gpus}
        if deadline_s:
            out["deadline_seconds"] = deadline_s
            out["gpus_for_compute"] = gpus_for_deadline(total, deadline_s, rate)
        return out

    # ------------------------------------------------------------------ the whole answer

    def answer(self, tokens=None, deadline_s=None, mfu=DEFAULT_MFU, tokens_per_byte=None, data_bytes=None):
        """Every question at once, as a JSON-ready dict (bytes as integers)."""
        s = self.spec
        fit = self.fit()
        chosen, opts = self.fewest_gpus()
        if not fit["fits"]:
            # what the user's own plan can hold instead: the longest sequence at their batch
            fit["longest_context"] = self.longest_context(self.user_spec)
        ans = {
            "model": model_label(self.shape.name), "mode": s.mode, "method": s.method if s.mode == "train" else None,
            "gpu": {"name": self.hw.name, "memory_bytes": self.hw.memory_bytes, "memory_gb_base": self.hw.memory_gb_base,
                    "reported_total_bytes": self.hw.reported_total_bytes or None, "usable_bytes": self.usable_bytes,
                    "bandwidth_bytes_per_s": self.hw.bandwidth_bytes_per_s},
            "safety_margin": self.margin, "calibrated": self.calibrated, "overheads_source": self.overheads.source,
            "fit": fit,
            "fewest": None, "candidates": [o.to_dict() for o in opts],
            "gpus_needed": None, "strategy": None, "strategy_spec": None, "per_gpu_bytes": None,
            "largest_batch": None, "longest_context": None, "time": None, "binds": "memory",
            "assumptions": self.assumptions(mfu, tokens_per_byte, data_bytes is not None),
        }
        if chosen is None:
            ans["fewest"] = {"gpus": None, "note": f"does not fit on up to {self.max_gpus} × {self.hw.name} "
                                                   "with any strategy tried"}
            return ans
        ans["fewest"] = {"gpus": chosen.strategy.gpus, "strategy": chosen.strategy.label(),
                         "per_gpu_bytes": chosen.per_gpu_bytes, "peak_phase": chosen.peak_phase, "binds": "memory"}
        final, final_opt = chosen.strategy, chosen
        # limits and speed on the user's own plan when it fits, else on the fewest-GPU plan
        plan_spec = self.user_spec if fit["fits"] else chosen.strategy.apply(self.base)
        ans["limits_on"] = strategy_of(self.predict(plan_spec).spec).label()
        ans["largest_batch"] = self.largest_batch(plan_spec)
        ans["longest_context"] = self.longest_context(plan_spec)
        if s.mode == "inference":
            t = self.inference_speed(plan_spec)
            t["on"] = ans["limits_on"]
            ans["time"] = t
        elif tokens:
            t = self.training_time(chosen.strategy.apply(self.base), tokens, mfu, deadline_s)
            if data_bytes is not None:
                t["data_bytes"], t["tokens_per_byte"] = data_bytes, tokens_per_byte
            t["seconds_on_fewest"] = t.pop("seconds_on_plan")
            t.pop("gpus_on_plan")
            if deadline_s:
                need = max(chosen.strategy.gpus, t["gpus_for_compute"])
                best = self.at_least(need)
                if best is not None:
                    final, final_opt = best.strategy, best
                    t["gpus_for_deadline"] = best.strategy.gpus
                    t["seconds_on_deadline_plan"] = t["flops"] / (t["sustained_flops_per_gpu"] * best.strategy.gpus)
                    ans["binds"] = "compute" if t["gpus_for_compute"] > chosen.strategy.gpus else "memory"
            ans["time"] = t
        ans["gpus_needed"] = final.gpus
        ans["strategy"] = final.label()
        ans["strategy_spec"] = final.to_dict()
        ans["per_gpu_bytes"] = final_opt.per_gpu_bytes
        return ans

    def assumptions(self, mfu, tokens_per_byte, from_bytes):
        """What every number rests on, printed with the answer."""
        a = [
            f"memory: formulas.predict per GPU (the GPU that needs the most); device overheads: "
            f"{self.overheads.source}",
            f"usable memory: {'reported total' if self.hw.reported_total_bytes else 'nominal capacity'} of the "
            f"{self.hw.name} less a {self.margin:.0%} safety margin",
            "fewest GPUs: strategies tried per count — inference: 1 GPU, layer split, TP, TP×PP; training: DDP, "
            "ZeRO-1/2/3, ZeRO-3 + optimizer offload, TP; most headroom wins a tie, offload only when nothing else fits",
            "times use dense peak tensor throughput and peak bandwidth from formulas/catalog/hardware.json; "
            "communication between GPUs is not counted",
        ]
        if self.spec.mode == "inference":
            a.append("prefill time ≥ 2·N·tokens + causal attention FLOPs at peak (a lower bound); decode tokens/s ≤ "
                     "bandwidth / bytes read per step (weights, MoE experts actually routed to, whole KV cache), or the "
                     "FLOP bound if lower (upper bounds; real decode reaches ~70-90 % of peak bandwidth)")
        else:
            a.append(f"training FLOPs per token: 6·N full, 4·N LoRA/QLoRA (frozen base: no weight gradient), "
                     f"+2·N with gradient checkpointing, + attention (Kaplan et al. 2020; Korthikanti et al. 2022); "
                     f"MoE counts active parameters; sustained rate = peak × MFU {mfu:.0%}; GPUs scale linearly")
            if from_bytes:
                a.append(f"{tokens_per_byte:g} tokens per byte of text (about {1 / tokens_per_byte:g} bytes per "
                         "BPE token, typical of English; an assumption — a flag)")
        return a


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
                   mfu=DEFAULT_MFU, margin=0.0, max_gpus=DEFAULT_MAX_GPUS, overheads_for=None):
    """One entry per row × data size: GPUs needed to finish within the deadline.

    A row is a dict with model, method, dtype and optionally gpu (used when `gpu` is None) and
    seed_gpus (the seed's count per data size, copied into the output for comparison).
    `overheads_for(gpu name)` gives each GPU's device overheads (default: uncalibrated).
    """
    out = []
    for r in rows:
        spec = base_spec.replace(model=r["model"], method=r["method"], dtype=r["dtype"], mode="train")
        name = gpu or r.get("gpu") or "A100 80GB"
        pl = Planner(spec, name, margin, max_gpus, overheads_for(name) if overheads_for else DEFAULT_OVERHEADS)
        chosen, _ = pl.fewest_gpus()
        for size in data_bytes:
            tokens = size * tokens_per_byte
            row = {"model": model_label(pl.shape.name), "method": r["method"], "dtype": pl.spec.dtype, "gpu": pl.hw.name,
                   "data_bytes": size, "tokens": tokens, "seed_gpus": (r.get("seed_gpus") or {}).get(size)}
            if chosen is None:
                row.update(gpus=None, strategy=f"no fit on ≤ {max_gpus}", per_gpu_bytes=None, seconds=None,
                           binds="memory", gpus_for_memory=None, gpus_for_compute=None, flops=None)
                out.append(row)
                continue
            t = pl.training_time(chosen.strategy.apply(pl.base), tokens, mfu, deadline_s)
            need = max(chosen.strategy.gpus, t["gpus_for_compute"])
            best = pl.at_least(need)
            row.update(gpus_for_memory=chosen.strategy.gpus, gpus_for_compute=t["gpus_for_compute"], flops=t["flops"],
                       binds="compute" if t["gpus_for_compute"] > chosen.strategy.gpus else "memory")
            if best is None:
                row.update(gpus=None, strategy="no fitting plan found", per_gpu_bytes=None, seconds=None)
            else:
                n = best.strategy.gpus
                row.update(gpus=n, strategy=best.strategy.label(), per_gpu_bytes=best.per_gpu_bytes,
                           seconds=t["flops"] / (t["sustained_flops_per_gpu"] * n))
            out.append(row)
    return out
