"""The README's "Your own data, step by step", run as written on one generated ImageFolder.

The commands are read from the README's code block and run in a shell, in a folder holding the job file,
with only the dataset's path and the export's placeholder file name filled in; the job file is the
README's, with the demo's shipped backbone (a 32 px ViT) and a short CPU training in place of ViT-B/16 on
a GPU. The dataset is one task with no split folders and no class list anywhere: its classes come from its
folders, and, alone in the job, its task-agnostic map is the pre-trained weights' magnitude. It ends with
a verified delta and a prediction on one of its images. Step 4 (`shpeft compare`, 30 runs) is left out.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[3]
CLASSES = ["coarse", "fine", "medium"]
pytestmark = pytest.mark.ray


def _readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Your own data, step by step")
    return text[start:text.index("\n## ", start + 1)]


def _blocks(section: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)


def _write_imagefolder(root: Path) -> None:
    """<root>/<class>/<n>.png, 30 per class, no split folders: the loader's seeded split applies."""
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = {"coarse": (200, 40, 40), "fine": (40, 200, 40), "medium": (40, 40, 200)}
    for name, colour in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(30):
            img = np.clip(rng.normal(colour, 40.0, size=(32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i:03d}.png")


def test_readme_own_data_steps_end_with_a_verified_delta_and_a_prediction(tmp_path):
    from orchestrator.workflows.demo import DEMO_BACKBONE, demo_backbone_uri
    from shpeft_core.delta import load_delta
    from shpeft_core.io import sha256_file

    section = _readme_section()
    (script,) = _blocks(section, "bash")
    (job_yaml,) = _blocks(section, "yaml")
    lines = [ln.strip() for ln in script.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    data_dir = re.search(r"shpeft tasks check (\S+)", script).group(1)  # the README's dataset path
    task = re.search(r"latest_artifact as a; print\(a\('\./store','([^']+)'\)", script).group(1)

    data = tmp_path / "data" / task
    _write_imagefolder(data)
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(data / "fine" / "007.png", work / "scan.png")  # one of its own images

    job = yaml.safe_load(job_yaml)
    assert [t["source"] for t in job["tasks"]] == [data_dir] and "num_classes" not in job["tasks"][0]
    assert "importance" not in job, "the README's first job has no pool: the lone-task case"
    job["tasks"][0]["source"] = str(data)
    job["backbone"] = {**DEMO_BACKBONE, "source": demo_backbone_uri()}
    job["training"] = {**job["training"], "use_gpu": False, "epochs": 2, "batch_size": 16}
    job["importance"] = {"batches": 2}
    (work / "job.yaml").write_text(yaml.safe_dump(job))

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT), "SHPEFT_NO_DASHBOARD": "1"}
    env.pop("RAY_ADDRESS", None)  # a local embedded Ray, never someone else's cluster

    outputs = {}
    for line in lines:
        if line.startswith("shpeft compare"):
            continue  # step 4: 30 comparison runs, beyond a unit test
        cmd = line.replace(data_dir, str(data))
        if "<job_id>-<hash>" in cmd:
            (delta,) = glob.glob(str(work / "store" / "deltas" / task / "*.safetensors"))
            cmd = cmd.replace(f"./store/deltas/{task}/<job_id>-<hash>.safetensors", delta)
        if line.startswith(("shpeft predict", "shpeft export")):
            # the weights come from a file here, not the hub: the README's step 3 says to name them
            cmd += f" --backbone-source {demo_backbone_uri()}"
        out = subprocess.run(["bash", "-c", cmd], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"{line}\n{out.stdout}\n{out.stderr}"
        assert "Traceback" not in out.stdout + out.stderr, line
        outputs[line.split()[1]] = out.stdout + out.stderr

    check = outputs["tasks"]
    assert f'num_classes: 3, class_names: {json.dumps(CLASSES)}' in check and "valid" in check
    assert "ok (1 task(s)" in outputs["validate"] and "magnitude |w|" in outputs["validate"]
    assert f"task-agnostic importance for {task}: the pre-trained weights' magnitude |w|" in outputs["run"]
    assert f"[{task}] done" in outputs["run"] and "1 ok, 0 failed" in outputs["run"]
    assert task in outputs["list"] and " ok " in outputs["list"]

    from orchestrator.store.layout import latest_artifact
    from orchestrator.store.results import read_catalogue

    latest = latest_artifact(str(work / "store"), task)
    assert sha256_file(latest["uri"]) == latest["sha256"]
    delta = load_delta(latest["uri"])  # verifies the checksum and every tensor digest
    assert json.loads(delta.metadata["class_names"]) == CLASSES and delta.metadata["num_classes"] == "3"
    assert delta.metadata["agnostic_source"] == "magnitude" and delta.metadata["method"] == "shpeft"
    (row,) = read_catalogue(str(work / "store")).to_pylist()
    assert row["status"] == "ok" and row["agnostic_source"] == "magnitude" and row["agnostic_pool"] is None
    # the prediction names one of the folder classes for the image
    assert re.search(rf"{task}.*({'|'.join(CLASSES)})", outputs["predict"]), outputs["predict"]
    assert (work / f"{task}_vitb16.safetensors").is_file()
