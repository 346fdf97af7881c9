"""Fixtures shared by the orchestrator tests."""

import pytest


@pytest.fixture(scope="module")
def ray_local():
    """A local 2-CPU Ray for one test module, without dashboard or worker output on the console."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
