"""The Mixer: which direction each example of each step comes from.

A pure function of (step, seed): a resumed run asks the same questions and gets the same answers, so its
state in a checkpoint is just the step (plus the config that built it, stored for checking).

Meaning of ``reverse_fraction`` (stated once, precisely)
--------------------------------------------------------
* ``fixed_total``: a stage sees ``total`` examples per epoch (default: the number of training *items*),
  and exactly ``round(r · examples)`` of them are reverse rows. Sweeping r keeps the data budget fixed.
  Worked example: 400 items, r = 0.25, batch 8, 1 epoch → 50 steps, 400 examples: 100 reverse, 300
  forward, 2 reverse per step.
* ``union``: the paper's D_m — every forward row and every reverse row once per epoch (twice the data);
  r is then n_reverse / (n_forward + n_reverse) and the configured r is ignored.

Per step, the reverse count is the increment of a rounded running sum, ``C(s) = round(B · Σ_{t≤s} r(t))``,
so totals are exact for any schedule and no step drifts by more than one example from its target.

The Mixer covers a step's *global* batch (every worker's rows) with a rank-independent seed: every Ray
Train worker asks it the same question and keeps its own slice of the answer
(:func:`revmix.platform.data.streams.worker_slice`), so the data order does not depend on the number of
workers. Its checkpointed state says so (``"order": "global"``); a state without that field was written by
the earlier per-worker order and is read only when it describes the same order (one worker).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any

FORWARD, REVERSE = 0, 1
ORDER = "global"  # the order a Mixer's state describes: one Mixer over the global batch, shared by workers


def _round(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


@dataclass(frozen=True)
class Schedule:
    """r as a function of stage progress: constant, linear ramp, step switch, or explicit phases."""

    kind: str = "constant"
    start: float = 0.5
    end: float = 0.5
    boundary: float = 0.5
    phases: tuple[tuple[float, float], ...] = ()  # (until, r) with until increasing in (0, 1]

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "linear", "step", "phases"):
            raise ValueError(f"schedule kind {self.kind!r}: expected constant, linear, step or phases")
        if self.kind == "phases":
            untils = [u for u, _ in self.phases]
            if not untils or untils != sorted(untils):
                raise ValueError("phases: need at least one phase, with increasing 'until'")

    def fraction(self, step: int, total_steps: int) -> float:
        if self.kind == "constant":
            return self.start
        if self.kind == "linear":
            p = step / (total_steps - 1) if total_steps > 1 else 1.0
            return self.start + (self.end - self.start) * p
        progress = step / total_steps if total_steps else 0.0
        if self.kind == "step":
            return self.start if progress < self.boundary else self.end
        for until, r in self.phases:
            if progress < until:
                return r
        return self.phases[-1][1]


@dataclass(frozen=True)
class Mixer:
    """Directions of the ``batch_size`` examples of every step of a ``total_steps`` stage."""

    batch_size: int
    total_steps: int
    schedule: Schedule
    seed: int = 0
    _prefix: list[int] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.total_steps < 0:
            raise ValueError("batch_size must be >= 1 and total_steps >= 0")
        # Rounded running sums C(-1)=0, C(0), …, C(S-1): O(S) once, O(1) per query.
        acc, prefix = 0.0, [0]
        for s in range(self.total_steps):
            r = min(max(self.schedule.fraction(s, self.total_steps), 0.0), 1.0)
            acc += self.batch_size * r
            prefix.append(min(max(_round(acc), prefix[-1]), prefix[-1] + self.batch_size))
        object.__setattr__(self, "_prefix", prefix)

    def _check(self, step: int) -> None:
        if not 0 <= step < self.total_steps:
            raise IndexError(f"step {step} outside the stage's {self.total_steps} steps")

    def counts(self, step: int) -> tuple[int, int]:
        """(forward, reverse) examples at ``step``."""
        self._check(step)
        n_rev = self._prefix[step + 1] - self._prefix[step]
        return self.batch_size - n_rev, n_rev

    def directions(self, step: int) -> list[int]:
        """The direction of each position in the step's batch (0 forward, 1 reverse), seeded order."""
        n_fwd, n_rev = self.counts(step)
        dirs = [FORWARD] * n_fwd + [REVERSE] * n_rev
        random.Random(f"{self.seed}:{step}").shuffle(dirs)
        return dirs

    def consumed(self, step: int) -> tuple[int, int]:
        """(forward, reverse) examples drawn before ``step`` — where a resumed stream restarts."""
        if not 0 <= step <= self.total_steps:
            raise IndexError(f"step {step} outside 0..{self.total_steps}")
        n_rev = self._prefix[step]
        return step * self.batch_size - n_rev, n_rev

    def state(self, step: int) -> dict[str, Any]:
        """What a checkpoint stores: the next step and the mixer's identity (checked on resume)."""
        return {
            "step": step,
            "order": ORDER,
            "batch_size": self.batch_size,
            "total_steps": self.total_steps,
            "seed": self.seed,
            "schedule": asdict(self.schedule),
        }

    def check_state(self, state: dict[str, Any]) -> int:
        """Validate a checkpointed state against this mixer and return its step."""
        mine = self.state(state.get("step", 0))
        if "order" not in state:  # written before the global order: the same order only on one worker
            legacy, state = state, {**state, "order": ORDER}
            if (state.get("batch_size"), state.get("seed")) != (self.batch_size, self.seed):
                raise ValueError(
                    f"checkpointed mixer {legacy} was written by the earlier per-worker data order (a batch of "
                    f"{state.get('batch_size')} per worker, seed {state.get('seed')}), which this version "
                    f"no longer draws (one global batch of {self.batch_size}, seed {self.seed}); restart the "
                    "stage without --resume, or resume it with the revmix version that wrote it"
                )
        theirs = {
            **state,
            "schedule": {
                **state.get("schedule", {}),
                "phases": tuple(tuple(p) for p in state.get("schedule", {}).get("phases", ())),
            },
        }
        if mine != theirs:
            raise ValueError(f"checkpointed mixer {state} does not match this run's mixer {mine}")
        return int(state["step"])


def schedule_from_config(mix: object) -> Schedule:
    """Build a :class:`Schedule` from a ``MixConfig`` (start/end default to ``reverse_fraction``)."""
    sched = mix.schedule  # type: ignore[attr-defined]
    r = mix.reverse_fraction  # type: ignore[attr-defined]
    return Schedule(
        kind=sched.kind,
        start=r if sched.start is None else sched.start,
        end=r if sched.end is None else sched.end,
        boundary=sched.boundary,
        phases=tuple((p.until, p.reverse_fraction) for p in sched.phases),
    )
