"""`vramlab trace`: run a workload on fake tensors and print its memory beside the prediction.

Registered by `harness.cli.build_parser` through `add_trace_parser`; takes exactly the flags of
`vramlab predict` (shared `add_spec_arguments`), plus --json and --plot. torch and
transformers are imported only when the command runs.
"""

import json
import sys

from formulas import categories as C
from formulas.units import GiB

from .cli import _g, add_spec_arguments, spec_from_args


def _ratio(traced, predicted):
    if not predicted:
        return "—" if traced else ""
    return f"{traced / predicted:.3f}"


def render_trace(result, prediction):
    """The readable table `vramlab trace` prints: traced and predicted GiB per category, then totals."""
    s = result.spec
    head = f"{prediction.model} · {s.mode} · {s.dtype}"
    if s.mode == "train":
        head += f" · {s.method} · {s.optimizer} ({s.optimizer_impl}) · precision {s.precision}"
        head += (" · grad-ckpt" if s.grad_ckpt else "") + f" · batch {s.batch} × seq {s.seq}"
        head += f" × accum {s.grad_accum}" if s.grad_accum > 1 else ""
    else:
        head += f" · batch {s.batch} · prompt {s.seq}" + (f" + gen {s.gen}" if s.gen else "")
    lines = [head, f"{result.n_params:,} parameters · attention {s.attn} · traced on fake tensors in {result.seconds:.1f} s", ""]
    lines.append(f"{'category':<22}{'traced GiB':>12}{'predicted GiB':>15}{'ratio':>8}")
    for c in C.TENSOR_CATEGORIES:
        t, p = result.breakdown.get(c, 0), prediction.breakdown.get(c, 0)
        if t or p:
            lines.append(f"{c:<22}{_g(t):>12}{_g(p):>15}{_ratio(t, p):>8}")
    lines.append(f"{'peak allocated':<22}{_g(result.peak_allocated_bytes):>12}{_g(prediction.peak_allocated_bytes):>15}"
                 f"{_ratio(result.peak_allocated_bytes, prediction.peak_allocated_bytes):>8}"
                 f"   at {result.peak_phase} (predicted at {prediction.peak_phase})")
    lines.append(f"{'est. reserved':<22}{_g(result.estimated_reserved_bytes):>12}"
                 f"{'':>15}{'':>8}   modelled CUDA caching allocator (harness/allocator.py)")
    lines.append("")
    lines.append("phases (GiB allocated at each phase's peak, traced / predicted):")
    for ph, bd in result.phases.items():
        pred = sum(prediction.phases.get(ph, {}).values())
        lines.append(f"  {ph:<16}{sum(bd.values()) / GiB:10.2f} /{pred / GiB:8.2f}")
    for n in result.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def cmd_trace(a):
    from formulas.catalog import UnknownModelError
    from formulas.predict import predict
    from formulas.shapes import UnsupportedModelError
    from formulas.spec import SpecError

    try:
        spec = spec_from_args(a)
        prediction = predict(spec)
        from .trace import plot_timeline, trace

        result = trace(spec)
    except (SpecError, UnknownModelError, UnsupportedModelError, ValueError) as e:
        print(f"vramlab trace: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"vramlab trace: needs torch and transformers ({e.name} missing): pip install -e '.[harness]'", file=sys.stderr)
        return 2
    if a.plot:
        try:
            plot_timeline(result, a.plot)
        except OSError as e:
            print(f"vramlab trace: --plot {a.plot}: {e.strerror or e}", file=sys.stderr)
            return 2
    if a.json:
        d = result.to_dict()
        d["predicted"] = {"breakdown": prediction.breakdown, "peak_allocated_bytes": prediction.peak_allocated_bytes,
                          "peak_phase": prediction.peak_phase, "phases": prediction.phases}
        print(json.dumps(d, indent=2))
    else:
        print(render_trace(result, prediction))
    return 0


def add_trace_parser(subparsers):
    """Register `vramlab trace` (same flags as predict, plus --json and --plot)."""
    p = subparsers.add_parser("trace", help="run the workload on fake tensors and count bytes per category (CPU, no GPU)")
    add_spec_arguments(p)
    p.add_argument("--json", action="store_true", help="print the trace (and the prediction) as JSON (bytes)")
    p.add_argument("--plot", default=None, metavar="PATH", help="write a memory-over-time PNG to PATH")
    p.set_defaults(func=cmd_trace)
    return p
