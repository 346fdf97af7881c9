"""Dataset fingerprints of a job: file digests kept in the store's data cache, new files hashed on the cluster.

A fingerprint (tasks/fingerprint.py) needs each data file's sha256 (tasks/digests.py). With the store's data cache
(``layout.data_cache``) a digest is computed once per file content: a launch on unchanged data reads
only listings. Files not known there are hashed in Ray tasks spread over the cluster, in chunks of
about ``CHUNK_BYTES``, when there is more than ``LOCAL_BYTES`` to read; a smaller amount is hashed in
threads on the driver, where a Ray task's start-up would cost more than the hashing. The tasks reserve no
CPU: they run while the job's warm workers hold the CPUs and wait for the importance stage.
"""

from __future__ import annotations

from orchestrator.store import layout

__all__ = ["LOCAL_BYTES", "CHUNK_BYTES", "hash_on_cluster", "fingerprint_for_job"]

LOCAL_BYTES = 256 << 20
CHUNK_BYTES = 256 << 20


def _hash_chunk(urls: list[str]) -> list[str]:
    from tasks.digests import hash_file

    return [hash_file(u) for u in urls]


def _chunks(items: list[tuple[str, int]], limit: int) -> list[list[int]]:
    out, cur, size = [], [], 0
    for i, (_, n) in enumerate(items):
        if cur and size + n > limit:
            out.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += n
    return out + ([cur] if cur else [])


def hash_on_cluster(items: list[tuple[str, int]]) -> list[str]:
    """sha256 of each (url, size), in order: Ray tasks over the cluster for large amounts, else local threads."""
    import ray

    from tasks.digests import hash_file

    if sum(n for _, n in items) < LOCAL_BYTES or not ray.is_initialized():
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, min(8, len(items)))) as pool:
            return list(pool.map(hash_file, [u for u, _ in items]))
    remote = ray.remote(num_cpus=0, scheduling_strategy="SPREAD", max_retries=2)(_hash_chunk)
    chunks = _chunks(items, CHUNK_BYTES)
    results = ray.get([remote.remote([items[i][0] for i in chunk]) for chunk in chunks])
    out: list[str] = [""] * len(items)
    for chunk, digests in zip(chunks, results):
        for i, d in zip(chunk, digests):
            out[i] = d
    return out


def fingerprint_for_job(spec, store: str) -> str:
    """The dataset fingerprint of ``spec`` with the store's digest cache and cluster hashing."""
    from tasks.fingerprint import dataset_fingerprint

    return dataset_fingerprint(spec, cache=layout.data_cache(store), hash_files=hash_on_cluster)
