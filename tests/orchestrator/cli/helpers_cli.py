"""What the command line tests share: invoking `shpeft` in-process, the installed script, a small job file."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from click.testing import CliRunner

from orchestrator.cli.main import main

ROOT = Path(__file__).resolve().parents[3]
SHPEFT = Path(sys.executable).parent / "shpeft"


def invoke(*args, **kw):
    """`shpeft ARGS` in this process; exceptions other than click's exits propagate."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, **kw)


def good_job(tmp_path: Path) -> dict:
    """A valid job file's content: one imagefolder task under tmp_path/data (not written)."""
    return {
        "backbone": {"name": "test_vit", "kwargs": {"img_size": 32}},
        "store": str(tmp_path / "store"),
        "tasks": [{"name": "t1", "source": str(tmp_path / "data"), "format": "imagefolder", "num_classes": 2}],
    }


def write_two_class_folder(root: Path) -> None:
    """An imagefolder dataset with two classes and two 8x8 images per class and split."""
    from PIL import Image

    for split in ("train", "val", "test"):
        for c in range(2):
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (200 * c, 10 * i, 0)).save(root / split / f"c{c}" / f"{i}.png")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
