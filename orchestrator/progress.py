"""Progress lines from Ray workers to the driver's console.

Training workers push (task, epoch, metrics) to a small actor that holds no CPU; a driver thread
drains it once a second and prints one line per event, so many concurrent tasks stay readable.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import ray

__all__ = ["ProgressBoard", "ProgressPrinter", "format_epoch_line"]


@ray.remote(num_cpus=0)
class ProgressBoard:
    def __init__(self) -> None:
        self._events: list[dict[str, Any]] = []

    def push(self, event: dict[str, Any]) -> None:
        self._events.append(event)

    def drain(self) -> list[dict[str, Any]]:
        out, self._events = self._events, []
        return out


def format_epoch_line(event: dict[str, Any]) -> str:
    kind = event.get("kind", "epoch")
    task = event.get("task", "?")
    if kind == "epoch":
        m = event.get("metrics", {})
        metric = event.get("metric", "macro_f1")
        trial = f" trial {event['trial']}" if event.get("trial") else ""
        return (
            f"[{task}{trial}] epoch {event['epoch'] + 1}/{event['epochs']} "
            f"loss {m.get('train_loss', float('nan')):.4f} val_{metric} {m.get('val_' + metric, float('nan')):.4f}"
        )
    return f"[{task}] {event.get('message', '')}"


class ProgressPrinter:
    """Driver-side thread printing board events (or plain messages) with an optional console.

    Each drained event is also handed to every listener (e.g. experiment tracking), printing on or off;
    the flush at exit delivers what is left.
    """

    def __init__(self, board, enabled: bool = True, interval_s: float = 1.0,
                 listeners: list[Callable[[dict[str, Any]], None]] | None = None) -> None:
        self.board = board
        self.enabled = enabled
        self.listeners = list(listeners or [])
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="shpeft-progress")

    def __enter__(self) -> "ProgressPrinter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._flush()

    def _flush(self) -> None:
        try:
            events = ray.get(self.board.drain.remote(), timeout=10)
        except Exception:  # the board dies with Ray; losing progress lines is harmless
            return
        if self.enabled:
            for e in events:
                print(format_epoch_line(e), flush=True)
        for listener in self.listeners:
            for e in events:
                try:
                    listener(e)
                except Exception:  # a listener's failure must not stop progress or the job
                    logging.getLogger("shpeft.pipeline").debug("progress listener failed", exc_info=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._flush()
            time.sleep(0)
