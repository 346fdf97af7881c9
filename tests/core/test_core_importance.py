import json

import pytest
import torch
import torch.nn.functional as F

from shpeft_core import (
    ESTIMATORS,
    ImportanceConfig,
    ImportanceMap,
    backbone_fingerprint,
    combine_importance,
    compute_importance,
    magnitude_importance,
    eligible_parameters,
)
from shpeft_core.importance import ImportanceError, warm_head
from shpeft_core.objectives import supcon_loss
from shpeft_core.selection import normalize_scores, rank_normalize

from helpers_core import separable_batches, tiny_model

EXPECTED_ELIGIBLE = {
    "vit": {"patch_embed.proj.weight"}
    | {f"blocks.{i}.{m}.weight" for i in range(6) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")},
    "convnext": {"stem.0.weight"}
    | {f"stages.{s}.blocks.{b}.mlp.{f}.weight" for s, n in enumerate((1, 2, 4, 2)) for b in range(n) for f in ("fc1", "fc2")},
    "swin": {"patch_embed.proj.weight"}
    | {f"layers.{s}.blocks.0.{m}.weight" for s in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")},
}


@pytest.mark.parametrize("kind", ["vit", "convnext", "swin"])
def test_default_eligibility_exact(kind):
    names = set(eligible_parameters(tiny_model(kind)))
    assert names == EXPECTED_ELIGIBLE[kind]
    assert not any("norm" in n or "head" in n or "pos_embed" in n or "conv_dw" in n for n in names)


def test_rules_are_full_matches_not_substrings():
    model = tiny_model("vit")
    assert set(eligible_parameters(model, rules=[r"fc1"])) == set()
    assert set(eligible_parameters(model, rules=[r"blocks\.0\.mlp\.fc1"])) == {"blocks.0.mlp.fc1.weight"}
    assert set(eligible_parameters(model, rules=[r"head", r".*"])) >= {"blocks.5.mlp.fc2.weight"}
    assert "head.weight" not in eligible_parameters(model, rules=[r".*"])


def _reference(model, batches, estimator, names):
    """Dense reference: full float64 backward per batch, accumulated by hand."""
    m = model.double()
    acc = {n: torch.zeros_like(p) for n, p in m.named_parameters() if n in names}
    params = dict(m.named_parameters())
    for x, y in batches:
        m.zero_grad()
        F.cross_entropy(m(x.double()), y).backward()
        for n in acc:
            g, w = params[n].grad, params[n].detach()
            acc[n] += {"grad2": g * g, "grad1": g, "taylor1": g * w, "taylor2": (g * w) ** 2}[estimator]
    return {n: (t.abs() if estimator in ("grad1", "taylor1") else t) for n, t in acc.items()}


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_estimators_match_dense_reference(estimator):
    model = tiny_model("vit").double()
    batches = [(x.double(), y) for x, y in separable_batches(n=24, batch=8, num_classes=3)]
    cfg = ImportanceConfig(estimator=estimator, num_batches=2, head_warmup="none")
    imp = compute_importance(model, batches, cfg, num_classes=3, dataset_fingerprint="ds1")
    ref = _reference(tiny_model("vit").double(), batches[:2], estimator, set(imp.scores))
    assert set(imp.scores) == EXPECTED_ELIGIBLE["vit"]
    for n, t in imp.scores.items():
        assert t.dtype == torch.float32 and t.shape == ref[n].shape
        torch.testing.assert_close(t, ref[n].float(), rtol=1e-4, atol=1e-12)
    assert imp.metadata["batches"] == "2" and imp.metadata["estimator"] == estimator
    assert imp.metadata["backbone"] == "test_vit"
    assert imp.metadata["backbone_fingerprint"] == backbone_fingerprint(model)
    assert imp.metadata["dataset_fingerprint"] == "ds1"


def test_compute_importance_leaves_model_untouched_and_warms_head():
    model = tiny_model("vit", num_classes=5)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    batches = separable_batches(n=32, batch=16, num_classes=2)
    imp = compute_importance(model, batches, ImportanceConfig(num_batches=2), num_classes=2)
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    assert all(t.abs().sum() > 0 for t in imp.scores.values())


@pytest.mark.parametrize("method", ["linear_probe", "ridge"])
def test_head_warmup_beats_random_head(method):
    torch.manual_seed(0)
    model = tiny_model("vit", num_classes=2)
    feats = torch.randn(64, 64)
    labels = (feats[:, 0] > 0).long()
    before = F.cross_entropy(model.get_classifier()(feats), labels).item()
    warm_head(model, feats, labels, ImportanceConfig(head_warmup=method, head_warmup_steps=60), 2)
    logits = model.get_classifier()(feats)
    assert F.cross_entropy(logits, labels).item() < before
    assert (logits.argmax(1) == labels).float().mean() > 0.9


@pytest.mark.parametrize("method", ["linear_probe", "ridge"])
def test_head_warmup_stays_on_the_features_device(method):
    # On a GPU the features and the head live there; a tensor made on the CPU inside the warm-up fails
    # there (it did for ridge). The meta device catches the same mistake without a GPU.
    head = torch.nn.Linear(16, 3).to("meta")
    model = type("M", (torch.nn.Module,), {"get_classifier": lambda self: self.head})()
    model.head = head
    feats, labels = torch.randn(24, 16, device="meta"), torch.zeros(24, dtype=torch.long, device="meta")
    warm_head(model, feats, labels, ImportanceConfig(head_warmup=method, head_warmup_steps=2), 3)
    assert head.weight.device.type == "meta" and head.bias.device.type == "meta"


def test_supcon_loss_head_free_and_finite():
    torch.manual_seed(0)
    f = torch.randn(8, 4, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    loss = supcon_loss(f, labels)
    loss.backward()
    assert torch.isfinite(loss) and f.grad.abs().sum() > 0
    # Features that agree within classes give a lower loss than random ones.
    clustered = F.one_hot(labels, 4).float() * 5
    assert supcon_loss(clustered, labels) < loss
    assert supcon_loss(torch.randn(3, 4), torch.tensor([0, 1, 2])).item() == 0.0
    model = tiny_model("convnext")
    imp = compute_importance(model, separable_batches(n=16, batch=8), ImportanceConfig(loss="supcon", num_batches=2), num_classes=2)
    assert imp.metadata["loss"] == "supcon" and set(imp.scores) == EXPECTED_ELIGIBLE["convnext"]


@pytest.mark.parametrize("uri_kind", ["local", "memory"])
def test_importance_map_round_trip(tmp_path, uri_kind):
    scores = {"a.weight": torch.rand(3, 4), "b.weight": torch.rand(2, 2, 3, 3)}
    meta = {"backbone": "test_vit", "backbone_fingerprint": "f" * 64, "estimator": "grad2", "batches": "4", "dataset_fingerprint": "d"}
    uri = str(tmp_path / "imp.safetensors") if uri_kind == "local" else f"memory://imp/{uri_kind}.safetensors"
    sha = ImportanceMap(scores, meta).save(uri)
    assert len(sha) == 64
    back = ImportanceMap.load(uri)
    assert back.metadata == meta
    assert set(back.scores) == set(scores) and all(torch.equal(back.scores[n], scores[n]) for n in scores)


def test_importance_map_load_refuses_other_files(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"\x80\x04not safetensors at all")
    with pytest.raises(ValueError, match="x.safetensors"):
        ImportanceMap.load(str(p))
    with pytest.raises(FileNotFoundError):
        ImportanceMap.load(str(tmp_path / "missing.safetensors"))


def test_combine_importance_rank_mean_and_magnitude():
    torch.manual_seed(0)
    a = ImportanceMap({"p.weight": torch.rand(4, 5)}, {"backbone": "b", "dataset_fingerprint": "1", "estimator": "grad2", "batches": "2"})
    b = ImportanceMap({"p.weight": torch.rand(4, 5) * 1e6}, {"backbone": "b", "dataset_fingerprint": "2", "estimator": "grad2", "batches": "3"})
    c = combine_importance([a, b])
    expected = (rank_normalize(a.scores["p.weight"]) + rank_normalize(b.scores["p.weight"])) / 2
    torch.testing.assert_close(c.scores["p.weight"], expected.float())
    assert c.metadata["batches"] == "5" and json.loads(c.metadata["datasets"]) == ["1", "2"]
    assert c.metadata["normalization"] == "rank"
    model = tiny_model("vit")
    w = model.blocks[0].mlp.fc1.weight
    m1 = ImportanceMap({"blocks.0.mlp.fc1.weight": torch.rand_like(w)}, {})
    only_mag = combine_importance([m1], magnitude_blend=1.0, model=model)
    torch.testing.assert_close(only_mag.scores["blocks.0.mlp.fc1.weight"], rank_normalize(w.detach().abs()).float())
    with pytest.raises(ImportanceError, match="backbone"):
        combine_importance([a, ImportanceMap(b.scores, {"backbone": "other"})])
    with pytest.raises(ImportanceError, match="p.weight"):
        combine_importance([a, ImportanceMap({"p.weight": torch.rand(5, 4)}, {})])
    with pytest.raises(ImportanceError, match="model"):
        combine_importance([a], magnitude_blend=0.5)


def test_magnitude_importance_is_the_weights_abs_over_eligible_entries(tmp_path):
    """The data-free agnostic map: |w| of exactly the eligible weights, float64 reference; ranked, it is what
    combine_importance gives at magnitude_blend=1, and a hybrid mask can use it like a pooled map."""
    from shpeft_core.selection import hybrid_mask

    model = tiny_model("vit")
    mag = magnitude_importance(model)
    params = eligible_parameters(model)
    assert set(mag.scores) == set(params) == EXPECTED_ELIGIBLE["vit"]
    for n, p in params.items():
        ref = p.detach().to(torch.float64).abs()
        assert mag.scores[n].dtype == torch.float32
        torch.testing.assert_close(mag.scores[n].to(torch.float64), ref, rtol=0, atol=0)
    assert mag.metadata["kind"] == "agnostic" and mag.metadata["estimator"] == "magnitude"
    assert mag.metadata["backbone_fingerprint"] == backbone_fingerprint(model)
    assert json.loads(mag.metadata["datasets"]) == [] and mag.head is None
    any_pool = ImportanceMap({n: torch.rand_like(t) for n, t in mag.scores.items()}, {})
    blended = combine_importance([any_pool], magnitude_blend=1.0, model=model)
    ranked = normalize_scores(mag.scores, "rank")  # one rank percentile over every eligible entry
    for n in mag.scores:
        torch.testing.assert_close(ranked[n].float(), blended.scores[n])
    mag.save(str(tmp_path / "mag.safetensors"))
    loaded = ImportanceMap.load(str(tmp_path / "mag.safetensors"))
    assert all(torch.equal(loaded.scores[n], mag.scores[n]) for n in mag.scores)
    # alpha 0 keeps the largest-magnitude entries of the budget
    mask = hybrid_mask(any_pool.scores, loaded.scores, alpha=0.0, density=0.01, granularity="global", mix="union")
    flat = torch.cat([mag.scores[n].flatten() for n in sorted(mag.scores)])
    k = sum(len(ix) for ix in mask.values())
    chosen = torch.cat([mag.scores[n].flatten()[ix.long()] for n, ix in sorted(mask.items())])
    assert chosen.min() >= flat.topk(k).values.min()
    assert set(magnitude_importance(model, rules=[r"blocks\.0\.mlp\.fc1"]).scores) == {"blocks.0.mlp.fc1.weight"}
    with pytest.raises(ImportanceError, match="no eligible"):
        magnitude_importance(model, rules=[r"nothing"])


def test_bad_importance_config():
    with pytest.raises(ImportanceError, match="estimator"):
        ImportanceConfig(estimator="fisher")
    with pytest.raises(ImportanceError, match="no batches"):
        compute_importance(tiny_model("vit"), [], ImportanceConfig(), num_classes=2)
    with pytest.raises(ImportanceError, match="labels"):
        compute_importance(tiny_model("vit"), [(torch.randn(2, 3, 32, 32), torch.tensor([0, 7]))], num_classes=2)


def test_importance_pass_keeps_its_warmed_head_and_it_beats_a_random_head(tmp_path):
    """The map carries the head warmed on the importance batches; training can start from it."""
    from shpeft_core.importance import load_warm_head

    model = tiny_model("vit", num_classes=2)
    batches = separable_batches(n=64, batch=16, num_classes=2, seed=4)
    imp = compute_importance(model, batches, ImportanceConfig(num_batches=4), num_classes=2)
    assert set(imp.head) == {"head.weight", "head.bias"}
    imp.save(str(tmp_path / "m.safetensors"))
    loaded = ImportanceMap.load(str(tmp_path / "m.safetensors"))
    assert set(loaded.scores) == set(imp.scores) and all(torch.equal(loaded.head[n], imp.head[n]) for n in imp.head)

    def loss(m):
        with torch.no_grad():
            return sum(F.cross_entropy(m(x), y).item() for x, y in batches)

    fresh = tiny_model("vit", num_classes=2)
    random_loss = loss(fresh)
    assert load_warm_head(fresh, loaded)
    assert loss(fresh) < random_loss - 0.1
    other = tiny_model("vit", num_classes=3)
    with pytest.raises(ValueError, match="shape"):
        load_warm_head(other, loaded)
