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


def test_num_classes_may_be_left_to_the_folders_of_layout_formats_only():
    from tasks.formats import CLASSES_FROM_LAYOUT, FORMATS, get_format

    for fmt in CLASSES_FROM_LAYOUT:
        s = TaskSpec(name="t", source="/d", format=fmt)
        assert s.num_classes is None and s.class_names is None
        with pytest.raises(ValueError, match="not resolved"):
            s.names()
    for fmt in set(FORMATS) - set(CLASSES_FROM_LAYOUT):
        with pytest.raises(ValidationError, match=f"num_classes is required for format '{fmt}'"):
            TaskSpec(name="t", source="/d", format=fmt)
        with pytest.raises(NotImplementedError, match=fmt):
            get_format(fmt).layout_classes(TaskSpec(name="t", source="/d", format=fmt, num_classes=2))
    # class names alone give the count, and the spec equals the one with both written out
    named = TaskSpec(name="t", source="/d", format="parquet", class_names=["a", "b"])
    assert named.num_classes == 2 and named == TaskSpec(name="t", source="/d", format="parquet", class_names=["a", "b"],
                                                         num_classes=2)
    with pytest.raises(ValidationError, match="class_names has 2 entries but num_classes=3"):
        TaskSpec(name="t", source="/d", format="parquet", class_names=["a", "b"], num_classes=3)
