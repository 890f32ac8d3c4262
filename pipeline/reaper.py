"""A watchdog for the local Ray a driver starts: when the driver dies without shutting Ray
down (``kill -9``, the OOM killer), the raylet goes with it but Ray's ``DashboardAgent`` and
``RuntimeEnvAgent`` wait on the dead GCS for a minute or more. The reaper, a small detached
process, remembers the driver's descendants and, once the driver is gone, kills those still
running after a short grace period. Linux only (it reads ``/proc``); elsewhere it is a no-op.

    python -m pairsift.pipeline.reaper DRIVER_PID
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 1.0
GRACE_S = 5.0


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a live, non-zombie process; None if there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if fields[0] == "Z":
        return None
    return int(fields[1]), fields[19]


def descendants(root: int) -> dict[int, str]:
    """{pid: start time} of every live process below ``root``."""
    parents: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                parents.setdefault(st[0], []).append(int(name))
                starts[int(name)] = st[1]
    out, todo = {}, [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            out[child] = starts[child]
            todo.append(child)
    return out


def watch(driver: int) -> None:
    me = os.getpid()
    seen: dict[int, str] = {}
    start = _stat(driver)
    while start is not None and _stat(driver) == start:
        seen.update({p: s for p, s in descendants(driver).items() if p != me})
        time.sleep(POLL_S)
    time.sleep(GRACE_S)
    for pid, started in seen.items():
        st = _stat(pid)
        if st is not None and st[1] == started:  # the same process, not a reused pid
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def spawn(driver: int) -> None:
    """Start the reaper for ``driver``, detached from its session."""
    if not sys.platform.startswith("linux"):
        return
    subprocess.Popen([sys.executable, "-m", "pairsift.pipeline.reaper", str(driver)], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True)


if __name__ == "__main__":  # pragma: no cover - a separate process
    watch(int(sys.argv[1]))
