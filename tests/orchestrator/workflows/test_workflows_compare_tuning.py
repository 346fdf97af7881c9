"""Learning-rate choice inside `shpeft compare`: the grid, the choice on validation, where a rate comes from."""

import pytest

from orchestrator.job.load import parse_job
from orchestrator.workflows.compare_tuning import choose_lr, lr_grid, starting_lr


def test_grid_is_centred_on_the_start_on_a_log_scale():
    assert lr_grid(1e-2) == [0.00333, 0.01, 0.03]
    assert lr_grid(3e-4, points=5, factor=2) == [7.5e-05, 0.00015, 0.0003, 0.0006, 0.0012]
    assert lr_grid(1e-3, points=1) == [1e-3]
    with pytest.raises(ValueError, match="points"):
        lr_grid(1e-3, points=0)


def test_the_best_validation_score_wins_and_ties_go_to_the_start():
    assert choose_lr({0.00333: 0.7, 0.01: 0.8, 0.03: 0.75}, 0.01) == 0.01
    assert choose_lr({0.00333: 0.9, 0.01: 0.8, 0.03: 0.9}, 0.01) in (0.00333, 0.03)
    assert choose_lr({0.00333: 0.8, 0.01: 0.8, 0.03: 0.8}, 0.01) == 0.01
    assert choose_lr({0.00333: None, 0.01: float("nan"), 0.03: 0.5}, 0.01) == 0.03
    assert choose_lr({0.01: None}, 0.01) is None


def test_method_lr_pins_a_rate_and_training_lr_is_never_a_start():
    job = parse_job({"backbone": {"name": "test_vit"}, "store": "/tmp/s",
                     "tasks": [{"name": "t", "source": "/tmp/t", "format": "imagefolder", "num_classes": 2}],
                     "training": {"lr": 0.05}, "method": {"lr": {"full": 0.002}}})
    assert starting_lr(job, "full") == (0.002, "job")
    from shpeft_core.methods import get_method

    assert starting_lr(job, "lora") == (get_method("lora").default_lr, "default")
    assert starting_lr(job, "shpeft") == (get_method("shpeft").default_lr, "default")
