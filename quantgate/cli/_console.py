"""Where the commands print: ``out`` (stdout, the results) and ``console`` (stderr:
progress, errors), in whole lines off a terminal; and ``progress``, the bars that draw the
library's on_progress (``bars``)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import IO, cast

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def _console(stderr: bool = False) -> Console:
    """A terminal gets rich's wrapping at its width. A pipe or a CI log gets whole lines:
    rich would wrap them at 80 columns, mid-sentence, and break grep."""
    stream = sys.stderr if stderr else sys.stdout
    file = None if stderr else cast(IO[str], _Stdout())  # sys.stdout's stand-in
    if stream.isatty() or "COLUMNS" in os.environ:
        return Console(stderr=stderr, file=file)
    return Console(stderr=stderr, file=file, soft_wrap=True, width=200)


class _Stdout:
    """sys.stdout (whichever it is when written to), where a reader that stopped reading is
    no error: `quantgate gate ... | head -1` ended with a BrokenPipeError, exit 1, whatever
    the gates said. The rest of the output goes nowhere, and the command keeps its exit
    code."""

    def write(self, text: str) -> int:
        try:
            return sys.stdout.write(text)
        except BrokenPipeError:
            self._closed()
            return len(text)

    def flush(self) -> None:
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            self._closed()

    @staticmethod
    def _closed() -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)  # and so for Python's last flush at exit
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)

    def __getattr__(self, name: str):
        return getattr(sys.stdout, name)


console = _console(stderr=True)
out = _console()


class _Progress(Progress):
    """Rich's live bars on a terminal. Elsewhere (a pipe, a CI log, with FORCE_COLOR or
    not) one plain line per step a task finishes, with its time: a log that shows a long
    export is alive (rich printed its bars once, at the end, after minutes of silence; under
    FORCE_COLOR, every redraw). A step is done when its task moves on to another or reaches
    its total (then said at once: in the order things happened, with its time); one still
    going when the bars close is said then, and one that goes on is said every STILL_EVERY_S
    as its count moves. A task added with the field ``result=True`` has statuses that are
    the result of the count they come with (training's loss at its step), not the step
    under way."""

    def __init__(self, *columns, **kwargs) -> None:
        super().__init__(*columns, **kwargs)
        self._live = self.console.file.isatty()
        self._steps: dict[TaskID, _Step] = {}
        # a task of many steps (training's, each with its loss) is said at most every
        # MANY_EVERY_S, and at its last: the line's time is then of the steps since the
        # one said before it
        self._said_at: dict[TaskID, float] = {}
        self._unsaid_since: dict[TaskID, float] = {}
        self._result_unsaid: set[TaskID] = set()  # a result task's count not said yet

    def start(self) -> None:
        if self._live:
            super().start()

    def stop(self) -> None:
        if self._live:
            super().stop()

    def update(self, task_id: TaskID, **kwargs) -> None:
        super().update(task_id, **kwargs)
        if self._live:
            return
        task = self._tasks[task_id]
        status = task.fields.get("status", "")
        many = bool(task.total and task.total > MANY_STEPS)
        if task.fields.get("result"):
            if status and "completed" in kwargs:
                self._say_result(task_id, status, many)
            return
        step = self._steps.get(task_id)
        if step is not None and step.status != status and not step.said:
            # the count the step brought it to, unless the next one counts afresh
            done = task.completed if task.completed >= step.completed else step.completed
            last = self._said_at.get(task_id)
            if not many or last is None or time.monotonic() - last >= MANY_EVERY_S:
                self._say(task_id, done, step)
        elif (
            step is not None and not step.said and not (task.total and task.completed >= task.total)
        ):
            # a step that goes on: a line every STILL_EVERY_S, so a log shows it is alive
            # (at its total it is said below, as it ends); a "going on" line moves
            # _unsaid_since to itself
            quiet_since = max(
                self._said_at.get(task_id, step.since),
                self._unsaid_since.get(task_id, step.since),
                step.since,
            )
            if time.monotonic() - quiet_since >= STILL_EVERY_S:
                self._say(task_id, task.completed, step, final=False)
        if step is None or step.status != status:
            step = self._steps[task_id] = _Step(status, time.monotonic())
            # one that starts at the total ("done") ends as it starts: no time of its own
            step.timed = not (task.total and task.completed >= task.total)
            self._unsaid_since.setdefault(task_id, step.since)
        step.completed = task.completed
        if task.total and task.completed >= task.total and not step.said:
            self._say(task_id, task.completed, step)

    def add_task(self, *args, **kwargs) -> TaskID:
        task_id = super().add_task(*args, **kwargs)
        if kwargs.get("result"):  # its first line's time: since the task began
            self._unsaid_since[task_id] = time.monotonic()
        return task_id

    def _say_result(self, task_id: TaskID, status: str, many: bool, *, now=False) -> None:
        """A result task's line as its count comes (of many steps, at most every
        MANY_EVERY_S, and its last; ``now``: whatever the time), with the time since the
        line before it."""
        task, at = self._tasks[task_id], time.monotonic()
        last = self._said_at.get(task_id)
        end = bool(task.total and task.completed >= task.total)
        if many and not (end or now) and last is not None and at - last < MANY_EVERY_S:
            self._result_unsaid.add(task_id)  # said later, or when the bars close
            return
        since = self._unsaid_since.get(task_id, at)
        where = f" {task.completed:g}/{task.total:g}" if task.total else ""
        line = f"{task.description}{where}: {status} ({at - since:.1f} s)"
        self.console.print(line, highlight=False, markup=False)
        self._said_at[task_id] = self._unsaid_since[task_id] = at
        self._result_unsaid.discard(task_id)

    def _say(
        self, task_id: TaskID, completed: float, step: _Step, took: bool = True, final=True
    ) -> None:
        """A task's line: its step, how far it got, and the time since the first step the
        task had not said yet (``final`` False: the step goes on, and is said again)."""
        task, now = self._tasks[task_id], time.monotonic()
        since = self._unsaid_since.pop(task_id, step.since)
        took = took and step.timed
        total = task.total
        where = f" {completed:g}/{total:g}" if total else ""
        going = "" if final else ", going on"
        status = step.status + (f" ({now - since:.1f} s{going})" if took else "")
        self.console.print(f"{task.description}{where}: {status}", highlight=False, markup=False)
        step.said = final
        if final:  # the many steps' throttle counts from step lines, not "going on" ones
            self._said_at[task_id] = now
        else:  # its next line's time, and the next "going on", count from this one
            self._unsaid_since[task_id] = now

    def __exit__(self, *exc) -> None:
        if self._live:
            return super().__exit__(*exc)
        for task_id, step in self._steps.items():  # where each task still going ended
            task = self._tasks[task_id]
            if task.completed and not step.said:
                self._say(task_id, task.completed, step, took=False)
        for task_id in sorted(self._result_unsaid):  # a result task's last count (interrupted)
            status = self._tasks[task_id].fields.get("status", "")
            self._say_result(task_id, status, many=True, now=True)
        return None


# Off a terminal, a task of more than MANY_STEPS steps says one at most every MANY_EVERY_S
# seconds (training's 500 steps, a line each, filled a CI log).
MANY_STEPS = 50
MANY_EVERY_S = 5.0
# A step that goes on is said again every STILL_EVERY_S seconds as its count moves, marked
# "going on" (the speed gates' timing at batch 32 was 16 s without a line).
STILL_EVERY_S = 10.0


@dataclass
class _Step:
    """The step a task is at, off a terminal: its status, since when, how far it got."""

    status: str
    since: float
    completed: float = 0
    timed: bool = True  # False for a marker ("done"), whose time says nothing
    said: bool = False


def progress() -> Progress:
    """A progress bar on stderr, so stdout stays clean for results."""
    return _Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def bars(bar: Progress):
    """The library's on_progress (quantgate.progress) drawn as one bar per task."""
    tasks: dict[str, TaskID] = {}

    def on_progress(task: str, done: int, total: int | None, status: str) -> None:
        if task not in tasks:
            tasks[task] = bar.add_task(task, total=total, status="")
        bar.update(tasks[task], completed=done, total=total, status=status)

    return on_progress
