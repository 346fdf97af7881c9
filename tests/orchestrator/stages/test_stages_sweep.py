"""Where a sweep trial writes its artifact: after exactly the epochs ASHA can stop it on."""

import pytest

pytest.importorskip("ray")

from orchestrator.stages.sweep_search import asha_stop_points, trial_artifact_at  # noqa: E402


@pytest.mark.parametrize("max_t,grace,rf,brackets", [(4, 1, 2.0, 1), (27, 1, 3.0, 3), (30, 2, 2.5, 2), (10, 10, 2.0, 1),
                                                     (75, 1, 2.0, 1), (5, 3, 4.0, 2)])
def test_stop_points_are_asha_rungs_and_max_t(max_t, grace, rf, brackets):
    import numpy as np
    from ray.tune.schedulers import ASHAScheduler

    asha = ASHAScheduler(time_attr="training_iteration", metric="m", mode="max", max_t=max_t, grace_period=grace,
                         reduction_factor=rf, brackets=brackets)
    rungs = {m for b in asha._brackets for m, _ in b._rungs}
    # the first whole iteration at or past each rung, as _Bracket.on_result compares them
    expected = {int(np.ceil(m)) for m in rungs if m <= max_t} | {max_t}
    assert asha_stop_points(max_t, grace, rf, brackets) == expected


def test_stop_points_match_where_asha_stops_trials():
    """Feed ASHA every iteration of many trials with random rewards: each STOP falls on a stop point."""
    import random

    from ray.tune.experiment import Trial
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    max_t, rng = 20, random.Random(0)
    asha = ASHAScheduler(time_attr="training_iteration", metric="m", mode="max", max_t=max_t, grace_period=1,
                         reduction_factor=2.0, brackets=2)
    points = asha_stop_points(max_t, 1, 2.0, 2)
    stopped_at = []
    for i in range(30):
        trial = Trial("__fake", trial_id=f"t{i}", stub=True)
        asha.on_trial_add(None, trial)
        for it in range(1, max_t + 1):
            if asha.on_trial_result(None, trial, {"training_iteration": it, "m": rng.random()}) == TrialScheduler.STOP:
                stopped_at.append(it)
                break
    assert stopped_at and set(stopped_at) <= points
    assert any(s < max_t for s in stopped_at)  # some trials were stopped early, at a rung


def test_trial_artifact_named_by_its_epochs_only_at_stop_points():
    points = frozenset({1, 2, 4})
    uri = "/s/sweeps/t/trials/abc-e{epochs}.safetensors"
    assert [trial_artifact_at(uri, points, e) for e in range(4)] == [
        "/s/sweeps/t/trials/abc-e1.safetensors", "/s/sweeps/t/trials/abc-e2.safetensors", None,
        "/s/sweeps/t/trials/abc-e4.safetensors"]


@pytest.mark.parametrize("brackets,rf", [(1, 2.0), (2, 3.0)])
def test_reporting_only_at_stop_points_keeps_every_asha_decision(brackets, rf):
    """A trial reports to Tune only after its stop points: ASHA stops the same trials after the same epochs
    as when every epoch is reported (same rungs, same metrics recorded in them)."""
    import random

    import numpy as np
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    max_t = 24
    points = asha_stop_points(max_t, 1, rf, brackets)
    curves = {f"t{i}": [random.Random(i).random() for _ in range(max_t)] for i in range(40)}

    def stops(only_points: bool) -> dict[str, int]:
        np.random.seed(7)  # ASHA draws each new trial's bracket from numpy's global state
        asha = ASHAScheduler(time_attr="epochs", metric="m", mode="max", max_t=max_t, grace_period=1,
                             reduction_factor=rf, brackets=brackets)
        out = {}
        for tid, curve in curves.items():
            trial = Trial("__fake", trial_id=tid, stub=True)
            asha.on_trial_add(None, trial)
            for epochs in range(1, max_t + 1):
                if only_points and epochs not in points:
                    continue
                if asha.on_trial_result(None, trial, {"epochs": epochs, "m": curve[epochs - 1]}) == TrialScheduler.STOP:
                    out[tid] = epochs
                    break
        return out

    every, sparse = stops(False), stops(True)
    assert every == sparse
    assert any(e < max_t for e in every.values())
