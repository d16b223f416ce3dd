"""One line of the doctor's report, shared by every check."""

from __future__ import annotations

import dataclasses

STATUSES = ("pass", "fail", "skip", "warn", "info")


@dataclasses.dataclass
class Row:
    """One line of the report: what was checked, what came out, and why it passed or not."""

    section: str
    check: str
    result: str
    figure: float | None = None
    unit: str = ""
    status: str = "info"  # one of STATUSES
    reason: str = ""
