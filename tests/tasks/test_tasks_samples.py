from tasks.samples import write_real_sample_task
from tasks.check import check_dataset


def test_real_sample_task_is_tiny_real_and_valid(tmp_path):
    spec = write_real_sample_task(str(tmp_path), patch_size=32, patches_per_class=8)
    assert {"ct", "mr", "xray", "ultrasound", "histology", "fundus"} <= set(spec.class_names)
    r = check_dataset(spec)
    assert r.image_sizes == {"32x32": r.total}
    assert all(n >= 8 for n in (sum(r.counts[s][k] for s in r.counts) for k in range(spec.num_classes)))
    assert r.total < 200 and "TINY" in spec.description
    assert (tmp_path / "real-modality-tiny" / "sources.json").exists()
