"""Boundary searches: the largest batch or the longest sequence that runs without running out of memory, on the card.

A `search:` group of a sweep file (harness/sweep/schema.py) becomes one BoundarySearch per row: the
values lo, lo + step, …, hi of one axis (batch or seq), probed one at a time, each probe an ordinary
experiment with its own hash and record, an out-of-memory error kept as data. Memory grows with both
axes, so the values that run are those up to a boundary; the search ends with the largest value that
ran next to the smallest that ran out of memory, one grid step apart (or with `hi` running, or `lo`
not).

Where it starts: vramlab's own answer to the same question — `vramlab plan`'s largest batch or
longest context on the card the sweep caps the process to (formulas/plan.py, with the overheads
`vramlab plan --gpu` would use: `overheads`, which `vramlab run` and the report look up), taken down to the grid — so that where the prediction is right two
probes settle it. From there it gallops up while probes run (1, 2, 4 … steps) and down while they run
out of memory, then bisects. The next probe is a function of the outcomes known so far, not of their
order, so a rerun reads the records already written and goes on where it stopped.

A probe that fails for any other reason stops its search: such a failure says nothing about fitting.
So do outcomes that contradict the premise (a value that ran above one that did not).
"""

import dataclasses
from dataclasses import dataclass, field

FITS, DOES_NOT_FIT = "ok", "oom"


@dataclass
class BoundarySearch:
    """One search: its experiment at `lo` (`base`), the axis and its grid, and the outcomes so far."""

    base: object  # harness.sweep.schema.Experiment at the axis value `lo`
    axis: str  # batch | seq
    lo: int
    hi: int  # on the grid: lo + k × step
    step: int
    group: str = ""
    start: int = None  # the first value to probe; None: vramlab plan's answer (`predicted`)
    overheads: object = None  # the device overheads `vramlab plan --gpu CAP` uses (calibrate.overheads_for); None: defaults
    outcomes: dict = field(default_factory=dict)  # axis value → outcome of its probe
    stopped: str = ""  # why the search ended before finding its boundary

    @property
    def last(self):
        """Index of the grid's last value (hi)."""
        return (self.hi - self.lo) // self.step

    def value(self, k):
        return self.lo + k * self.step

    def index(self, value):
        return (value - self.lo) // self.step

    def label(self):
        """The search in one line: the experiment without its searched axis, and the grid."""
        s = self.base.spec
        fixed = {"batch": f"seq {s.seq}", "seq": f"batch {s.batch}"}[self.axis]
        what = s.mode if s.mode == "inference" else f"{s.method}" + (" ckpt" if s.grad_ckpt else "")
        return (f"{s.model} {what} {s.dtype} {fixed}: {self.axis} {self.lo}..{self.hi} step {self.step}"
                + (f" under {self.base.cap_gpu}" if self.base.cap_gpu else ""))

    def predicted(self):
        """vramlab's answer on the capped card: `vramlab plan --gpu CAP`'s largest batch or longest sequence, or None
        when the sweep caps nothing."""
        return planned_boundary(self.base.spec, self.axis, self.base.cap_gpu, self.overheads)

    def start_index(self):
        p = self.predicted() if self.start is None else self.start
        if p is None:
            return 0
        self.start = p
        return min(max(self.index(p), 0), self.last)  # the largest grid value ≤ the answer: predicted to fit

    def probe(self, value):
        """The experiment at `value` of the axis (validated: both ends were at load)."""
        from formulas.catalog import get_shape
        from formulas.spec import validate

        spec = validate(self.base.spec.replace(**{self.axis: value}), get_shape(self.base.spec.model))
        return dataclasses.replace(self.base, spec=spec, group=self.group,
                                   search=(self.axis, self.lo, self.hi, self.step))

    def feed(self, value, outcome):
        """The outcome of the probe at `value`."""
        self.outcomes[value] = outcome
        if outcome not in (FITS, DOES_NOT_FIT) and not self.stopped:
            self.stopped = f"{outcome} at {self.axis} {value:,}: not a memory result, the search stops"

    def bounds(self):
        """(largest index that ran, or −1; smallest index that ran out of memory, or last + 1)."""
        good = max((self.index(v) for v, o in self.outcomes.items() if o == FITS), default=-1)
        bad = min((self.index(v) for v, o in self.outcomes.items() if o == DOES_NOT_FIT), default=self.last + 1)
        return good, bad

    def next_value(self):
        """The next value to probe, or None when the search is over."""
        if self.stopped:
            return None
        good, bad = self.bounds()
        if bad <= good:
            self.stopped = (f"{self.axis} {self.value(good):,} ran but {self.value(bad):,} ran out of memory: "
                            "memory does not grow with it here, the search stops")
            return None
        if good == self.last or bad == 0 or bad == good + 1:
            return None
        if not self.outcomes:
            return self.value(self.start_index())
        start = self.start_index()
        if bad == self.last + 1:  # nothing ran out of memory yet: gallop up from the largest that ran
            ups = sum(1 for v, o in self.outcomes.items() if o == FITS and self.index(v) >= start)
            return self.value(min(self.last, good + 2 ** max(ups - 1, 0)))
        if good == -1:  # nothing ran yet: gallop down
            downs = sum(1 for v, o in self.outcomes.items() if o == DOES_NOT_FIT and self.index(v) <= start)
            return self.value(max(0, bad - 2 ** max(downs - 1, 0)))
        return self.value((good + bad) // 2)

    def result(self):
        """What the probes found: the largest value that ran and the smallest that ran out of memory (None where no
        probe did), whether the boundary is settled, and why not."""
        good, bad = self.bounds()
        done = not self.stopped and (good == self.last or bad == 0 or bad == good + 1)
        return {"axis": self.axis, "lo": self.lo, "hi": self.hi, "step": self.step,
                "largest_ok": self.value(good) if good >= 0 else None,
                "smallest_oom": self.value(bad) if bad <= self.last else None,
                "probes": len(self.outcomes), "done": done, "stopped": self.stopped}


def planned_boundary(spec, axis, gpu, overheads=None):
    """`vramlab plan --gpu GPU`'s answer for one GPU: the largest micro-batch (inference: concurrent sequences) at the
    spec's sequence, or the longest sequence at its batch; None without a GPU. `overheads`: what `vramlab plan`
    uses for that GPU (harness.analysis.calibrate.overheads_for: `vramlab run` and the report pass it); not given,
    the uncalibrated defaults of the GPU's architecture."""
    if not gpu:
        return None
    from formulas.device import compute_capability
    from formulas.hardware import get_hardware
    from formulas.overhead import default_overheads
    from formulas.plan import Planner

    overheads = overheads or default_overheads(compute_capability(get_hardware(gpu)))
    planner = Planner(spec.replace(gpus=1), gpu, overheads=overheads)
    if axis == "batch":
        return planner.largest_batch(spec)["value"]
    return planner.longest_context(spec)["seq"]
