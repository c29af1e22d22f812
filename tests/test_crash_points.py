"""Crash points kill the process exactly where and when `FEDFMX_CRASH_AT` says, and only then."""

import os
import signal
import subprocess
import sys

SCRIPT = """
from aggregator.crash_points import crash_point
for _ in range(3):
    crash_point("merge")
    print("passed", flush=True)
crash_point("publish")
"""


def _run(armed: str | None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "FEDFMX_CRASH_AT"}
    if armed is not None:
        environment["FEDFMX_CRASH_AT"] = armed
    return subprocess.run(
        [sys.executable, "-c", SCRIPT], env=environment, capture_output=True, text=True, timeout=60
    )


def test_the_process_dies_the_nth_time_it_reaches_the_armed_point() -> None:
    died = _run("merge:2")
    assert died.returncode == -signal.SIGKILL
    assert died.stdout.count("passed") == 1


def test_unarmed_or_other_points_and_counts_do_nothing() -> None:
    for armed in (None, "publish:2", "collect:1"):
        finished = _run(armed)
        assert finished.returncode == 0, armed
        assert finished.stdout.count("passed") == 3
