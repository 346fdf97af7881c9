"""GPS's importance pass (supervised-contrastive loss on two views, one whole pass, |sum g|), the parameters
GPS trains besides its selected weights, and run seeds that draw the importance batches and the head."""

import random
import re

import numpy as np
import pytest
import torch

from shpeft_core import BackboneSpec, create_backbone
from shpeft_core.eligibility import eligible_parameters
from shpeft_core.importance import ImportanceConfig, compute_importance
from shpeft_core.methods.gps import gps_importance_config, gps_trainable_extras
from shpeft_core.objectives import supcon_loss
from shpeft_core.selection import hybrid_mask, select_mask

from helpers_core import tiny_model

TAU = 0.07


def reference_supcon(views: torch.Tensor, labels: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """Khosla et al. (2020), eq. 2, with every view an anchor, written out term by term in float64.

    ``views`` [B, V, D]. For anchor i, P(i) are the other views with i's label and A(i) every other view:
    L = 1/|I| sum_i -1/|P(i)| sum_{p in P(i)} log(exp(z_i.z_p / tau) / sum_{a in A(i)} exp(z_i.z_a / tau)).
    """
    b, v, _ = views.shape
    z = [views[i, j] / views[i, j].norm() for j in range(v) for i in range(b)]  # view-major, as the reference
    y = [int(labels[i]) for _ in range(v) for i in range(b)]
    total = torch.zeros((), dtype=torch.float64)
    for i in range(len(z)):
        denom = sum(torch.exp(z[i] @ z[a] / tau) for a in range(len(z)) if a != i)
        pos = [p for p in range(len(z)) if p != i and y[p] == y[i]]
        total = total - sum(torch.log(torch.exp(z[i] @ z[p] / tau) / denom) for p in pos) / len(pos)
    return total / len(z)


def test_supcon_loss_on_two_views_matches_the_reference_formula_in_float64():
    g = torch.Generator().manual_seed(0)
    views = torch.randn(6, 2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 2, 1, 1])
    ours = supcon_loss(torch.cat([views[:, 0], views[:, 1]]), labels.repeat(2), TAU)
    ref = reference_supcon(views, labels)
    assert ours.dtype == torch.float64
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12)
    g_ours, = torch.autograd.grad(ours, views)
    g_ref, = torch.autograd.grad(ref, views)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-12)


def _two_view_batches(n_batches=3, batch=5, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = torch.randn(batch, 3, size, size, generator=g, dtype=torch.float64)
        noise = 0.1 * torch.randn(batch, 3, size, size, generator=g, dtype=torch.float64)
        out.append(([x, x + noise], torch.randint(0, 3, (batch,), generator=g)))
    return out


def test_gps_importance_is_abs_sum_of_reference_gradients_over_the_whole_pass():
    model = tiny_model("vit").double()
    batches = _two_view_batches()
    imap = compute_importance(model, batches, gps_importance_config(), num_classes=3)
    assert imap.head is None and imap.metadata["loss"] == "supcon" and imap.metadata["estimator"] == "grad1"
    assert (imap.metadata["batches"], imap.metadata["views"], imap.metadata["images"]) == ("3", "2", "15")
    ref_model = tiny_model("vit").double().eval()
    params = eligible_parameters(ref_model)
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    for (x1, x2), y in batches:
        feats = ref_model.forward_head(ref_model.forward_features(torch.cat([x1, x2])), pre_logits=True)
        loss = reference_supcon(torch.stack([feats[: len(y)], feats[len(y):]], 1), y)
        for (n, _), gr in zip(params.items(), torch.autograd.grad(loss, list(params.values()))):
            acc[n] += gr
    assert set(imap.scores) == set(acc)
    for n, want in acc.items():
        torch.testing.assert_close(imap.scores[n].double(), want.abs(), rtol=2e-5, atol=1e-12)


def test_num_batches_none_takes_one_whole_pass():
    model = tiny_model("vit")
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(5)]
    cfg = dict(estimator="grad2", head_warmup="none")
    whole = compute_importance(model, batches, ImportanceConfig(num_batches=None, **cfg), num_classes=3, seed=0)
    five = compute_importance(model, batches, ImportanceConfig(num_batches=5, **cfg), num_classes=3, seed=0)
    two = compute_importance(model, batches, ImportanceConfig(num_batches=2, **cfg), num_classes=3, seed=0)
    assert whole.metadata["batches"] == "5" and two.metadata["batches"] == "2"
    assert all(torch.equal(whole.scores[n], five.scores[n]) for n in whole.scores)
    assert not all(torch.equal(whole.scores[n], two.scores[n]) for n in whole.scores)
    with pytest.raises(ValueError, match="num_batches"):
        ImportanceConfig(num_batches=0)


def _names(model, pattern):
    return {n for n, _ in model.named_parameters() if re.fullmatch(pattern, n)}


def test_gps_trains_biases_layer_scale_and_head_but_not_norms_or_embeddings():
    vit = create_backbone(BackboneSpec("test_vit", None, {"img_size": 32, "init_values": 1e-5}), 3)
    want = (_names(vit, r"patch_embed\.proj\.bias|blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])\.bias")
            | _names(vit, r"blocks\.\d+\.ls[12]\.gamma") | {"head.weight", "head.bias"})
    assert len(_names(vit, r"blocks\.\d+\.ls[12]\.gamma")) > 0
    assert set(gps_trainable_extras(vit)) == want

    swin = tiny_model("swin")
    want = (_names(swin, r"patch_embed\.proj\.bias|layers\.\d+\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])\.bias")
            | _names(swin, r"layers\.\d+\.blocks\.\d+\.attn\.relative_position_bias_table") | {"head.fc.weight", "head.fc.bias"})
    assert set(gps_trainable_extras(swin)) == want and not any("norm" in n for n in want)

    convnext = tiny_model("convnext")
    # stem.1 and downsample.0 are LayerNorm2d (no "norm" in their names); head.norm is a norm too
    want = (_names(convnext, r"stem\.0\.bias|stages\.\d+\.downsample\.1\.bias")
            | _names(convnext, r"stages\.\d+\.blocks\.\d+\.(gamma|conv_dw\.bias|mlp\.fc[12]\.bias)")
            | {"head.fc.weight", "head.fc.bias"})
    assert set(gps_trainable_extras(convnext)) == want
    assert not {"stem.1.weight", "stem.1.bias", "head.norm.weight"} & set(gps_trainable_extras(convnext))


# ---------------------------------------------------------------- seeds


def _plain_batches():
    g = torch.Generator().manual_seed(4)
    return [(torch.randn(8, 3, 32, 32, generator=g), torch.arange(8) % 3) for _ in range(3)]


def _same(a, b):
    return all(torch.equal(a.scores[n], b.scores[n]) for n in a.scores) and \
        (a.head is None) == (b.head is None) and all(torch.equal(a.head[n], b.head[n]) for n in (a.head or {}))


def _mask_lists(imap, density=0.02):
    return {n: v.tolist() for n, v in select_mask(imap.scores, density, "per_tensor").items()}


def test_seed_draws_the_warm_head_and_a_fixed_seed_reproduces_the_map_bit_for_bit():
    model = tiny_model("vit")
    batches = _plain_batches()
    cfg = ImportanceConfig(num_batches=3, head_warmup="linear_probe", head_warmup_steps=20)
    rng_before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    a = compute_importance(model, batches, cfg, num_classes=3, seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before[0]) and random.getstate() == rng_before[1]
    assert np.array_equal(np.random.get_state()[1], rng_before[2])  # the caller's RNGs are left alone
    again = compute_importance(model, batches, cfg, num_classes=3, seed=0)
    other = compute_importance(model, batches, cfg, num_classes=3, seed=1)
    assert _same(a, again) and a.metadata["seed"] == "0"
    assert not torch.equal(a.head["head.weight"], other.head["head.weight"])
    assert _mask_lists(a) != _mask_lists(other)
    # the hybrid masks of two seeds differ too (same agnostic map)
    agn = compute_importance(model, batches[::-1], cfg, num_classes=3, seed=7)
    m0, m1 = (hybrid_mask(x, agn, 0.5, 0.02, "per_tensor", "union") for x in (a, other))
    assert {n: v.tolist() for n, v in m0.items()} != {n: v.tolist() for n, v in m1.items()}


@pytest.fixture(scope="module")
def synthetic_task(tmp_path_factory):
    from tasks.synthetic import task_family, write_task

    task = task_family(1, image_size=32, images_per_task=60, seed=5)[0]
    return write_task(str(tmp_path_factory.mktemp("task")), task, "medmnist")


def _loader(spec, transform, batch_size=8):
    from tasks.loaders import build_loader

    return build_loader(spec, "train", transform=transform, batch_size=batch_size, shuffle=True, seed=0)


def test_seed_draws_the_importance_batches_from_a_task_loader(synthetic_task):
    from tasks.transforms import transform_for

    model = tiny_model("vit", synthetic_task.num_classes)
    tf = transform_for(model, train=False)
    # ridge is closed-form: the head's initialisation cannot matter, only which images are drawn
    cfg = ImportanceConfig(num_batches=2, head_warmup="ridge")
    # fresh loaders, each at its first epoch: only the seed can tell the three passes apart
    a, b, again = (compute_importance(model, _loader(synthetic_task, tf), cfg, num_classes=synthetic_task.num_classes,
                                      seed=s) for s in (0, 1, 0))
    assert _same(a, again)
    assert _mask_lists(a) != _mask_lists(b)
    used = compute_importance(model, _loader(synthetic_task, tf), cfg, num_classes=synthetic_task.num_classes)
    assert used.metadata["seed"] == "" and _same(used, compute_importance(
        model, _loader(synthetic_task, tf), cfg, num_classes=synthetic_task.num_classes))


def test_gps_views_and_seeds_on_a_task_loader(synthetic_task):
    from tasks.transforms import gps_views

    model = tiny_model("vit", synthetic_task.num_classes)
    loader = _loader(synthetic_task, gps_views(model))
    x, y = next(iter(loader))
    assert isinstance(x, list) and len(x) == 2 and x[0].shape == x[1].shape == (8, 3, 32, 32)
    assert not torch.equal(x[0], x[1])
    cfg = gps_importance_config()
    k = synthetic_task.num_classes
    a = compute_importance(model, loader, cfg, num_classes=k, seed=0)
    again = compute_importance(model, _loader(synthetic_task, gps_views(model)), cfg, num_classes=k, seed=0)
    b = compute_importance(model, loader, cfg, num_classes=k, seed=1)
    assert a.metadata["batches"] == str(len(loader)) and a.metadata["views"] == "2"
    assert _same(a, again)
    gps = {n: v.tolist() for n, v in select_mask(a.scores, 0.02, "per_row").items()}
    assert gps != {n: v.tolist() for n, v in select_mask(b.scores, 0.02, "per_row").items()}
