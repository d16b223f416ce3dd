"""A run sized by time: ``train.max_minutes`` sets the schedule's length from the run's pace.

The same ``train.max_steps`` took 22 min 45 s on one 2-core CPU and 27 min 45 s on another,
so a step count cannot promise a wall time. With a budget, ``train.max_steps`` is a
ceiling and the run plans its own length: at every logged row it takes its pace so far
(steps per second since its first logged row, so compiling is paid for but not taken as the
pace, while online probes and checkpoints are priced in as they come) and sets the last
step to the one that pace reaches when the budget runs out. The cosine schedule reads the
length at every step (``pipeline.train.optim``), so it decays to zero at the planned end;
a plan that moves by a few steps late in the run moves the rate by a fraction of a percent.

The clock counts from the start of ``train`` (start-up and compiling included; the export
after the last step is not). Every rank plans from the same all-reduced clock
(``pipeline.train.step.agree``), so all of them stop at the same step. Checkpoints record
the plan and the seconds spent, and a resumed run spends only what is left.
"""

from __future__ import annotations

import dataclasses
import math

__all__ = ["TimeBudget", "steps_that_fit"]


def steps_that_fit(step: int, pace: float, seconds_left: float, cap: int) -> int:
    """The run's last step: ``step`` plus what ``pace`` (steps/s) does in ``seconds_left``,
    at most ``cap``; a budget already spent ends the run at ``step``."""
    more = math.floor(max(0.0, seconds_left) * pace)
    return max(step, min(cap, step + more))


@dataclasses.dataclass
class TimeBudget:
    """The plan of a budgeted run. ``seconds`` is the whole budget, ``cap``
    ``train.max_steps``; ``planned`` is the current last step. Every clock it is given is
    the run's own: seconds over all its processes, so a resume spends only what is left."""

    seconds: float
    cap: int
    planned: int
    since: tuple[int, float] | None = None  # (step, seconds) where the pace is measured from

    @classmethod
    def of_run(cls, minutes: float, cap: int, meta: dict) -> TimeBudget | None:
        """The budget of ``train.max_minutes`` (None when 0), keeping the plan of a
        checkpoint's ``meta`` when there is one."""
        if minutes <= 0:
            return None
        return cls(minutes * 60.0, cap, min(cap, int(meta.get("planned_steps", cap))))

    def replan(self, step: int, seconds: float) -> int:
        """The last step after ``step``, ``seconds`` into the run (the ranks' agreed clock).
        The first call of a process only starts the pace's clock."""
        if self.since is None or step <= self.since[0]:
            self.since = (step, seconds)
            return self.planned
        pace = (step - self.since[0]) / max(seconds - self.since[1], 1e-9)
        self.planned = steps_that_fit(step, pace, self.left(seconds), self.cap)
        return self.planned

    def left(self, seconds: float) -> float:
        """Budget seconds left, ``seconds`` into the run."""
        return self.seconds - seconds

    def row(self, seconds: float) -> dict[str, float]:
        """What the metrics rows show of the plan."""
        return {
            "budget/planned_steps": self.planned,
            "budget/minutes_left": self.left(seconds) / 60,
        }

    def line(self, spent: float = 0.0) -> str:
        """The start-up line of a process, ``spent`` seconds into the run."""
        before = f", {spent / 60:.1f} spent before this resume" if spent else ""
        return (
            f"time budget: {self.seconds / 60:g} min{before}; the run's length is planned from "
            f"its pace, at most train.max_steps={self.cap:,}"
        )
