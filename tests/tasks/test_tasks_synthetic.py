import numpy as np
from sklearn.linear_model import LogisticRegression

from tasks.data import build_dataset, check_dataset
from tasks.synthetic import MODALITIES, SOURCE_CUES, TARGET_CUES, render_image, render_task, task_family, write_source_corpus, write_task_family


def test_family_is_deterministic_and_varied():
    a, b = task_family(6, seed=0), task_family(6, seed=0)
    assert a == b
    assert {t.cue for t in a} == set(TARGET_CUES) and {t.modality for t in a} == set(MODALITIES)
    assert len({t.num_classes for t in a}) > 1 and max(t.imbalance for t in a) > 1.5
    t = a[1]
    assert np.array_equal(render_image(t, 1, 7), render_image(t, 1, 7))
    assert not np.array_equal(render_image(t, 1, 7), render_image(t, 1, 8))
    assert render_image(a[1], 0, 0).shape == (32, 32, 3) and render_image(a[0], 0, 0).shape == (32, 32)


def test_class_imbalance_follows_the_ratio():
    t = task_family(1, images_per_task=200, seed=3)[0]
    labels = np.concatenate([render_task(t)[s][1] for s in ("train", "val", "test")])
    counts = np.bincount(labels, minlength=t.num_classes)
    assert counts.sum() == 200 and counts[0] >= counts[-1]
    assert abs(counts[0] / counts[-1] - t.imbalance) < 0.6


def test_targets_are_learnable_but_not_trivial_for_a_linear_probe():
    """A linear probe on random ReLU features stays far from perfect on every task, while simple
    sign-free lesion evidence (|x - mean image|) already decodes the location task well above chance."""
    for t in task_family(3, images_per_task=240, seed=0):
        d = render_task(t)
        (xtr, ytr), (xte, yte) = d["train"], d["test"]
        flat = lambda x: x.reshape(len(x), -1) / 255.0  # noqa: E731
        w = np.random.default_rng(0).normal(size=(flat(xtr).shape[1], 256)) / 30
        feats = lambda x: np.maximum(flat(x) @ w, 0)  # noqa: E731
        acc = (LogisticRegression(max_iter=500).fit(feats(xtr), ytr).predict(feats(xte)) == yte).mean()
        assert acc < 0.9, (t.name, acc)
        if t.cue == "location":
            mu = flat(xtr).mean(0)
            dev = lambda x: np.abs(flat(x) - mu)  # noqa: E731
            acc_dev = (LogisticRegression(max_iter=500).fit(dev(xtr), ytr).predict(dev(xte)) == yte).mean()
            majority = np.bincount(yte).max() / len(yte)
            assert acc_dev > majority + 0.3, (acc_dev, majority)


def test_source_corpus_is_disjoint_from_targets(tmp_path):
    src = write_source_corpus(str(tmp_path), num_images=96)
    assert src.num_classes == 4 * len(SOURCE_CUES) and not set(TARGET_CUES) & set(SOURCE_CUES)
    assert all(not any(c in name for c in TARGET_CUES) for name in src.class_names)
    r = check_dataset(src, fingerprint=False)
    assert r.total == 96 and sum(r.counts["train"]) == 77
    targets = write_task_family(str(tmp_path), n_tasks=2, images_per_task=40, formats=("medmnist",))
    src_imgs = {np.asarray(build_dataset(src, "train", None).images[i]).tobytes() for i in range(10)}
    for spec in targets:
        ds = build_dataset(spec, "train", None)
        tgt = {np.repeat(ds.images[i][..., None], 3, -1).tobytes() if ds.images.ndim == 3 else ds.images[i].tobytes() for i in range(len(ds))}
        assert not src_imgs & tgt
    # reuse: an existing complete task is not rewritten
    again = write_source_corpus(str(tmp_path), num_images=96)
    assert again == src
