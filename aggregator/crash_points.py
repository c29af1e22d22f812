"""Named crash points for chaos tests: the process SIGKILLs itself at an exact instant.

`FEDFMX_CRASH_AT=<point>:<n>` in the environment kills the process the n-th time it reaches
`crash_point("<point>")`. Why: a SIGKILL sent from outside lands at a random instant, and the
few milliseconds of a merge or a publish are almost never hit; the recovery of exactly those
instants is what must be proven. Unset (always, outside tests), a crash point does nothing.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENVIRONMENT_VARIABLE = "FEDFMX_CRASH_AT"

_reached: Counter[str] = Counter()


def crash_point(name: str) -> None:
    """SIGKILL this process here if `FEDFMX_CRASH_AT` names this point and its count is due."""
    armed = os.environ.get(ENVIRONMENT_VARIABLE)
    if not armed:
        return
    point, _, count = armed.partition(":")
    if point != name:
        return
    _reached[name] += 1
    if _reached[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
