"""SIGUSR1: every thread's stack and every trio task's, into the log, while serving goes on.

`kill -USR1 <daemon pid>` (the pid file is in the runtime dir, see daemon.py).
The threads' stacks come from faulthandler, written from the signal handler
itself, so they come even when the trio loop is stuck; then the loop, at its
next turn, logs the tree of its tasks, each with the frames it waits in.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys

import trio

log = logging.getLogger(__name__)
TRIO_DIR = os.path.dirname(trio.__file__) + os.sep


def task_tree() -> str:
    """Every task of the running trio loop, nested by nursery, with the frames it waits in."""
    lines: list[str] = []

    def walk(task: trio.lowlevel.Task, depth: int) -> None:
        pad = "  " * depth
        lines.append(f"{pad}task {task.name}")
        for frame, lineno in task.iter_await_frames():
            code = frame.f_code
            if TRIO_DIR in code.co_filename:  # trio's own machinery says nothing of ours
                continue
            lines.append(f"{pad}  {code.co_filename}:{lineno} in {code.co_name}")
        for nursery in task.child_nurseries:
            for child in sorted(nursery.child_tasks, key=lambda t: t.name):
                walk(child, depth + 1)

    root = trio.lowlevel.current_root_task()
    if root is not None:
        walk(root, 0)
    return "\n".join(lines)


async def dump_stacks_on_sigusr1() -> None:
    """Until cancelled: on each SIGUSR1, the threads' stacks (faulthandler), then the tasks'."""
    with trio.open_signal_receiver(signal.SIGUSR1) as signals:
        # Registered after trio's handler, and chained to it: faulthandler writes the
        # threads first, from the handler, then trio's handler wakes this task.
        # Written to fd 2, which is the log file in a daemon (daemon._detach) and
        # follows its rotation (logs._CappedLog).
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True, chain=True)
        try:
            async for _ in signals:
                log.warning("SIGUSR1: the threads' stacks are above; the trio tasks:\n%s",
                            task_tree())
        finally:
            faulthandler.unregister(signal.SIGUSR1)
