import typing

import pytest

from orchestrator.cli.tasks import tasks_cli
from tasks.formats import FORMATS, format_hint, get_format
from tasks.formats.base import DatasetFormat
from tasks.spec import FORMATS as SPEC_FORMATS
from tasks.spec import TaskSpec


def test_spec_and_cli_take_their_formats_from_the_registry():
    assert SPEC_FORMATS == FORMATS == ("medmnist", "imagefolder", "parquet", "dicom", "table")
    assert typing.get_args(TaskSpec.model_fields["format"].annotation) == FORMATS
    check = next(c for c in tasks_cli.commands.values() if c.name == "check")
    fmt_option = next(p for p in check.params if p.name == "fmt")
    assert tuple(fmt_option.type.choices) == FORMATS


@pytest.mark.parametrize("name", FORMATS)
def test_every_registered_format_implements_the_interface(name):
    fmt = get_format(name)
    assert isinstance(fmt, DatasetFormat) and fmt.name == name and get_format(name) is fmt
    for method in ("claims_extension", "build", "data_files", "write"):
        assert getattr(type(fmt), method) is not getattr(DatasetFormat, method), (name, method)


def test_aliases_and_unknown_names():
    assert get_format("npz") is get_format("medmnist")
    with pytest.raises(KeyError, match="zip"):
        get_format("zip")


def test_hint_names_the_most_specific_format():
    assert format_hint(["a/x.dcm", "a/y.png"]).endswith("try --format dicom")
    assert format_hint(["a/x.parquet", "a/y.npz"]).endswith("try --format parquet")
    assert format_hint(["a/notes.txt"]) == "; it holds 1 x .txt"
