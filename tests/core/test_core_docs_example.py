"""The shpeft_core usage example in docs/python-api.md runs as written."""

import pathlib
import re

import torch

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "python-api.md"


def test_docs_usage_example_runs():
    text = DOC.read_text()
    section = text.split("### Usage", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "no python block under '### Usage'"
    ns: dict = {}
    exec(compile(blocks[0], str(DOC), "exec"), ns)
    assert len(ns["history"]) == 3
    assert ns["logits"].shape == (4, 2)
    plain, base = ns["plain"], ns["base"]
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(ns["images"][:4]), ns["logits"], rtol=1e-5, atol=1e-6)
    assert not any(n.endswith(".values") for n in plain.state_dict())
    assert ns["history"][-1]["accuracy"] > 0.8
