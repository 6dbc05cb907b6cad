"""Which compiled program runs a step: its own, or a larger one already built, until building its own has
paid for itself.

Every step has its own program, the bucket of its shape: (rows, tokens, table width) for a prefill step,
(rows, tokens, the longest row) for a packed prefill step (new sequences back to back in one row),
(rows, table width) for a decode window, and the sampler variant (`fast`: the greedy argmax). A program
with larger dimensions serves the step too: rows and block-table columns past the step's own are padding,
prefill tokens are right-aligned, so a longer token dimension pads in front (packed: at the end), and a
longer row bound only looks further back. It costs more compute per run.

Building a program stalls every request in the engine for the trace, lowering and compile (1-2 s for a
decode window on a 2-core CPU, several seconds for a large model on a GPU), while a shrinking batch may
run at a smaller row bucket for only a few windows. So, once a kind of program has one built:

- a step whose own program is not built runs on the smallest built program that covers it;
- each such run charges its own program with the time it wasted: the run's measured time times the share
  of the larger program's volume (the product of its dimensions) that the step did not need. That is an
  upper bound on the waste, since a program's time grows less than its volume;
- once the charges reach what building a program of that kind has cost in this process (the mean
  measured build time), the step's own program is built.

This is the ski-rental rule: the time spent is at most about twice what the better choice in hindsight
(build at once, or never) would have spent, without knowing how long the workload will need the shape.

A decode window also knows a bound on its future: the `horizon`, the most steps its requests may still
take (their max_tokens and the context length). Its own program, once built, would serve every one of
those steps (later, smaller batches included) and no more of them, so it is not built while the
horizon's estimated savings fall short of the price, whatever the charges say (the requests end before
it could pay back), unless the charges reach twice the price (a shape that recurs at the end of many
batches). The horizon only vetoes: the savings are an upper bound, and building on an estimate alone
measured no better.
`patience` scales the price: 0 builds every step's own program at once (as `--warmup` does before the
first request), infinity never builds one that a built program covers. A build time is what it cost
here: with the persistent compilation cache, a load from disk is cheap, and later programs are then
built sooner.

A prefill step (padded or packed) may run on the full sampler's program when it could take the greedy
argmax (one step's sampling is a small part of its time, and the full program's compile is the larger); a
decode window runs its own variant's program (the full sampler's top-logprobs at every step of a window
cost more).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import NamedTuple


class Shape(NamedTuple):
    kind: str  # "prefill", "packed" or "decode"
    dims: tuple[int, ...]  # prefill: (rows, tokens, table width); packed: (rows, tokens, longest row);
    # decode: (rows, table width)
    fast: bool  # the greedy argmax program (no sampling, penalties or logprobs)

    def volume(self) -> int:
        return math.prod(self.dims)

    def covers(self, other: "Shape") -> bool:
        """Whether this program can run a step whose own program is `other`."""
        variant = self.fast == other.fast or (self.kind != "decode" and other.fast and not self.fast)
        return self.kind == other.kind and variant and all(a >= b for a, b in zip(self.dims, other.dims))


class Programs:
    """The programs built in this process, what building and running them cost, and the waste charged to
    those not built. Pure bookkeeping: the runner measures the times and builds what `choose` names."""

    def __init__(self, patience: float = 1.0):
        self.patience = patience
        self.built: dict[Shape, float] = {}  # program -> seconds its build took
        self.step_time: dict[Shape, float] = {}  # program -> seconds per step (running mean of recent runs)
        self.waste: dict[Shape, float] = defaultdict(float)  # unbuilt program -> seconds charged to it

    def price(self, shape: Shape) -> float:
        """What building `shape` is expected to cost: the mean build time of its kind and variant (of its
        kind, if none of its variant is built yet), times the patience."""
        same = [t for s, t in self.built.items() if s.kind == shape.kind and s.fast == shape.fast]
        same = same or [t for s, t in self.built.items() if s.kind == shape.kind]
        return self.patience * sum(same) / len(same) if same else 0.0

    def choose(self, own: Shape, rows: int | None = None, steps: int = 1, horizon: int | None = None) -> Shape:
        """-> the program to run `steps` steps whose own program is `own`: `own` itself if built, or when
        nothing built covers it, or once it pays (see the module's rules; `horizon`: the most steps the
        requests may still take, None when unknown); else the smallest built program covering it. `rows`:
        the program must have exactly that many rows (a decode window continuing one in flight reuses its
        device arrays); `own` with those rows is built if no built program has them."""
        need = own if rows is None else own._replace(dims=(rows, *own.dims[1:]))
        if need in self.built:
            return need
        fits = [s for s in self.built if s.covers(need) and (rows is None or s.dims[0] == rows)]
        if not fits or self.patience == 0:
            return need
        best = min(fits, key=lambda s: (s.volume(), s.fast != own.fast))
        if rows is not None:
            return best
        per_step, price, charged = self.step_time.get(best, 0.0), self.price(own), self.waste.get(own, 0.0)
        pays = charged + self._wasted(own, best, steps * per_step) >= price  # ski rental: so far, and this run
        if pays and horizon is not None and charged < 2 * price:  # unless the requests end before it pays
            pays = self._wasted(own, best, horizon * per_step) >= price
        return need if pays else best

    def _wasted(self, own: Shape, used: Shape, seconds: float) -> float:
        """The part of a `seconds` run of `used` that `own` would not have spent. Own's time per step is
        interpolated in volume between the largest measured program below it and `used` (through zero when
        none is measured below it: the most it could save)."""
        if used.kind != own.kind or used.fast != own.fast or used not in self.step_time:
            return seconds * (1 - own.volume() / used.volume())  # another variant: volume alone
        v, v_hi, t_hi = own.volume(), used.volume(), self.step_time[used]
        below = [(s.volume(), t) for s, t in self.step_time.items()
                 if s.kind == own.kind and s.fast == own.fast and s.volume() <= v]
        v_lo, t_lo = max(below, default=(0, 0.0))
        t_own = t_lo + (t_hi - t_lo) * (v - v_lo) / max(v_hi - v_lo, 1)
        return seconds * min(max(1 - t_own / t_hi, 0.0), 1.0) if t_hi > 0 else 0.0

    def record_build(self, shape: Shape, seconds: float) -> None:
        self.built.setdefault(shape, seconds)
        self.waste.pop(shape, None)

    def record_run(self, own: Shape, used: Shape, seconds: float, steps: int = 1) -> None:
        """A run of `steps` steps of `used` for a step whose own program is `own`, taking `seconds`: update
        used's time per step, and charge `own` the share of the run it would not have spent."""
        if steps <= 0:
            return
        per_step = seconds / steps
        old = self.step_time.get(used)
        self.step_time[used] = per_step if old is None else (old + per_step) / 2
        if used != own and own not in self.built:
            self.waste[own] += self._wasted(own, used, seconds)
