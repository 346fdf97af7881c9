"""The Ray session a command runs in: one place that starts (or joins) Ray, quietly, and stops what it started.

``ray_session`` is what every workflow and command uses: ``with ray_session(address, num_cpus): ...``.
A local embedded Ray gets explicit CPUs (container CPU detection can be wrong) and its dashboard on
127.0.0.1; an initialised Ray (a test's, a caller's) is left alone and never shut down here.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

__all__ = ["connect_ray", "ray_session"]


def connect_ray(address: str | None, num_cpus: int | None) -> bool:
    """Start a local embedded Ray (``address`` None) or join a cluster, unless Ray already runs here.

    Local: explicit ``num_cpus`` (container CPU detection can be wrong), dashboard bound to 127.0.0.1.
    Ray's own start-up lines and the workers' output stay in Ray's session logs
    (``/tmp/ray/session_latest/logs``) unless SHPEFT_VERBOSE=1. Returns whether this call started it.
    """
    import logging

    import ray

    if ray.is_initialized():
        return False
    verbose = bool(os.environ.get("SHPEFT_VERBOSE"))
    quiet = {"logging_level": logging.INFO if verbose else logging.ERROR, "log_to_driver": verbose}
    if address is None:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, dashboard_host="127.0.0.1",
                 include_dashboard=False if os.environ.get("SHPEFT_NO_DASHBOARD") else None, **quiet)
    else:
        ray.init(address=address, **quiet)
    return True


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[bool]:
    """Ray for the duration of the block, framework chatter off the console; yields whether it started Ray
    (then it shuts it down on exit, an error included)."""
    import ray

    from orchestrator.runtime.console import quiet_frameworks

    quiet_frameworks()
    started = connect_ray(address, num_cpus)
    try:
        yield started
    finally:
        if started:
            ray.shutdown()
