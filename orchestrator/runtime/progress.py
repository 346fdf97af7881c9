"""What the driver shows while a job runs: a live view on a terminal, plain lines elsewhere.

Workers push events (an epoch ended, a trial ended, importance batches done, captured log lines) to
a small zero-CPU actor; a driver thread drains it once a second and hands every event to the view and
to the listeners (task log files, experiment tracking). The driver posts its own events (a task is
queued, started, done) straight to the same place, so one object knows every task's state.

On a terminal the view is a ``rich`` progress display: one row per task (epochs, or trials x epochs for
a sweep), the current metric and an ETA, plus a row for the importance stage. Elsewhere (CI logs,
pipes) it prints one line per epoch, as a log reader expects.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import ray

from shpeft_core.options import DEFAULT_METRIC

__all__ = ["ProgressBoard", "start_board", "ProgressPrinter", "ProgressView", "format_epoch_line", "counting_bar"]


@ray.remote(num_cpus=0)
class ProgressBoard:
    def __init__(self) -> None:
        self._events: list[dict[str, Any]] = []

    def push(self, event: dict[str, Any]) -> None:
        self._events.append(event)

    def drain(self) -> list[dict[str, Any]]:
        out, self._events = self._events, []
        return out


def start_board():
    """The job's `ProgressBoard`, on the driver's own node. Left to the scheduler, a zero-CPU actor may land on
    a worker node and be lost with it, and with it every later progress and log line of the job (the task
    logs in the store included); the driver's node lives as long as the job."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return ProgressBoard.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote()


def format_epoch_line(event: dict[str, Any]) -> str:
    kind = event.get("kind", "epoch")
    task = event.get("task", "?")
    if kind == "epoch":
        m = event.get("metrics", {})
        metric = event.get("metric", DEFAULT_METRIC)
        trial = f" trial {event['trial']}" if event.get("trial") else ""
        return (
            f"[{task}{trial}] epoch {event['epoch'] + 1}/{event['epochs']} "
            f"loss {m.get('train_loss', float('nan')):.4f} val_{metric} {m.get('val_' + metric, float('nan')):.4f}"
        )
    return f"[{task}] {event.get('message', '')}"


class _Row:
    """One task's progress: epochs done of ``total`` (trials x epochs for a sweep)."""

    def __init__(self, task: str, epochs: int, trials: int) -> None:
        self.task, self.epochs, self.trials = task, max(1, epochs), trials
        self.done_by_trial: dict[str, int] = {}
        self.finished_trials: set[str] = set()
        self.metric = ""
        self.best: float | None = None
        self.value: float | None = None
        self.state = "queued"

    @property
    def total(self) -> int:
        return self.epochs * max(1, self.trials)

    @property
    def completed(self) -> int:
        return sum(self.epochs if t in self.finished_trials else d for t, d in self.done_by_trial.items())

    def status(self) -> str:
        metric = f"val_{self.metric}" if self.metric else "val"
        if self.state in ("done", "failed", "skipped"):
            tail = f" {metric} {self.value:.4f}" if self.value is not None else ""
            return {"done": "done", "failed": "FAILED", "skipped": "verified, skipped"}[self.state] + tail
        if not self.done_by_trial:
            return self.state
        if self.trials:
            best = f", best {metric} {self.best:.4f}" if self.best is not None else ""
            return f"trials {len(self.finished_trials)}/{self.trials} done{best}"
        (epochs_done,) = self.done_by_trial.values()
        now_ = f", {metric} {self.value:.4f}" if self.value is not None else ""
        return f"epoch {epochs_done}/{self.epochs}{now_}"


class ProgressView:
    """Every task's state, rendered live (``live=True``) or as plain lines; fed by :meth:`handle`."""

    def __init__(self, *, enabled: bool = True, live: bool | None = None, console=None) -> None:
        from rich.console import Console

        self.console = console or Console()
        self.enabled = enabled
        self.live = enabled and (self.console.is_terminal if live is None else live)
        self.rows: dict[str, _Row] = {}
        self._progress = None
        self._ids: dict[str, Any] = {}
        self._importance: dict[str, tuple[int, int]] = {}

    # -- display lifecycle
    def start(self) -> None:
        if not self.live:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold]{task.fields[name]:<18}"), BarColumn(bar_width=24), MofNCompleteColumn(),
            TextColumn("{task.fields[unit]:<6}"), TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=self.console, refresh_per_second=4, redirect_stdout=True, redirect_stderr=True,
        )
        self._progress.start()

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.refresh()
            self._progress.stop()
            self._progress = None

    def print(self, line: str) -> None:
        if self.enabled:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    # -- events
    def handle(self, event: dict[str, Any]) -> None:
        kind = event.get("kind", "epoch")
        if kind == "plan":
            self._plan(event)
        elif kind == "epoch":
            self._epoch(event)
        elif kind == "trial_end":
            row = self.rows.get(event["task"])
            if row is not None:
                row.finished_trials.add(str(event["trial"]))
                row.done_by_trial.setdefault(str(event["trial"]), 0)
                self._render(row)
        elif kind == "task_end":
            self._task_end(event)
        elif kind == "importance":
            self._importance_event(event)
        elif kind == "message":
            self.print(format_epoch_line(event))

    def _plan(self, event: dict[str, Any]) -> None:
        row = _Row(event["task"], int(event.get("epochs") or 1), int(event.get("trials") or 0))
        row.metric = event.get("metric", "")
        row.state = event.get("state", "queued")
        self.rows[row.task] = row
        if self._progress is not None:
            self._ids[row.task] = self._progress.add_task(
                "", total=row.total, name=row.task, unit="trial·ep" if row.trials else "epochs", status=row.status(),
                start=row.state != "queued")
        self._render(row)

    def _epoch(self, event: dict[str, Any]) -> None:
        row = self.rows.get(event.get("task", ""))
        if row is None:  # a run the driver did not announce (e.g. compare): plain lines only
            if not self.live:
                self.print(format_epoch_line(event))
            return
        trial = str(event.get("trial") or "")
        row.state = "training"
        row.done_by_trial[trial] = max(row.done_by_trial.get(trial, 0), int(event["epoch"]) + 1)
        if event.get("epochs"):
            row.epochs = max(row.epochs, int(event["epochs"]))
        row.metric = event.get("metric") or row.metric or DEFAULT_METRIC
        value = (event.get("metrics") or {}).get(f"val_{row.metric}")
        if isinstance(value, (int, float)):
            row.value = float(value)
            row.best = row.value if row.best is None else max(row.best, row.value)
        if not self.live:
            self.print(format_epoch_line(event))
        self._render(row)

    def _task_end(self, event: dict[str, Any]) -> None:
        row = self.rows.get(event["task"])
        if row is None:
            return
        row.state = event.get("state", "done")
        if event.get("value") is not None:
            row.value = float(event["value"])
        if row.state != "failed":
            row.finished_trials.update(row.done_by_trial)
            for t in list(row.done_by_trial) or [""]:
                row.done_by_trial[t] = row.epochs
                row.finished_trials.add(t)
        self._render(row, finished=row.state != "failed")

    def _importance_event(self, event: dict[str, Any]) -> None:
        self._importance[event["name"]] = (int(event["done"]), int(event["total"]))
        if self._progress is None:
            return
        done = sum(d for d, _ in self._importance.values())
        total = sum(t for _, t in self._importance.values())
        if "importance" not in self._ids:
            self._ids["importance"] = self._progress.add_task("", total=total, name="importance", unit="batches",
                                                              status="")
        names = ", ".join(sorted(n for n, (d, t) in self._importance.items() if d < t)) or "done"
        self._progress.update(self._ids["importance"], total=total, completed=done, status=names)

    def _render(self, row: _Row, finished: bool = False) -> None:
        if self._progress is None or row.task not in self._ids:
            return
        tid = self._ids[row.task]
        if row.state != "queued":
            self._progress.start_task(tid)
        self._progress.update(tid, total=row.total, completed=row.total if finished else row.completed,
                              status=row.status())
        if row.state in ("done", "failed", "skipped"):
            self._progress.stop_task(tid)


@contextmanager
def counting_bar(label: str, total: int, enabled: bool = True, console=None) -> Iterator[Callable[[], None]]:
    """One live bar counting finished runs (with ETA) on a terminal; yields the function that advances it."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = console or Console()
    if not (enabled and console.is_terminal and total):
        yield lambda: None
        return
    bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(bar_width=24), MofNCompleteColumn(), TextColumn("runs"),
                   TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                   redirect_stdout=True, redirect_stderr=True)
    tid = bar.add_task("", total=total)
    with bar:
        yield lambda: bar.advance(tid)


class ProgressPrinter:
    """Drains the board once a second into the view and the listeners; :meth:`post` adds driver events.

    A listener is any callable taking one event; if it has a ``flush()`` method, that is called after each
    drain (a log file is rewritten at most once a second).
    """

    def __init__(self, board, enabled: bool = True, interval_s: float = 1.0, *,
                 listeners: Sequence[Callable[[dict[str, Any]], None]] = (), view: ProgressView | None = None) -> None:
        self.board = board
        self.enabled = enabled
        self.view = view or ProgressView(enabled=enabled)
        self.listeners = list(listeners)
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="shpeft-progress")

    def __enter__(self) -> "ProgressPrinter":
        self.view.start()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._flush()
        self.view.stop()

    def post(self, event: dict[str, Any]) -> None:
        """A driver-side event, handled at once, after what the workers pushed before it (a failed task's
        traceback, pushed as its worker finished, comes before the driver's line about the failure)."""
        with self._lock:
            self._dispatch(self._drain() + [event])

    def _dispatch(self, events: list[dict[str, Any]]) -> None:
        for e in events:
            self.view.handle(e)
            for listener in self.listeners:
                try:
                    listener(e)
                except Exception:  # a broken log or tracking sink must never stop the job
                    pass

    def _drain(self) -> list[dict[str, Any]]:
        if self.board is None or not ray.is_initialized():  # the board lives in Ray; ray.get would start one
            return []
        try:
            return ray.get(self.board.drain.remote(), timeout=10)
        except Exception:  # the board dies with Ray; losing progress lines is harmless
            return []

    def _flush(self) -> None:
        with self._lock:  # drained and dispatched under one lock, so a post never overtakes them
            self._dispatch(self._drain())
            for listener in self.listeners:
                flush = getattr(listener, "flush", None)
                if flush is not None:
                    try:
                        flush()
                    except Exception:
                        pass

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._flush()
            time.sleep(0)
