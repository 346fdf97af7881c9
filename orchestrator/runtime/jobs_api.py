"""Thin layer over Ray's Jobs API (``ray.job_submission``) for `shpeft submit / status / logs`.

Ray's client has no connection timeout and silently lets ``RAY_ADDRESS`` override the address it
is given, so every call here first resolves the address itself and checks that the dashboard
answers within a bounded time. Every failure of the dashboard (unreachable, refusing, answering
something that is not Ray's Jobs API) becomes one `JobsApiError` whose message names the address.

Right after ``ray start --head`` the dashboard may refuse a submission for lack of a job agent
("No available agent to submit job"): `submit_job_file` retries that, with backoff, for a bounded
time. Ray's own INFO lines about the upload stay off the console unless SHPEFT_VERBOSE=1.
`describe_job` turns Ray's status into what `shpeft status` prints; it recognises an entrypoint
that could not start (exit 127: `shpeft` not on the head's PATH, and the like) and says what to do.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

__all__ = [
    "JobsApiError",
    "normalise_address",
    "check_reachable",
    "submission_client",
    "submit_job_file",
    "job_logs",
    "follow_job_logs",
    "SubmitResult",
    "JobState",
    "job_state",
    "start_failure",
    "describe_job",
    "entrypoint_command",
    "NO_AGENT",
    "INSTALL_GUIDE",
]

_ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
# What the dashboard answers (HTTP 500) while no job agent has registered yet, e.g. right after `ray start --head`.
NO_AGENT = "No available agent to submit job"
INSTALL_GUIDE = 'cluster/README.md, "Before you submit: shpeft on every node"'
# What the SDK raises for a refused request or an answer that is not the Jobs API (bad JSON, missing fields).
_SDK_ERRORS = (ConnectionError, RuntimeError, ValueError, TypeError, KeyError)


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


@contextmanager
def _ray_info_lines_quiet() -> Iterator[None]:
    """Ray's SDK logs INFO lines (package upload) to the console; they are for its own debugging."""
    if os.environ.get("SHPEFT_VERBOSE"):
        yield
        return
    loggers = [logging.getLogger(n) for n in ("ray", "ray.dashboard.modules.dashboard_sdk",
                                               "ray.dashboard.modules.job.sdk", "ray._private.runtime_env.packaging")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


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
    with _address_env_cleared(), _ray_info_lines_quiet():
        try:
            return JobSubmissionClient(address)
        except _SDK_ERRORS as exc:
            raise JobsApiError(f"{address} does not answer like a Ray dashboard ({_one_line(exc)})") from None


def _address_of(client) -> str:
    return getattr(client, "_address", None) or "the Ray dashboard"


def _one_line(exc: BaseException, limit: int = 300) -> str:
    import json

    if isinstance(exc, json.JSONDecodeError) or type(exc).__name__ == "JSONDecodeError":
        return "its answer is not JSON, as the Jobs API's would be"
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class SubmitResult:
    submission_id: str
    entrypoint: str
    working_dir: str


def entrypoint_command(job_rel: str, command: str = "run", extra_args: tuple[str, ...] = ()) -> str:
    """``shpeft <command> <job> --address auto <extra_args>``, shell-quoted: what the cluster runs."""
    import shlex

    if command not in ("run", "compare"):
        raise JobsApiError(f"cannot submit `shpeft {command}`: only run and compare run a job file on a cluster")
    return " ".join(["shpeft", command, shlex.quote(job_rel.replace(os.sep, "/")), "--address", "auto",
                     *map(shlex.quote, extra_args)])


def submit_job_file(
    client,
    job_path: str,
    *,
    working_dir: str | None = None,
    submission_id: str | None = None,
    env_vars: dict[str, str] | None = None,
    extra_run_args: tuple[str, ...] = (),
    entrypoint_num_cpus: float | None = None,
    command: str = "run",
    agent_wait: float = 60.0,
    on_wait: Callable[[str], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> SubmitResult:
    """Submit ``shpeft <command> <job> --address auto`` with the job file shipped in the runtime env.

    Without ``working_dir`` only the job file travels (in a temporary folder), so a large
    folder around it is never uploaded by accident; with it, the job file must lie inside.
    While the dashboard answers "No available agent to submit job" the submission is retried with
    backoff for ``agent_wait`` seconds (``on_wait`` is told once); then `JobsApiError`.
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
        entrypoint = entrypoint_command(rel, command, extra_run_args)
        runtime_env: dict = {"working_dir": upload_dir}
        if env_vars:
            runtime_env["env_vars"] = dict(env_vars)

        def submit() -> str:
            return client.submit_job(
                entrypoint=entrypoint,
                runtime_env=runtime_env,
                submission_id=submission_id,
                entrypoint_num_cpus=entrypoint_num_cpus,
                metadata={"shpeft_job_file": os.path.basename(job_path)},
            )

        with _ray_info_lines_quiet():
            sid = _retry_while_no_agent(submit, _address_of(client), agent_wait, on_wait, sleep)
        return SubmitResult(submission_id=sid, entrypoint=entrypoint, working_dir=upload_dir)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _retry_while_no_agent(submit: Callable[[], str], address: str, agent_wait: float,
                          on_wait: Callable[[str], None] | None, sleep: Callable[[float], None]) -> str:
    deadline = time.monotonic() + agent_wait
    delay = 0.5
    while True:
        try:
            return submit()
        except _SDK_ERRORS as exc:
            if NO_AGENT not in str(exc):
                raise JobsApiError(f"submission to {address} failed: {_one_line(exc)}") from None
        left = deadline - time.monotonic()
        if left <= 0:
            raise JobsApiError(
                f"the cluster at {address} still had no job agent to take the job after {agent_wait:g}s of retries "
                f"(Ray: \"{NO_AGENT}\"); the head may still be starting or its dashboard agent failed: "
                f"check `ray status` on the head, then submit again (or wait longer with --agent-wait)")
        if on_wait is not None:
            on_wait(f"the cluster has no job agent ready yet (Ray: \"{NO_AGENT}\"); retrying for up to {agent_wait:g}s")
            on_wait = None
        sleep(min(delay, left))
        delay = min(2 * delay, 8.0)


@dataclass(frozen=True)
class JobState:
    """A submitted job as the Jobs API reports it; ``exit_code`` is the entrypoint's, once it ended."""

    submission_id: str
    status: str
    message: str = ""
    entrypoint: str = ""
    exit_code: int | None = None
    error_type: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in ("SUCCEEDED", "FAILED", "STOPPED")


def job_state(client, submission_id: str) -> JobState:
    try:
        info = client.get_job_info(submission_id)
        status = getattr(info.status, "value", str(info.status))
        error_type = getattr(info, "error_type", None)
        return JobState(submission_id, str(status), info.message or "", info.entrypoint or "",
                        getattr(info, "driver_exit_code", None), getattr(error_type, "value", error_type))
    except _SDK_ERRORS + (AttributeError,) as exc:
        raise JobsApiError(f"cannot get the status of {submission_id} from {_address_of(client)}: {_one_line(exc)}") from None


# A shell answers these when the command itself could not run.
_CANNOT_RUN = {127: "command not found", 126: "found but not executable"}
_EXIT_IN_MESSAGE = re.compile(r"exit code (-?\d+)")
_MISSING_SHPEFT_MODULE = re.compile(r"No module named '(?:orchestrator|shpeft_core|tasks)[.']")


def _exit_code(state: JobState) -> int | None:
    if state.exit_code is not None:
        return int(state.exit_code)
    m = _EXIT_IN_MESSAGE.search(state.message.splitlines()[0] if state.message else "")
    return int(m.group(1)) if m else None


def _last_log_line(message: str) -> str:
    """Ray's failure message is one line, then the entrypoint's last output: its last line names the cause."""
    lines = [ln.strip() for ln in message.splitlines()[1:] if ln.strip()]
    return lines[-1][:300] if lines else ""


def start_failure(state: JobState) -> str | None:
    """Why the entrypoint could not start (None when it started): exit 127/126, a shell or Ray that could not
    run it, or a `shpeft` whose Python cannot import shpeft."""
    if state.status != "FAILED":
        return None
    code = _exit_code(state)
    last = _last_log_line(state.message)
    if code in _CANNOT_RUN:
        return f"exit code {code} ({_CANNOT_RUN[code]})" + (f": {last}" if last else "")
    if state.error_type == "JOB_ENTRYPOINT_COMMAND_START_ERROR":  # the message is Ray's traceback: its last line
        lines = [ln.strip() for ln in state.message.splitlines() if ln.strip()]
        return "Ray could not start the command" + (f": {lines[-1][:300]}" if lines else "")
    missing = _MISSING_SHPEFT_MODULE.search(state.message)
    if missing:
        return f"exit code {code} (the `shpeft` on the node's PATH cannot import shpeft): {missing.group(0)}"
    return None


def describe_job(state: JobState, address: str) -> list[str]:
    """What `shpeft status` prints: the status line; for a failure, where to look or what to do."""
    head = f"{state.submission_id}: {state.status}"
    if state.status != "FAILED":
        return [head + (f" ({state.message.strip().splitlines()[0]})" if state.message.strip() else "")]
    what = f"`{state.entrypoint}`" if state.entrypoint else "the entrypoint"
    reason = start_failure(state)
    if reason:
        return [f"{head}: {what} could not start on the cluster: {reason}",
                "shpeft must be installed on every node of the cluster, on the PATH of the `ray start` that started "
                "the node (activate its environment, or put its bin/ first on PATH, before `ray start`); "
                f"then submit again. See {INSTALL_GUIDE}."]
    code = _exit_code(state)
    if code is not None:
        last = _last_log_line(state.message)
        line = f"{head} ({what} exited with code {code}" + (f"; its last line: {last}" if last else "") + ")"
    else:
        line = f"{head} ({state.message.strip().splitlines()[0][:300] if state.message.strip() else 'no message'})"
    return [line, f"its output: shpeft logs {state.submission_id} --address {address}"]


def job_logs(client, submission_id: str) -> str:
    try:
        return client.get_job_logs(submission_id)
    except _SDK_ERRORS as exc:
        raise JobsApiError(f"cannot get the logs of {submission_id} from {_address_of(client)}: {_one_line(exc)}") from None


def follow_job_logs(client, submission_id: str, write: Callable[[str], None]) -> None:
    """Stream a job's logs to ``write`` until the job ends."""

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            write(chunk)

    import aiohttp

    # Ray's SDK logs an INFO line when the stream ends normally; it is not part of the job's logs.
    try:
        with _ray_info_lines_quiet():
            asyncio.run(_tail())
    except _SDK_ERRORS + (aiohttp.ClientError,) as exc:
        raise JobsApiError(f"cannot follow the logs of {submission_id} from {_address_of(client)}: {_one_line(exc)}") from None
