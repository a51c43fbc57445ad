"""`vramlab plan`: argument parsing and rendering for the planner (logic in formulas/plan.py).

Shares the workload flags of `vramlab predict` (cli/common.py) and adds the GPU, the safety
margin, the topology (GPUs per node, nodes, the network between them, host RAM) and the time questions. Device overheads come from the same calibration lookup as
`vramlab predict` (the newest table fitted on that GPU, else the uncalibrated defaults). Bad
input is one line on stderr naming the flag, exit status 2. No torch, no pandas.
"""

import json

from formulas.units import (
    GiB,
    fmt_gib,
    parse_count,
    parse_duration,
    parse_fraction,
    parse_size,
)

from .common import (
    add_spec_arguments,
    calibration_line,
    check_version_flags,
    flag_value,
    spec_from_args,
    warn_beyond_positions,
)
from .engines import add_engine_arguments


def _stack_line(spec):
    """The library versions the plan's predictions assumed (formulas/stack.py)."""
    return "stack: " + " · ".join(f"{p} {v}" for p, v in spec.stack) + " (`vramlab stack` for what they change)"


def add_parsers(subparsers):
    """Register `vramlab plan`."""
    p = subparsers.add_parser(
        "plan", help="which GPUs, how many, how long: fit, fewest GPUs, largest batch/context, time, fine-tuning table",
        description="Plan a workload on a GPU type: does it fit, the fewest GPUs and the strategy, the largest batch "
                    "and context, prefill/decode bounds, fine-tuning time and the GPUs a deadline needs. "
                    "--table prints a seeds-style fine-tuning table (--model seeds, or a comma list).")
    add_spec_arguments(p)
    p.add_argument("--gpu", default=None, help="GPU type from the hardware catalog, e.g. 'RTX 4090', 'A100 80GB', H100")
    p.add_argument("--margin", default="0%", help="safety margin kept free on each GPU, e.g. 5%% or 0.05 (default 0%%)")
    p.add_argument("--max-gpus", type=int, default=1024, help="how far the fewest-GPU search looks (default 1024)")
    t = p.add_argument_group("topology", "the nodes the GPUs sit in (defaults: the catalog's node for the GPU type — "
                                         "8 per node for data-centre parts, a 4-card box for consumer cards)")
    t.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs per node: tensor parallelism stays inside one (default: the GPU type's usual node)")
    t.add_argument("--nodes", type=int, default=0, help="at most this many nodes (default: as many as needed)")
    t.add_argument("--inter-node-gbps", type=float, default=None,
                   help="network between nodes, Gb/s per node (default: the node's, e.g. 8 × 400 for a DGX H100)")
    t.add_argument("--host-ram", default=None,
                   help="CPU RAM per node, e.g. 256GiB: offload plans that need more are refused (default: the node's "
                        "where the catalog knows it)")
    t.add_argument("--fastest-on", type=int, default=None,
                   help="training: the GPU count for 'fastest on N' (default: --gpus, else whole nodes from the fewest "
                        "count that needs no offload)")
    p.add_argument("--tokens", default=None, help="training tokens for the time question, e.g. 2B, 500M")
    p.add_argument("--data", default=None, help="bytes of training text instead of --tokens, e.g. 1GB, 100G")
    p.add_argument("--tokens-per-byte", type=float, default=0.25,
                   help="tokens per byte of text when --data is given (assumption; default 0.25 ≈ 4 bytes per token)")
    p.add_argument("--mfu", default="0.4", help="model-FLOPs utilisation for training time, e.g. 0.4 or 40%% (default 0.4)")
    p.add_argument("--deadline", default=None, help="finish training within this time, e.g. 1d, 24h, 90m")
    p.add_argument("--table", action="store_true",
                   help="fine-tuning table: models (--model seeds or a comma list) × data sizes × deadline")
    p.add_argument("--data-sizes", default="1K,1M,1G,10G,100G,1T", help="--table: bytes of text per column (decimal)")
    p.add_argument("--calibration", default=None,
                   help="calibration table from `vramlab fit` (default: the newest in results/calibration/ per GPU type)")
    p.add_argument("--json", action="store_true", help="print the answer as JSON (bytes as integers)")
    add_engine_arguments(p)
    p.set_defaults(func=cmd_plan)
    return p


# ------------------------------------------------------------------ formatting

def _dur(s):
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 86400:
        return f"{s / 3600:.1f} h"
    d = s / 86400
    return f"{d:,.3g} day" if d == 1 else f"{d:,.3g} days"


def _count(n):
    for div, suf in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g}{suf}"
    return f"{n:.3g}"


def _size(n):
    for div, suf in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "KB")):
        if n >= div:
            return f"{n / div:.3g} {suf}"
    return f"{n:.0f} B"


def _head(ans, spec):
    s = spec
    if s.mode == "inference":
        work = f"inference · {s.dtype} · {s.batch} {'user' if s.batch == 1 else 'users'} × prompt {s.seq:,}" + \
               (f" + gen {s.gen:,}" if s.gen else "")
    else:
        work = f"train · {s.method} · {s.dtype} · batch {s.batch} × seq {s.seq:,}" + \
            (" · grad-ckpt" if s.grad_ckpt else "")
    g = ans["gpu"]
    base = "nvidia-smi's reported total" if g["reported_total_bytes"] else "nominal"
    usable = f"usable {fmt_gib(g['usable_bytes'])} ({base}, {ans['safety_margin']:.0%} safety margin)"
    head = f"{ans['model']} · {work}\non {g['name']}: {fmt_gib(g['memory_bytes'])} nominal, {usable}"
    return head + "\n" + _topology_line(ans)


def _topology_line(ans):
    t = ans["topology"]
    n = t["gpus_per_node"]
    inside = (f"{t['fast_link']} {t['fast_bytes_per_s'] / 1e9:g} GB/s each way" +
              (f" between pairs, else {t['pcie']} {t['pcie_bytes_per_s'] / 1e9:g} GB/s"
               if t["fast_domain"] < n else "")) if t["fast_link"] and t["fast_domain"] > 1 else \
        f"{t['pcie']} {t['pcie_bytes_per_s'] / 1e9:g} GB/s each way"
    net = (f"; between nodes {t['network_bytes_per_s_per_gpu'] * n / 1e9:g} GB/s each way per node"
           if t["network"] else "; one node")
    ram = f"; host RAM {t['host_ram_bytes_per_node'] / GiB:,.0f} GiB per node" if t["host_ram_bytes_per_node"] else ""
    return f"topology: {n} GPUs per node ({t['node']}), {inside}{net}{ram}"


def render(ans, spec):
    """The readable answer `vramlab plan` prints."""
    L = [_head(ans, spec), ""]
    f = ans["fit"]
    verdict = "fits" if f["fits"] else "does not fit"
    L.append(f"fit as given ({f['strategy']}): {verdict}, {fmt_gib(f['per_gpu_bytes'])} per GPU at {f['peak_phase']}, "
             f"margin {(f['margin_bytes']) / GiB:+.2f} GiB   [binds: memory]")
    if not f["fits"]:
        c = f["longest_context"]
        if c["seq"] > 0:
            what = f"prompt {c['seq']:,}" + (f" + gen {spec.gen:,}" if spec.mode == "inference" and spec.gen else "") \
                if spec.mode == "inference" else f"seq {c['seq']:,}"
            L.append(f"  {f['strategy']} holds at most {what} at batch {spec.batch}   [binds: {c['binds']}]")
        else:
            L.append(f"  {f['strategy']} does not fit even a 1-token sequence at batch {spec.batch}")
    fw = ans["fewest"]
    if fw["gpus"] is None:
        L.append(f"fewest GPUs: {fw['note']}   [binds: memory]")
    elif spec.mode == "inference":
        L.append(f"fewest GPUs: {fw['gpus']} × {ans['gpu']['name']} — {fw['strategy']}, {fmt_gib(fw['per_gpu_bytes'])} "
                 f"per GPU at {fw['peak_phase']}   [binds: memory]")
        others = [c for c in ans["candidates"] if c["strategy"] != fw["strategy"]]
        if others:
            L.append("  also tried on " + f"{fw['gpus']}: " + " · ".join(
                f"{c['strategy']} {c['per_gpu_bytes'] / GiB:.2f} GiB {'fits' if c['fits'] else 'no'}" for c in others))
    else:
        L += _train_plan("fewest GPUs", fw, ans, "memory")
        for lv in ans["levers"]:
            without = (f"without it, {lv['gpus_without']:,}" if lv["gpus_without"]
                       else f"without it, none up to {ans['max_gpus']:,}")
            L.append(f"  fits with {lv['flag']} on {lv['gpus']:,} GPU{'s' if lv['gpus'] > 1 else ''}; {without}")
        L += _runner_ups(fw)
        fa = ans.get("fastest")
        if fa and fa.get("strategy"):
            if fa["strategy_spec"] == fw["strategy_spec"]:
                L.append(f"fastest on {fa['gpus']:,}: the same plan")
            else:
                L += _train_plan(f"fastest on {fa['gpus']:,}", fa, ans, "time")
                L += _runner_ups(fa)
        elif fa:
            L.append(f"fastest on {fa['gpus']:,}: {fa['note']}")
        ch = ans.get("cheapest")
        if ch:
            per_b = ch["gpu_seconds_per_million_tokens"] * 1000 / 3600
            same = [k for k, x in (("fewest", fw), ("fastest", fa or {})) if x.get("strategy_spec") == ch["strategy_spec"]]
            what = f"the {' and '.join(same)} plan" if same else \
                f"{ch['gpus']:,} × {ans['gpu']['name']} — {ch['strategy']}{_levers_txt(ch)}"
            L.append(f"cheapest: {what}, {per_b:,.1f} GPU-hours per billion tokens   [binds: time × GPUs]")
    if ans["largest_batch"] is not None:
        on = ans["limits_on"]
        b = ans["largest_batch"]
        if spec.mode == "inference":
            shape_txt = f"prompt {spec.seq:,}" + (f" + gen {spec.gen:,}" if spec.gen else "")
            L.append(f"most concurrent sequences on {on}: {b['value']:,} ({shape_txt})   [binds: {b['binds']}]")
        else:
            L.append(f"largest micro-batch on {on}: {b['value']:,} (seq {spec.seq:,})   [binds: {b['binds']}]")
        c = ans["longest_context"]
        extra = f" (prompt {c['seq']:,} + gen {spec.gen:,})" if spec.mode == "inference" and spec.gen else ""
        L.append(f"longest context on {on}: {c['context']:,} tokens{extra} at batch {spec.batch}   [binds: {c['binds']}]")
    t = ans["time"]
    if t and spec.mode == "inference":
        peak = t["peak_flops_per_gpu"] / 1e12
        L.append(f"time on {t['on']} (bounds from peak throughput, not measurements):")
        L.append(f"  prefill {spec.batch} × {spec.seq:,} tokens ≥ {_dur(t['prefill_seconds_min'])}   "
                 f"[binds: compute; {t['prefill_flops']:.3g} FLOPs at {peak:g} TFLOP/s {t['matmul_path']} per GPU]")
        L.append(f"  decode ≤ {t['decode_tokens_per_s_per_sequence_max']:,.1f} tokens/s per sequence, "
                 f"≤ {t['decode_tokens_per_s_total_max']:,.1f} tokens/s in total   [binds: {t['decode_binds']}; "
                 f"{fmt_gib(t['decode_bytes_per_step_per_gpu'])} read per step per GPU at "
                 f"{ans['gpu']['bandwidth_bytes_per_s'] / 1e9:,.0f} GB/s]")
        if "request_seconds_min" in t:
            L.append(f"  one request (prefill + {spec.gen:,} decode steps) ≥ {_dur(t['request_seconds_min'])}")
    elif t:
        src = (f" ({_size(t['data_bytes'])} of text × {t['tokens_per_byte']:g} tokens/byte)" if "data_bytes" in t else "")
        L.append(f"fine-tuning {_count(t['tokens'])} tokens{src}: {t['flops']:.3g} FLOPs "
                 f"({t['flops_per_token']:.3g} per token), at {t['peak_flops_per_gpu'] / 1e12:g} TFLOP/s "
                 f"{t['matmul_path']} × MFU {t['mfu']:.0%} per GPU:")
        L.append(f"  on the fewest plan ({fw['gpus']} GPU{'s' if fw['gpus'] > 1 else ''}): "
                 f"{_dur(t['seconds_on_fewest'])}   [binds: {fw['step']['binds']}]")
        if t.get("gpus_for_deadline"):
            L.append(f"  within {_dur(t['deadline_seconds'])}: {t['gpus_for_deadline']:,} × {ans['gpu']['name']} — "
                     f"{ans['strategy']}{_levers_txt({'levers': ans['plan_levers']})}, "
                     f"{fmt_gib(ans['per_gpu_bytes'])} per GPU, done in "
                     f"{_dur(t['seconds_on_deadline_plan'])}   [binds: {ans['binds']}; compute alone needs "
                     f"{t['gpus_for_compute']:,}, memory {fw['gpus']:,}]")
            L.append(f"    run with: {ans['framework']}")
        elif "deadline_seconds" in t:
            L.append(f"  within {_dur(t['deadline_seconds'])}: {t['note']}   [binds: compute; compute alone needs "
                     f"{t['gpus_for_compute']:,}]")
    L.append("")
    L.append(calibration_line(ans["calibrated"], ans["overheads_source"]))
    L.append(_stack_line(spec))
    L.append("assumptions:")
    L += [f"  - {a}" for a in ans["assumptions"]]
    return "\n".join(L)


def _levers_txt(p):
    return (" + " + ", ".join(p["levers"])) if p.get("levers") else ""


def _train_plan(title, p, ans, binds):
    """A training plan: strategy and levers, per-GPU memory, host RAM, time per step, the framework."""
    st = p["step"]
    L = [f"{title}: {p['gpus']:,} × {ans['gpu']['name']} — {p['strategy']}{_levers_txt(p)}, "
         f"{fmt_gib(p['per_gpu_bytes'])} per GPU at {p['peak_phase']}   [binds: {binds}]"]
    L.append(f"  run with: {p['framework']}")
    if p.get("host_bytes_per_node"):
        L.append(f"  host RAM: {fmt_gib(p['host_bytes_per_node'])} per node pinned for the offloaded state"
                 + (f" ({p['nodes']} nodes)" if p.get("nodes", 1) > 1 else ""))
    parts = [f"compute {_dur(st['compute_seconds'])}"]
    if st["bubble_seconds"]:
        parts.append(f"pipeline bubble {_dur(st['bubble_seconds'])}")
    parts += [f"{k} {_dur(v)}" for k, v in st["exposed_seconds"].items()]
    parts += [f"{k} busy {_dur(v)}" for k, v in st["link_busy_seconds"].items() if v >= 0.001]
    L.append(f"  {_dur(st['seconds'])} per step of {st['tokens_per_gpu']:,} tokens per GPU, "
             f"{p['tokens_per_second']:,.0f} tokens/s   [binds: {st['binds']}; " + ", ".join(parts) + "]")
    return L


def _runner_ups(p):
    if not p.get("runner_ups"):
        return []
    return [f"  runner-up: {r['strategy']}{_levers_txt(r)} — {r['why']}" for r in p["runner_ups"]]


def render_compare(answers, spec):
    """One line per GPU type: fewest GPUs, strategy, per-GPU memory, a speed bound, price."""
    a0 = answers[0]
    note = "decode speeds are bounds" if spec.mode == "inference" else \
        "times are estimates: compute at peak × MFU, communication at the links' peak"
    L = [_head(a0, spec).split("\n")[0],
         f"on each GPU type: the GPUs needed (memory, or the deadline when one is given); {note}", ""]
    speed = "decode tok/s/seq ≤" if spec.mode == "inference" else "time"
    w = max([22] + [len(a["strategy"] or "") for a in answers])
    head = f"{'GPU':<21} {'GiB':>6} {'fits on 1?':>13} {'GPUs':>6}  {'strategy':<{w}} {'GiB/GPU':>7} {speed:>19}  price"
    L += [head, "-" * len(head)]
    for ans in answers:
        g, f, fw = ans["gpu"], ans["fit"], ans["fewest"]
        one = f"{'fits' if f['fits'] else 'no'} {f['margin_bytes'] / GiB:+.1f}"
        t = ans["time"] or {}
        if spec.mode == "inference":
            sp = f"{t['decode_tokens_per_s_per_sequence_max']:,.1f}" if t else "—"
        else:
            secs = t.get("seconds_on_deadline_plan", t.get("seconds_on_fewest"))
            sp = _dur(secs) if secs else "—"
        price = _price(ans["gpu"]["name"])
        if fw["gpus"] is None or ans["gpus_needed"] is None:
            L.append(f"{g['name']:<21} {g['memory_bytes'] / GiB:>6.0f} {one:>13} {'—':>6}  "
                     f"{'no fit' if fw['gpus'] is None else 'not in time':<{w}} "
                     f"{'—':>7} {'—':>19}  {price}")
            continue
        L.append(f"{g['name']:<21} {g['memory_bytes'] / GiB:>6.0f} {one:>13} {ans['gpus_needed']:>6}  "
                 f"{ans['strategy']:<{w}} "
                 f"{ans['per_gpu_bytes'] / GiB:>7.2f} {sp:>19}  {price}")
    L.append("")
    L += sorted({calibration_line(a["calibrated"], a["overheads_source"]) for a in answers})
    L.append(_stack_line(spec))
    L.append("assumptions:")
    L += [f"  - {x}" for x in a0["assumptions"] if not x.startswith("usable memory")]
    L.append("  - usable memory: nvidia-smi's reported total where the catalog has one, else the nominal capacity")
    return "\n".join(L)


def _price(name):
    from formulas.hardware import get_hardware

    p = get_hardware(name).price
    if not p:
        return "—"
    sym = {"USD": "$", "CNY": "¥"}.get(p["currency"], p["currency"] + " ")
    est = " (est.)" if "estimate" in p.get("kind", "") else ""
    return f"{sym}{p['amount']:,}{est}"


def render_table(rows, gpu_label, deadline_s, assumptions):
    """The seeds-style fine-tuning table."""
    seeds = any(r.get("seed_gpus") for r in rows)
    L = [f"Fine-tuning within {_dur(deadline_s)} on {gpu_label}: GPUs needed (memory or compute, whichever binds)", ""]
    head = (f"{'model':<29} {'method':<6} {'GPU':<10} {'data':>7} {'tokens':>7} {'GPUs':>6}"
            + (f" {'seed':>5}" if seeds else "") + f" {'GiB/GPU':>8} {'time':>10}  {'binds':<7} strategy")
    L += [head, "-" * len(head)]
    for r in rows:
        name = r["model"].split("/")[-1]
        gpus = f"{r['gpus']:,}" if r["gpus"] else "—"
        mem = f"{r['per_gpu_bytes'] / GiB:.1f}" if r["per_gpu_bytes"] else "—"
        took = _dur(r["seconds"]) if r["seconds"] is not None else "—"
        seed = (f" {r['seed_gpus'] if r.get('seed_gpus') else '—':>5}") if seeds else ""
        L.append(f"{name:<29} {r['method']:<6} {r['gpu']:<10} {_size(r['data_bytes']):>7} {_count(r['tokens']):>7} "
                 f"{gpus:>6}{seed} {mem:>8} {took:>10}  {r['binds']:<7} {r['strategy']}")
    L.append("")
    if seeds:
        L.append("seed: the GPU count the seed table (../shared/seeds/003) gives for that row and data size")
    L.append("assumptions:")
    L += [f"  - {a}" for a in assumptions]
    return "\n".join(L)


# ------------------------------------------------------------------ command

def _gpu_list(text):
    """--gpu NAME, a comma list, or 'all'."""
    from formulas.hardware import get_hardware, hardware_names

    if text.strip().lower() == "all":
        return hardware_names()
    names = [g.strip() for g in text.split(",") if g.strip()]
    for g in names:
        get_hardware(g)  # fail early, naming --gpu
    return names


def _cmd_engine_plan(a, margin, overheads):
    """`plan --engine E --users N --ctx L --gpu G`: fewest GPUs, largest context per user, most users."""
    from formulas.catalog import get_shape
    from formulas.hardware import get_hardware
    from formulas.spec import SpecError

    from .engines import engine_flags, plan_engine, render_engine_plan

    if a.gpu.strip().lower() == "all" or "," in a.gpu:
        raise SpecError(f"--gpu {a.gpu}: with --engine, name one GPU type (the engine plan is for one card; "
                        "comparing GPU types is plan without --engine)")
    taken = engine_flags(a, "plan")
    if a.engine in ("llama.cpp", "ollama"):  # the engine's own model (a GGUF), placement and default dtype
        from .llamacpp import cmd_plan_llamacpp

        return cmd_plan_llamacpp(a, taken, margin)
    gpu = get_hardware(a.gpu)
    from formulas.spec import validate

    spec = spec_from_args(a)
    spec = validate(spec, get_shape(spec.model))
    a.users = spec.batch  # --users is --batch: the concurrent users, each of --ctx tokens
    usable = int(gpu.usable_bytes * (1 - margin))
    ans = plan_engine(a, spec, get_shape(spec.model), gpu, taken, overheads, usable)
    if a.json:
        print(json.dumps(ans, indent=2))
    else:
        print(render_engine_plan(ans, gpu))
    return 0


def cmd_plan(a):
    from formulas import plan as P
    from formulas.hardware import hardware_names
    from formulas.spec import SpecError

    from ..analysis.calibrate import overheads_for

    if not a.gpu and not a.table:
        raise SpecError(f"--gpu: name a GPU type; known: {', '.join(hardware_names())}")
    margin = flag_value(parse_fraction, "--margin", a.margin)
    mfu = flag_value(parse_fraction, "--mfu", a.mfu, False, True)
    if not 0 < a.tokens_per_byte <= 10:
        raise SpecError(f"--tokens-per-byte {a.tokens_per_byte:g}: must be in (0, 10]")
    if a.tokens and a.data:
        raise SpecError("--data: give --tokens or --data, not both")
    deadline = flag_value(parse_duration, "--deadline", a.deadline) if a.deadline else None
    overheads = lambda gpu: overheads_for(gpu, a.calibration)  # noqa: E731  (predict's lookup, per GPU type)
    if a.table:
        return _cmd_table(a, P, margin, mfu, deadline, overheads)
    if a.engine != "transformers":
        check_version_flags(a)
        return _cmd_engine_plan(a, margin, overheads(a.gpu))
    spec = spec_from_args(a)
    data_bytes = flag_value(parse_size, "--data", a.data, 1) if a.data else None
    tokens = flag_value(parse_count, "--tokens", a.tokens) if a.tokens else (
        int(data_bytes * a.tokens_per_byte) if data_bytes else None)
    if spec.mode != "train":
        for flag, v in (("--deadline", a.deadline), ("--tokens", a.tokens), ("--data", a.data)):
            if v:
                raise SpecError(f"{flag} {v}: fine-tuning time applies to --mode train")
    if deadline and not tokens:
        raise SpecError(f"--deadline {a.deadline}: also give --tokens or --data (how much to train on)")
    if tokens is not None and tokens < 1:
        raise SpecError(f"--data {a.data}: less than one token at --tokens-per-byte {a.tokens_per_byte:g}")
    answers = []
    topo = _topology_args(a)
    for g in _gpu_list(a.gpu):
        planner = P.Planner(spec, g, margin, a.max_gpus, overheads(g), mfu=mfu, **topo)
        answers.append(planner.answer(tokens=tokens, deadline_s=deadline, mfu=mfu,
                                      tokens_per_byte=a.tokens_per_byte if data_bytes else None,
                                      data_bytes=data_bytes, fastest_on=a.fastest_on))
    warn_beyond_positions("plan", planner.spec)  # only once the answer stands: bad input is one line
    for ans in answers:
        ans["stack"] = dict(planner.spec.stack)
    if len(answers) > 1:
        print(json.dumps(answers, indent=2) if a.json else render_compare(answers, planner.spec))
        return 0
    ans = answers[0]
    if a.json:
        print(json.dumps(ans, indent=2))
    else:
        print(render(ans, planner.spec))
    return 0


def _topology_args(a):
    """The topology flags as Planner keyword arguments (checked there: one line naming the flag)."""
    from formulas.spec import SpecError

    host = flag_value(parse_size, "--host-ram", a.host_ram, 1) if a.host_ram else None
    if a.fastest_on is not None and a.fastest_on < 1:
        raise SpecError(f"--fastest-on {a.fastest_on}: must be a GPU count ≥ 1")
    return dict(gpus_per_node=a.gpus_per_node, nodes=a.nodes, inter_node_gbps=a.inter_node_gbps, host_ram_bytes=host)


def _cmd_table(a, P, margin, mfu, deadline, overheads):
    from formulas.hardware import hardware_names
    from formulas.spec import SpecError

    deadline = deadline or parse_duration("1d")
    if a.model.strip().lower() == "seeds":
        rows = P.SEED_ROWS
    else:
        from ..hub import resolve_model
        from ..inventory import ensure_for_model

        models = [resolve_model(m.strip()) for m in a.model.split(",") if m.strip()]
        for m in models:
            ensure_for_model(m)
        rows = tuple(dict(model=m, method=a.method, dtype=a.dtype.lower()) for m in models)
    if not rows:
        raise SpecError(f"--model {a.model}: give 'seeds' or a comma list of models")
    if not a.gpu and a.model.strip().lower() != "seeds":
        raise SpecError(f"--gpu: name a GPU type for the table; known: {', '.join(hardware_names())}")
    sizes = tuple(flag_value(parse_size, "--data-sizes", x, 1) for x in a.data_sizes.split(",") if x.strip())
    if not sizes:
        raise SpecError(f"--data-sizes {a.data_sizes}: give a comma list, e.g. 1K,1M,1G")
    base = spec_from_args(a, resolve=False).replace(mode="train")
    topo = _topology_args(a)
    rows_out = P.finetune_table(rows, sizes, deadline, base, a.gpu, a.tokens_per_byte, mfu, margin, a.max_gpus,
                                overheads, **topo)
    r0 = rows[0]
    gpu0 = a.gpu or r0.get("gpu") or "A100 80GB"
    first = P.Planner(base.replace(model=r0["model"], method=r0["method"], dtype=r0["dtype"]), gpu0, margin,
                      a.max_gpus, overheads(gpu0), mfu=mfu, **topo)
    assumptions = [x for x in first.assumptions(mfu, a.tokens_per_byte, True)
                   if not x.startswith(("usable memory", "topology"))]
    s = first.spec
    assumptions.insert(1, f"usable memory: nvidia-smi's reported total where the catalog has one, else the nominal "
                          f"capacity, less a {margin:.0%} safety margin")
    assumptions.insert(2, "topology: each row's GPU type in its catalog node (8 per node for data-centre parts, 4 for "
                          "consumer cards) unless --gpus-per-node says otherwise; beyond one node, whole nodes")
    ckpt = "with gradient checkpointing" if s.grad_ckpt else "gradient checkpointing where it is needed"
    assumptions.append(f"each row: micro-batch {s.batch} × seq {s.seq:,}, {ckpt}, optimizer {s.optimizer}, LoRA "
                       f"r={s.lora_rank} on peft's default targets; GPUs added for speed take the fastest plan that "
                       "fits at that count")
    assumptions.append(calibration_line(first.calibrated, first.overheads.source))
    gpu_label = first.hw.name if a.gpu else "the seed table's GPU per row"
    if a.json:
        print(json.dumps({"gpu": a.gpu and first.hw.name, "deadline_seconds": deadline, "mfu": mfu,
                          "tokens_per_byte": a.tokens_per_byte, "calibrated": first.calibrated, "rows": rows_out,
                          "assumptions": assumptions}, indent=2))
    else:
        print(render_table(rows_out, gpu_label, deadline, assumptions))
    return 0
