"""The `vramlab` command: parsing and dispatch only, one module per verb.

    predict, models   cli/predict.py   the analytic prediction (formulas/)
    stack             cli/stack.py     the library versions a prediction assumes (formulas/stack.py)
    plan              cli/plan.py      which GPUs, how many, how long (formulas/plan.py)
    trace             cli/trace.py     the workload on fake tensors (harness/tracing/)
    run, results      cli/run.py       sweeps (harness/sweep/) and their records
    import            cli/importing.py published measurement sets → records (harness/analysis/published.py)
    fit, check, report  cli/fit.py, cli/check.py, cli/report.py   what the records say (harness/analysis/)
    show              cli/show.py      one measured record explained, its memory timeline
    doctor            cli/doctor.py    is this machine ready to measure (harness/doctor.py)

argparse (not a third-party CLI library) keeps `vramlab predict` free of heavy imports: it must
answer in well under half a second and never imports torch. Every command runs through
`common.run_command`: bad input is one line on stderr and exit status 2.
"""

import argparse
import os
import sys

from .. import __version__
from . import check, doctor, fit, importing, plan, predict, report, run, show, stack, trace
from .common import run_command

VERBS = (predict, plan, stack, trace, run, importing, fit, check, report, show, doctor)  # each registers its commands with add_parsers


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad flag reported in one line (and `vramlab COMMAND --help` pointed to) instead of usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _one_line_each(prog):
    """`vramlab --help`: every command on one line (argparse would wrap them at the terminal's width)."""
    return argparse.HelpFormatter(prog, max_help_position=16, width=160)


def build_parser():
    p = _Parser(prog="vramlab", description="How much GPU memory an LLM needs — predicted, traced, measured.",
                epilog="`vramlab COMMAND --help` lists a command's flags.", formatter_class=_one_line_each)
    p.add_argument("--version", action="version", version=f"vramlab {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    for verb in VERBS:
        verb.add_parsers(sub)
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    try:
        return run_command(a.command, a.func, a)
    except BrokenPipeError:  # `vramlab … | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
