import pytest
from pydantic import ValidationError

from tasks.spec import TaskSpec

BASE = dict(name="t1", source="/data/x", format="imagefolder", num_classes=3)


def test_minimal_spec_defaults():
    s = TaskSpec(**BASE)
    assert s.split_ratio == (0.7, 0.15, 0.15) and s.metric == "macro_f1" and s.channels == 3
    assert s.names() == ["0", "1", "2"]


@pytest.mark.parametrize("name", ["../up", "a/b", "", "x" * 65, "a.b", "..", "a b"])
def test_name_cannot_escape_folder(name):
    with pytest.raises(ValidationError, match="name"):
        TaskSpec(**{**BASE, "name": name})


def test_extra_fields_are_rejected():
    with pytest.raises(ValidationError, match="nmu_classes"):
        TaskSpec(**BASE, nmu_classes=3)


def test_class_names_must_match_count_and_be_folder_safe():
    with pytest.raises(ValidationError, match="class_names has 2 entries"):
        TaskSpec(**BASE, class_names=["a", "b"])
    with pytest.raises(ValidationError, match=r"class_names\[1\]"):
        TaskSpec(**BASE, class_names=["a", "../b", "c"])
    with pytest.raises(ValidationError, match="duplicates"):
        TaskSpec(**BASE, class_names=["a", "a", "c"])


def test_split_ratio_and_classes_validated():
    with pytest.raises(ValidationError, match="split_ratio"):
        TaskSpec(**{**BASE, "split_ratio": (0.8, 0.3, 0.1)})
    with pytest.raises(ValidationError, match="split_ratio"):
        TaskSpec(**{**BASE, "split_ratio": (1.0, 0.0, 0.0)})
    with pytest.raises(ValidationError, match="num_classes"):
        TaskSpec(**{**BASE, "num_classes": 1})
    with pytest.raises(ValidationError, match="format"):
        TaskSpec(**{**BASE, "format": "csv"})


def test_json_round_trip():
    s = TaskSpec(**BASE, class_names=["a", "b", "c"], window=(40.0, 400.0))
    assert TaskSpec.model_validate_json(s.model_dump_json()) == s
