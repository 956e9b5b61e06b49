"""Finding and stopping the processes we started, by PID (never by name): Flower's
commands start children in sessions of their own, so a process group is not enough."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def process_tree(pid: int) -> list[int]:
    """`pid` and all its living descendants, parents first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, queue = [], [pid]
    while queue:
        current = queue.pop(0)
        tree.append(current)
        queue.extend(children.get(current, []))
    return tree


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> list[int]:
    """Send `sig` to `pid` and every descendant at once (what a crash of the machine's
    process would leave behind: nothing). Returns the PIDs signalled."""
    tree = process_tree(pid)
    for member in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, sig)
    return tree


def stop_tree(pid: int, grace: float = 10.0) -> None:
    """SIGTERM the tree, then SIGKILL whatever is left after `grace` seconds."""
    tree = kill_tree(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in tree):
        time.sleep(0.2)
    for member in tree:
        if _alive(member):
            with contextlib.suppress(ProcessLookupError):
                os.kill(member, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
