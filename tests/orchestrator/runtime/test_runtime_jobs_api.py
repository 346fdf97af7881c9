"""What `shpeft status` makes of a job's state (orchestrator.runtime.jobs_api.describe_job), and the entrypoint
`shpeft submit` sends. The messages are Ray 2.60's, as its Jobs API reports them; the exit-127 case runs
for real in tests/cluster/test_cluster_jobs.py."""

from __future__ import annotations

import pytest

from orchestrator.runtime.jobs_api import JobsApiError, JobState, describe_job, entrypoint_command, start_failure

ADDRESS = "http://127.0.0.1:8265"
RUN = "shpeft run job.yaml --address auto"


def _failed(exit_code: int | None, log: str, error_type: str | None = "JOB_ENTRYPOINT_COMMAND_ERROR") -> JobState:
    message = (f"Job entrypoint command failed with exit code {exit_code}, last available logs (truncated to "
               f"20,000 chars):\n{log}" if exit_code is not None else log)
    return JobState("raysubmit_1", "FAILED", message, RUN, exit_code, error_type)


SETUP = "2026-12-06 19:02:03,391\tINFO job_manager.py:581 -- Runtime env is setting up.\n" \
        f"Running entrypoint for job raysubmit_1: {RUN}\n"


@pytest.mark.parametrize("code,log,reason", [
    (127, SETUP + "/bin/sh: 1: shpeft: not found\n", "exit code 127 (command not found): /bin/sh: 1: shpeft: not found"),
    (126, SETUP + "/bin/sh: 1: shpeft: Permission denied\n",
     "exit code 126 (found but not executable): /bin/sh: 1: shpeft: Permission denied"),
    (1, SETUP + "Traceback (most recent call last):\n  File \"/opt/venv/bin/shpeft\", line 5, in <module>\n"
                "    from orchestrator.cli.main import main\nModuleNotFoundError: No module named 'orchestrator'\n",
     "exit code 1 (the `shpeft` on the node's PATH cannot import shpeft): No module named 'orchestrator'"),
])
def test_an_entrypoint_that_could_not_start_is_named_with_what_to_do(code, log, reason):
    state = _failed(code, log)
    assert start_failure(state) == reason
    first, advice = describe_job(state, ADDRESS)
    assert first == f"raysubmit_1: FAILED: `{RUN}` could not start on the cluster: {reason}"
    assert "installed on every node" in advice and "PATH" in advice
    assert advice.endswith('See cluster/README.md, "Before you submit: shpeft on every node".')


def test_ray_that_could_not_start_the_command_is_a_start_failure():
    # Ray's job supervisor reports the traceback of its failed attempt to start the shell
    state = _failed(None, "Traceback (most recent call last):\n  File \"job_supervisor.py\", line 381, in run\n"
                          "    child_process = self._exec_entrypoint(env, logs_path)\n"
                          "FileNotFoundError: [Errno 2] No such file or directory: '/bin/sh'\n",
                    "JOB_ENTRYPOINT_COMMAND_START_ERROR")
    assert start_failure(state) == ("Ray could not start the command: FileNotFoundError: [Errno 2] No such file or "
                                    "directory: '/bin/sh'")
    assert "could not start on the cluster" in describe_job(state, ADDRESS)[0]


def test_a_job_that_started_and_failed_points_to_its_logs():
    state = _failed(1, SETUP + "job 3f2a: 1 ok, 1 failed in 12.0s; catalogue /s/catalogue/3f2a.parquet\n")
    assert start_failure(state) is None
    assert describe_job(state, ADDRESS) == [
        f"raysubmit_1: FAILED (`{RUN}` exited with code 1; its last line: job 3f2a: 1 ok, 1 failed in 12.0s; "
        "catalogue /s/catalogue/3f2a.parquet)",
        f"its output: shpeft logs raysubmit_1 --address {ADDRESS}"]
    # a task of the user's own named 'tasks_extra' missing is the user's code, not a broken install
    state = _failed(1, SETUP + "ModuleNotFoundError: No module named 'tasks_extra'\n")
    assert start_failure(state) is None


def test_a_failure_without_exit_code_shows_rays_first_line():
    state = JobState("raysubmit_1", "FAILED", "Job supervisor actor died: the node it ran on was lost\nmore", RUN, None,
                     "JOB_SUPERVISOR_ACTOR_DIED")
    assert describe_job(state, ADDRESS) == [
        "raysubmit_1: FAILED (Job supervisor actor died: the node it ran on was lost)",
        f"its output: shpeft logs raysubmit_1 --address {ADDRESS}"]


@pytest.mark.parametrize("status,message,line", [
    ("RUNNING", "Job is currently running.", "raysubmit_1: RUNNING (Job is currently running.)"),
    ("SUCCEEDED", "Job finished successfully.", "raysubmit_1: SUCCEEDED (Job finished successfully.)"),
    ("PENDING", "", "raysubmit_1: PENDING"),
])
def test_other_states_are_one_line(status, message, line):
    state = JobState("raysubmit_1", status, message, RUN)
    assert describe_job(state, ADDRESS) == [line] and start_failure(state) is None
    assert state.terminal == (status == "SUCCEEDED")


def test_entrypoint_command():
    assert entrypoint_command("jobs/my job.yaml", "compare", ("--seeds", "3", "--smoke-test")) == \
        "shpeft compare 'jobs/my job.yaml' --address auto --seeds 3 --smoke-test"
    assert entrypoint_command("job.yaml") == RUN
    with pytest.raises(JobsApiError, match="only run and compare"):
        entrypoint_command("job.yaml", "serve")
