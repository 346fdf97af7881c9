"""Crafted deltas: a file whose self-checksum is recomputed (as anyone can) must still not reach outside what
its kind may touch, and a removed delta must leave the model exactly as it was.

The crafted files are written with ``_st.write`` (the same writer shpeft uses, checksum included), so
they pass the integrity check and only the validation stands between them and the model.
"""

from __future__ import annotations

import json
import os
import socket
import threading

import pytest
import torch

from shpeft_core import _st
from shpeft_core.backbone import backbone_fingerprint
from shpeft_core.delta import (
    MAX_NUM_CLASSES,
    DeltaError,
    TaskDelta,
    apply_delta,
    extract_delta,
    load_delta,
    merge_delta,
    validate_delta,
)
from shpeft_core.eligibility import eligible_parameters
from shpeft_core.io import StorageError, read_regular_bytes
from shpeft_core.sparse import apply_sparse_training

from helpers_core import tiny_model

META = {"alpha": "0.5", "estimator": "grad2", "importance_key": "imp/abc", "task": "t1"}


def _good_delta(num_classes: int = 3) -> TaskDelta:
    model = tiny_model("vit", num_classes)
    g = torch.Generator().manual_seed(0)
    mask = {n: torch.sort(torch.randperm(p.numel(), generator=g)[:7]).values.to(torch.int32)
            for n, p in eligible_parameters(model).items()}
    apply_sparse_training(model, mask)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return extract_delta(model, metadata=META)


def _crafted(path, indices, values, head, metadata) -> str:
    """A delta file written as an attacker would: any tensors, the checksum recomputed."""
    tensors = {**{f"{n}.indices": t for n, t in indices.items()}, **{f"{n}.values": t for n, t in values.items()},
               **head}
    _st.write(str(path), tensors, metadata)
    return str(path)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_backbone_weight_under_a_head_key_is_refused_and_changes_nothing(tmp_path):
    """A head of another size plus a backbone weight smuggled in as a 'head' tensor, with num_classes
    chosen so every head tensor's first dimension matches it: refused before anything is written."""
    good = _good_delta()
    base = tiny_model("vit", 3)
    qkv = base.blocks[0].attn.qkv.weight
    n = qkv.shape[0]  # num_classes chosen to fit the smuggled tensor
    head = {"head.weight": torch.randn(n, good.head["head.weight"].shape[1]), "head.bias": torch.zeros(n),
            "blocks.0.attn.qkv.weight": torch.zeros_like(qkv)}
    meta = {**good.metadata, "num_classes": str(n), "class_names": json.dumps([f"c{i}" for i in range(n)])}
    uri = _crafted(tmp_path / "evil.safetensors", good.indices, good.values, head, meta)
    before, fp = _state(base), backbone_fingerprint(base)
    with pytest.raises(DeltaError, match="blocks.0.attn.qkv.weight"):
        apply_delta(base, load_delta(uri)).remove()
    assert backbone_fingerprint(base) == fp
    after = base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_sparse_values_only_at_weights_a_delta_may_change(tmp_path):
    good = _good_delta()
    base = tiny_model("vit", 3)
    for name in ("pos_embed", "norm.weight", "blocks.0.norm1.bias", "head.weight", "blocks.0.attn.qkv.bias"):
        idx = torch.tensor([0, 1], dtype=torch.int32)
        uri = _crafted(tmp_path / f"{name}.safetensors", {**good.indices, name: idx},
                       {**good.values, name: torch.ones(2)}, good.head, good.metadata)
        fp = backbone_fingerprint(base)
        with pytest.raises(DeltaError, match=name.replace(".", r"\.")):
            apply_delta(base, load_delta(uri))
        assert backbone_fingerprint(base) == fp


@pytest.mark.parametrize("case", ["nan_values", "inf_head", "unsorted", "duplicate", "negative",
                                  "out_of_range", "huge_num_classes_no_head", "class_names_short",
                                  "head_rows_not_num_classes", "int_values"])
def test_malformed_deltas_are_refused_at_load_or_before_apply(tmp_path, case):
    good = _good_delta()
    name = sorted(good.indices)[0]
    indices, values, head, meta = dict(good.indices), dict(good.values), dict(good.head), dict(good.metadata)
    if case == "nan_values":
        values[name] = values[name].clone()
        values[name][0] = float("nan")
    elif case == "inf_head":
        head["head.bias"] = head["head.bias"].clone()
        head["head.bias"][1] = float("inf")
    elif case == "unsorted":
        indices[name] = indices[name].flip(0).contiguous()
    elif case == "duplicate":
        indices[name] = indices[name].clone()
        indices[name][1] = indices[name][0]
    elif case == "negative":
        indices[name] = indices[name].clone()
        indices[name][0] = -1
    elif case == "out_of_range":
        indices[name] = indices[name].clone()
        indices[name][-1] = 2**31 - 1
    elif case == "huge_num_classes_no_head":
        head = {}
        meta["num_classes"] = str(10**9)
    elif case == "class_names_short":
        meta["class_names"] = json.dumps(["a"])
    elif case == "head_rows_not_num_classes":
        meta["num_classes"], meta["class_names"] = "4", json.dumps(list("abcd"))
    elif case == "int_values":
        values[name] = values[name].to(torch.int32)
    uri = _crafted(tmp_path / f"{case}.safetensors", indices, values, head, meta)
    base = tiny_model("vit", 3)
    fp = backbone_fingerprint(base)
    with pytest.raises(DeltaError) as info:
        apply_delta(base, load_delta(uri))
    assert "\n" not in str(info.value)
    assert backbone_fingerprint(base) == fp
    if case == "huge_num_classes_no_head":
        assert str(MAX_NUM_CLASSES) in str(info.value)


def test_remove_restores_a_rebuilt_head_and_checks_what_it_touched():
    good = _good_delta(num_classes=5)
    base = tiny_model("vit", 3)
    before = _state(base)
    handle = apply_delta(base, good)
    assert base.head.out_features == 5
    handle.remove()
    assert base.head.out_features == 3
    after = base.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    # An undo record that misses an entry (what a partial undo would leave): remove() says so.
    handle = apply_delta(base, good)
    handle._entries.pop()
    with pytest.raises(DeltaError, match="differ from before"):
        handle.remove()


def test_validate_delta_needs_no_hash_and_accepts_what_training_writes():
    good = _good_delta()
    validate_delta(tiny_model("vit", 3), good)  # another head size is fine: the head is rebuilt to it
    validate_delta(tiny_model("vit", 7), good)
    merged = merge_delta(good)
    assert merged.head.out_features == 3


def test_a_fifo_is_never_opened_for_reading(tmp_path):
    fifo = tmp_path / "delta.safetensors"
    os.mkfifo(fifo)
    got: dict = {}

    def load():
        try:
            load_delta(str(fifo))
        except Exception as exc:  # what the reader said
            got["error"] = exc

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(10)
    try:
        assert not t.is_alive(), "reading a FIFO blocked"
        assert isinstance(got["error"], DeltaError) and "FIFO" in str(got["error"])
        assert str(fifo) in str(got["error"])
    finally:
        if t.is_alive():  # release the reader stuck on the old code
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
    with pytest.raises(StorageError, match="character device"):
        read_regular_bytes("/dev/zero")


def test_size_limit_and_read_timeout(tmp_path):
    f = tmp_path / "big.bin"
    f.write_bytes(b"x" * 1000)
    assert read_regular_bytes(str(f), max_bytes=1000) == b"x" * 1000
    with pytest.raises(StorageError, match="over the limit of 999 bytes"):
        read_regular_bytes(str(f), max_bytes=999)
    # A loopback server that accepts and never answers: the read gives up after its timeout.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    try:
        with pytest.raises(TimeoutError, match="not read within 1 s"):
            load_delta(f"http://127.0.0.1:{port}/stalled.safetensors", timeout_s=1)
    finally:
        srv.close()
