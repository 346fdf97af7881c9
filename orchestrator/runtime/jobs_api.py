"""Thin layer over Ray's Jobs API (``ray.job_submission``) for `shpeft submit / status / logs`.

Ray's client has no connection timeout and silently lets ``RAY_ADDRESS`` override the address it
is given, so every call here first resolves the address itself and checks that the dashboard
answers within a bounded time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

__all__ = [
    "JobsApiError",
    "normalise_address",
    "check_reachable",
    "submission_client",
    "submit_job_file",
    "job_status",
    "job_logs",
    "follow_job_logs",
    "SubmitResult",
]

_ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


class JobsApiError(RuntimeError):
    """The Ray dashboard could not be reached or refused a request; the message says which and why."""


def normalise_address(address: str) -> str:
    """``HEAD:8265`` -> ``http://HEAD:8265``; keeps http(s):// and strips trailing slashes."""
    address = address.strip().rstrip("/")
    if not address:
        raise JobsApiError("--address is empty; give the Ray dashboard URL, e.g. http://HEAD:8265")
    if "://" not in address:
        address = "http://" + address
    scheme = address.split("://", 1)[0]
    if scheme not in ("http", "https"):
        raise JobsApiError(
            f"--address {address!r} must be the Ray dashboard's HTTP URL (http://HEAD:8265), not a {scheme}:// address"
        )
    return address


def check_reachable(address: str, timeout: float) -> None:
    """Raise `JobsApiError` unless something answers HTTP at ``address`` within ``timeout`` seconds."""
    import requests

    try:
        requests.get(address + "/api/version", timeout=timeout)
    except requests.exceptions.RequestException as exc:
        raise JobsApiError(
            f"cannot reach the Ray dashboard at {address} within {timeout:g}s "
            f"({type(exc).__name__}); is the cluster up and port 8265 reachable "
            f"(e.g. `ray dashboard cluster.yaml` or `kubectl port-forward`)?"
        ) from None


@contextmanager
def _address_env_cleared() -> Iterator[None]:
    # Ray's client would otherwise replace our explicit address with these variables.
    saved = {k: os.environ.pop(k) for k in _ADDRESS_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def submission_client(address: str, *, timeout: float = 10.0):
    """A connected `JobSubmissionClient` for the dashboard at ``address``."""
    address = normalise_address(address)
    check_reachable(address, timeout)
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise JobsApiError(f"Ray's Jobs SDK is unavailable: {exc}") from None
    with _address_env_cleared():
        try:
            return JobSubmissionClient(address)
        except (ConnectionError, RuntimeError) as exc:
            raise JobsApiError(f"Ray Jobs API at {address}: {exc}") from None


@dataclass(frozen=True)
class SubmitResult:
    submission_id: str
    entrypoint: str
    working_dir: str


def submit_job_file(
    client,
    job_path: str,
    *,
    working_dir: str | None = None,
    submission_id: str | None = None,
    env_vars: dict[str, str] | None = None,
    extra_run_args: tuple[str, ...] = (),
    entrypoint_num_cpus: float | None = None,
) -> SubmitResult:
    """Submit ``shpeft run <job> --address auto`` with the job file shipped in the runtime env.

    Without ``working_dir`` only the job file travels (in a temporary folder), so a large
    folder around it is never uploaded by accident; with it, the job file must lie inside.
    """
    job_path = os.path.abspath(job_path)
    tmp: str | None = None
    try:
        if working_dir is None:
            tmp = tempfile.mkdtemp(prefix="shpeft-submit-")
            shutil.copy2(job_path, os.path.join(tmp, os.path.basename(job_path)))
            upload_dir, rel = tmp, os.path.basename(job_path)
        else:
            upload_dir = os.path.abspath(working_dir)
            rel = os.path.relpath(job_path, upload_dir)
            if rel.startswith(".."):
                raise JobsApiError(f"job file {job_path} is not inside --working-dir {upload_dir}")
        import shlex

        entrypoint = " ".join(
            ["shpeft", "run", shlex.quote(rel.replace(os.sep, "/")), "--address", "auto", *map(shlex.quote, extra_run_args)]
        )
        runtime_env: dict = {"working_dir": upload_dir}
        if env_vars:
            runtime_env["env_vars"] = dict(env_vars)
        try:
            sid = client.submit_job(
                entrypoint=entrypoint,
                runtime_env=runtime_env,
                submission_id=submission_id,
                entrypoint_num_cpus=entrypoint_num_cpus,
                metadata={"shpeft_job_file": os.path.basename(job_path)},
            )
        except (ConnectionError, RuntimeError) as exc:
            raise JobsApiError(f"submission failed: {exc}") from None
        return SubmitResult(submission_id=sid, entrypoint=entrypoint, working_dir=upload_dir)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def job_status(client, submission_id: str) -> tuple[str, str]:
    """(status name, status message) of a submitted job."""
    try:
        info = client.get_job_info(submission_id)
    except (ConnectionError, RuntimeError) as exc:
        raise JobsApiError(f"cannot get the status of {submission_id}: {exc}") from None
    status = getattr(info.status, "value", str(info.status))
    return str(status), info.message or ""


def job_logs(client, submission_id: str) -> str:
    try:
        return client.get_job_logs(submission_id)
    except (ConnectionError, RuntimeError) as exc:
        raise JobsApiError(f"cannot get the logs of {submission_id}: {exc}") from None


def follow_job_logs(client, submission_id: str, write: Callable[[str], None]) -> None:
    """Stream a job's logs to ``write`` until the job ends."""

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            write(chunk)

    # Ray's SDK logs an INFO line when the stream ends normally; it is not part of the job's logs.
    sdk_logger = logging.getLogger("ray.dashboard.modules.job.sdk")
    level = sdk_logger.level
    sdk_logger.setLevel(logging.WARNING)
    import aiohttp

    try:
        asyncio.run(_tail())
    except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
        raise JobsApiError(f"cannot follow the logs of {submission_id}: {exc}") from None
    finally:
        sdk_logger.setLevel(level)
