"""A job's fingerprints: files hashed in Ray tasks on the cluster (in order, in chunks), digests kept in the
store's data cache, so a second launch reads no data bytes."""

import hashlib

import pytest

ray = pytest.importorskip("ray")

import orchestrator.stages.fingerprints as fingerprints  # noqa: E402
import tasks.digests as digests  # noqa: E402
from orchestrator.store import layout  # noqa: E402

pytestmark = pytest.mark.ray


def test_chunks_keep_order_and_stay_under_the_limit():
    items = [(f"f{i}", n) for i, n in enumerate([5, 5, 5, 12, 1, 1])]
    chunks = fingerprints._chunks(items, 10)
    assert chunks == [[0, 1], [2], [3], [4, 5]]  # a file larger than the limit is a chunk of its own


def test_files_are_hashed_in_ray_tasks_and_a_second_launch_reads_nothing(ray_local, tmp_path, monkeypatch):
    from tasks.synthetic import write_colour_task

    files = []
    for i in range(7):
        p = tmp_path / f"{i}.bin"
        p.write_bytes(bytes([i]) * (1000 + i))
        files.append((str(p), p.stat().st_size))
    monkeypatch.setattr(fingerprints, "LOCAL_BYTES", 0)  # every amount goes to the cluster
    monkeypatch.setattr(fingerprints, "CHUNK_BYTES", 2500)
    got = fingerprints.hash_on_cluster(files)
    assert got == [hashlib.sha256(open(p, "rb").read()).hexdigest() for p, _ in files]

    store = str(tmp_path / "store")
    spec = write_colour_task(str(tmp_path / "data"), "colour", 0, n_train=12, n_eval=3)
    first = fingerprints.fingerprint_for_job(spec, store)
    assert any((tmp_path / "store" / "data-cache" / "digests").iterdir())
    digests._MEMORY.clear()  # a new driver: only the store's digest record is left

    def no_reads(*_):
        raise AssertionError("a data file was read")

    monkeypatch.setattr(fingerprints, "_hash_chunk", no_reads)
    monkeypatch.setattr(digests, "hash_file", no_reads)
    assert fingerprints.fingerprint_for_job(spec, store) == first
    assert layout.data_cache(store).endswith("data-cache")
