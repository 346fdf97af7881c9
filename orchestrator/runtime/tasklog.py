"""Every task's log, kept in the store: what its worker printed, warned and raised, and the driver's lines.

```
<store>/logs/<job_id>/driver.log     what the driver said, with times, and each failed task's traceback
<store>/logs/<job_id>/<task>.log     the task's worker output: prints, warnings, errors, sweep trials' lines
```

A worker tees its stdout, stderr and log records (WARNING and up) into a buffer that it pushes to the
progress board; the driver appends them to the task's file and rewrites it at most once a second. The
files live in the store, not on the node that ran the task, so `shpeft logs STORE JOB` reads them after
the cluster is gone; Ray's raw session logs stay where Ray puts them (their folder is named in driver.log).
"""

from __future__ import annotations

import io
import logging
import re
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Iterator

from shpeft_core.options import DEFAULT_METRIC
from shpeft_core.io import atomic_write_bytes, exists, read_bytes

from orchestrator.store.layout import log_file, logs_dir

__all__ = ["captured_output", "StoreLogs", "read_logs"]


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # Ray colours its tracebacks; a log file wants plain text


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%H:%M:%S")


class _Buffer:
    """Lines written in a worker, pushed to the board at most once a second (and at the end)."""

    def __init__(self, board, task: str, trial: str | None) -> None:
        self.board, self.task, self.trial = board, task, trial
        self._lines: list[str] = []
        self._partial = ""
        self._last = 0.0
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        with self._lock:
            text = self._partial + text
            *lines, self._partial = text.split("\n")
            self._lines.extend(ln for ln in lines if ln.strip())
        if time.monotonic() - self._last > 1.0:
            self.push()

    def push(self, final: bool = False) -> None:
        with self._lock:
            if final and self._partial.strip():
                self._lines.append(self._partial)
                self._partial = ""
            lines, self._lines = self._lines, []
            self._last = time.monotonic()
        if lines:
            try:
                ref = self.board.push.remote({"kind": "log", "task": self.task, "trial": self.trial, "lines": lines})
                if final:
                    _wait_for(ref)
            except Exception:  # the board is gone (driver ended); the lines are still in Ray's worker log
                pass


def _wait_for(ref) -> None:
    """The last lines on the board before the task's result reaches the driver, so the log keeps their order."""
    import ray

    if ray.is_initialized():  # a test's stand-in board is no actor, and ray.get would start a Ray
        ray.get(ref, timeout=10)


class _Tee(io.TextIOBase):
    def __init__(self, stream, buffer: _Buffer) -> None:
        self.stream, self.buffer = stream, buffer

    def write(self, text: str) -> int:
        try:
            self.stream.write(text)
        except Exception:
            pass
        self.buffer.write(text)
        return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except Exception:
            pass


class _BufferHandler(logging.Handler):
    def __init__(self, buffer: _Buffer) -> None:
        super().__init__(logging.WARNING)
        self.buffer = buffer
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.buffer.write(self.format(record) + "\n")
        except Exception:
            pass


@contextmanager
def captured_output(board, task: str, trial: str | None = None) -> Iterator[None]:
    """In a worker: tee stdout/stderr and warnings into the task's log in the store (via ``board``).

    An error leaving the block is written to the log with its traceback, then re-raised.
    """
    if board is None:
        yield
        return
    buffer = _Buffer(board, task, trial)
    handler = _BufferHandler(buffer)
    root = logging.getLogger()
    out, err = sys.stdout, sys.stderr
    was_capturing = getattr(logging, "_warnings_showwarning", None) is not None
    root.addHandler(handler)
    logging.captureWarnings(True)
    sys.stdout, sys.stderr = _Tee(out, buffer), _Tee(err, buffer)
    try:
        yield
    except Exception as exc:  # not SystemExit: Tune ends a finished or ASHA-stopped trial with one, on purpose
        buffer.write(traceback.format_exc())
        try:
            exc.shpeft_logged = True  # travels with the error to the driver, which adds one line, not a copy
        except (AttributeError, TypeError):  # an exception type without a __dict__
            pass
        raise
    finally:
        sys.stdout, sys.stderr = out, err
        if not was_capturing:
            logging.captureWarnings(False)
        root.removeHandler(handler)
        buffer.push(final=True)


class StoreLogs:
    """Driver side: a progress listener writing task logs and a logging handler writing driver.log."""

    def __init__(self, store: str, job_id: str) -> None:
        self.store, self.job_id = store, job_id
        self._files: dict[str, list[str]] = {}
        self._dirty: set[str] = set()
        self._lock = threading.Lock()
        self.handler = _DriverHandler(self)

    def add(self, name: str, lines: list[str]) -> None:
        with self._lock:
            if name not in self._files:
                uri = log_file(self.store, self.job_id, name)
                old = read_bytes(uri).decode("utf-8", "replace").splitlines() if exists(uri) else []
                self._files[name] = old + ([f"--- {datetime.now(timezone.utc).isoformat(timespec='seconds')} "
                                            f"run started ---"])
            self._files[name].extend(_ANSI.sub("", ln) for ln in lines)
            self._dirty.add(name)

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("kind")
        task = event.get("task")
        if not task:
            return
        prefix = f"[trial {event['trial']}] " if event.get("trial") else ""
        if kind == "log":
            self.add(task, [f"{prefix}{ln}" for ln in event["lines"]])
        elif kind == "epoch":
            m = event.get("metrics") or {}
            metric = event.get("metric", DEFAULT_METRIC)
            self.add(task, [f"{_stamp()} {prefix}epoch {event['epoch'] + 1}/{event['epochs']} "
                            f"train_loss {m.get('train_loss', float('nan')):.4f} "
                            f"val_{metric} {m.get('val_' + metric, float('nan')):.4f}"])
        elif kind in ("message", "task_end"):
            text = event.get("message") or f"{event.get('state')}" + (f": {event['error']}" if event.get("error") else "")
            self.add(task, [f"{_stamp()} {prefix}{text}"])

    def flush(self) -> None:
        with self._lock:
            todo = {name: "\n".join(self._files[name]) + "\n" for name in self._dirty}
            self._dirty.clear()
        for name, text in todo.items():
            atomic_write_bytes(log_file(self.store, self.job_id, name), text.encode())

    @contextmanager
    def attached(self, logger: logging.Logger) -> Iterator["StoreLogs"]:
        """driver.log receives ``logger``'s records (INFO and up) while the block runs."""
        logger.addHandler(self.handler)
        old = logger.level
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        try:
            yield self
        finally:
            logger.removeHandler(self.handler)
            logger.setLevel(old)
            self.flush()


class _DriverHandler(logging.Handler):
    def __init__(self, logs: StoreLogs) -> None:
        super().__init__(logging.INFO)
        self.logs = logs
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.logs.add("driver", [self.format(record)])
        except Exception:
            pass


def read_logs(store: str, job_id: str, task: str | None = None) -> list[tuple[str, str]]:
    """(name, text) of the job's logs: driver.log first, then every task's; or the one task's."""
    from fsspec.core import url_to_fs

    root = logs_dir(store, job_id)
    fs, path = url_to_fs(root)
    if not fs.exists(path):
        return []
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1][:-4] for p in fs.ls(path, detail=False) if p.endswith(".log"))
    if task is not None:
        names = [n for n in names if n == task]
    else:
        names = sorted(names, key=lambda n: (n != "driver", n))
    return [(n, read_bytes(log_file(store, job_id, n)).decode("utf-8", "replace")) for n in names]
