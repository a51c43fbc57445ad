"""`vramlab stack`: the software-stack table (formulas/stack.py) and the stack a prediction would assume."""

import json

from .common import STACK_PACKAGES, add_stack_arguments, installed_versions, stack_from_args


def cmd_stack(a):
    from formulas.stack import BEHAVIOURS, NEWEST, OLDEST, behaviour

    stack = stack_from_args(a)
    if a.json:
        print(json.dumps({"stack": stack.to_dict(), "installed": installed_versions(),
                          "modelled": {p: [OLDEST[p], NEWEST[p]] for p in STACK_PACKAGES},
                          "behaviours": [{"key": b.key, "package": b.package, "since": b.since, "old": b.old,
                                          "new": b.new, "what": b.what, "source": b.source,
                                          "assumed": behaviour(stack, b.key)} for b in BEHAVIOURS]}, indent=2))
        return 0
    print(f"stack: {stack.label()}")
    print("modelled: " + " · ".join(f"{p} {OLDEST[p]}–{NEWEST[p]}" for p in STACK_PACKAGES))
    print("")
    print(f"{'behaviour':<23}{'package':<14}{'since':>8}  {'before':<11}{'since':<11}{'assumed':<11}")
    for b in BEHAVIOURS:
        print(f"{b.key:<23}{b.package:<14}{b.since:>8}  {str(b.old):<11}{str(b.new):<11}{str(behaviour(stack, b.key)):<11}")
    if a.verbose:
        for b in BEHAVIOURS:
            print(f"\n{b.key} ({b.package} {b.since}): {b.what}\n  source: {b.source}")
    else:
        print("\n(--verbose: what each behaviour does to memory, and the PR or source line that changed it)")
    return 0


def add_parsers(sub):
    """Register `stack`."""
    p = sub.add_parser("stack", help="the library versions a prediction assumes, and what changed across them",
                       description="Print the software-stack table: every behaviour that changes memory across "
                                   "transformers, peft, torch and bitsandbytes versions, the version that changed it "
                                   "and its source, with the value the given (or installed) versions get.")
    add_stack_arguments(p)
    p.add_argument("--verbose", action="store_true", help="what each behaviour does, and its source")
    p.add_argument("--json", action="store_true", help="the table as JSON")
    p.set_defaults(func=cmd_stack)
