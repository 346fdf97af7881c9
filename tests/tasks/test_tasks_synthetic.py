import numpy as np
from sklearn.linear_model import LogisticRegression

from tasks.loaders import build_dataset
from tasks.synthetic import MODALITIES, SOURCE_CUES, TARGET_CUES, render_image, render_task, task_family, write_source_corpus, write_task_family
from tasks.check import check_dataset


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


def test_family_overrides_class_count_imbalance_and_cue():
    base = task_family(3, seed=0)
    t = task_family(3, seed=0, num_classes=4, max_imbalance=1.5, cue_strength=2.0, lesion_size=1.4)
    assert [x.num_classes for x in t] == [4, 4, 4] and all(1.0 <= x.imbalance <= 1.5 for x in t)
    assert [x.cue for x in t] == [x.cue for x in base] and [x.modality for x in t] == [x.modality for x in base]
    assert all(x.cue_strength == 2.0 and x.lesion_size == 1.4 for x in t)
    # a stronger, larger cue changes the image; the shared anatomy and noise draws stay the same
    plain = task_family(3, seed=0, num_classes=4)[0]
    a, b = render_image(plain, 1, 5).astype(float), render_image(t[0], 1, 5).astype(float)
    assert np.abs(a - b).mean() > 1.0
    try:
        task_family(1, num_classes=7)
    except ValueError as e:
        assert "num_classes=7" in str(e)
    else:
        raise AssertionError("7 shape classes accepted")


def test_texture_classes_are_spread_beyond_crop_rescaling():
    """Adjacent texture classes differ in frequency by more than the x1.29 a random resized crop
    (scale 0.6) can rescale an image, so training augmentation cannot turn one class into another."""
    from tasks.synthetic import _cue_map, _grid

    s = 64
    x, y = _grid(s)
    peaks = []
    for label in range(4):
        m = _cue_map("texture", label, 4, np.random.default_rng(label), x, y, s, (0.5, 0.5, 0.4, 0.4, 0.0), 2.0)
        spec = np.abs(np.fft.fft2(m))
        spec[0, 0] = 0
        fy, fx = np.unravel_index(np.argmax(spec), spec.shape)
        fy, fx = min(fy, s - fy), min(fx, s - fx)
        peaks.append(np.hypot(fx, fy))
    ratios = np.array(peaks[1:]) / np.array(peaks[:-1])
    assert (ratios > 1.4).all(), peaks


def test_demo_source_corpus_has_every_cue_family(tmp_path):
    src = write_source_corpus(str(tmp_path), num_images=40, cue_strength=1.5, lesion_size=1.4)
    assert src.num_classes == 20 and {n.split("-")[0] for n in src.class_names} == set(SOURCE_CUES)
    ds = build_dataset(src, "train", None)
    assert ds.images.shape[1:] == (32, 32, 3)
