"""Small synthetic tasks shared by the tasks tests (written once per session)."""

import pytest

from tasks.synthetic import task_family, write_task


@pytest.fixture(scope="session")
def family_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("family"))


@pytest.fixture(scope="session")
def family(family_root):
    """One small task per format: {format: TaskSpec}."""
    tasks = task_family(4, image_size=32, images_per_task=80, seed=0)
    formats = ("medmnist", "imagefolder", "parquet", "dicom")
    return {f: write_task(family_root, t, f) for t, f in zip(tasks, formats)}
