"""Memory, speed and fingerprint cost of reading a dataset as it grows: N and 3N training images.

A synthetic 224 px RGB dataset is written at N and 3N training images (plus small val / test splits) as a
MedMNIST-style compressed .npz and as a label table (CSV + PNG files). For each format and size a fresh
process (a "rank") builds the training loader and reads the whole split once, as one epoch does; it
reports its peak private memory (RssAnon from /proc/self/status, sampled every few milliseconds:
file-backed pages in the page cache, which every rank shares and the kernel can drop, do not count) and
the loader's images per second. rss_growth_mb is that peak at 3N minus the peak at N: what one rank
holds in proportion to the data. The baseline, measured the same way in the same run, is the split held
in memory as the .npz loader did before (np.load of the split).

The .npz is prepared once (decompressed into the data cache) by a first process, as the first rank of
the first job does; prepare_s is that time. Fingerprints: fingerprint_first_s in a fresh process with an
empty digest cache (every file hashed; the files are in the page cache, having just been written),
fingerprint_second_s in another fresh process with the digest cache the first one wrote.

    python bench/data_scale.py [--images N] [--smoke-test] [--workdir DIR]

The last line is one JSON object: {"formats": {NAME: {"rss_growth_mb", "images_per_s", "fingerprint_first_s",
"fingerprint_second_s", ...}}, "baseline": {...}}. Goals: rss_growth_mb < 100 for every format,
fingerprint_second_s < 1.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- data


def _images(n: int, size: int, seed: int):
    """n RGB images with smooth structure and mild noise (they compress like photographs, not like noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(n):
        a, b, c = rng.uniform(0.5, 3.0, 3)
        base = 0.5 + 0.25 * np.sin(a * 6.28 * x + b) * np.cos(c * 6.28 * y)
        img = np.stack([base, base * rng.uniform(0.6, 1.0), 1 - base], -1) * 220
        img += rng.normal(0, 6, img.shape)
        yield np.clip(img, 0, 255).astype(np.uint8)


def write_npz(path: str, n_train: int, n_eval: int, size: int) -> None:
    arrays = {}
    for split, n, seed in (("train", n_train, 0), ("val", n_eval, 1), ("test", n_eval, 2)):
        arrays[f"{split}_images"] = np.stack(list(_images(n, size, seed)))
        arrays[f"{split}_labels"] = (np.arange(n) % 4).reshape(-1, 1).astype(np.uint8)
    np.savez_compressed(path, **arrays)  # as the MedMNIST files are


def write_table(folder: str, n_train: int, n_eval: int, size: int) -> None:
    from PIL import Image

    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    with open(os.path.join(folder, "labels.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split", "patient"])
        for split, n, seed in (("train", n_train, 0), ("val", n_eval, 1), ("test", n_eval, 2)):
            for i, img in enumerate(_images(n, size, seed)):
                rel = f"images/{split}-{i:06d}.png"
                Image.fromarray(img).save(os.path.join(folder, rel), compress_level=1)
                w.writerow([rel, i % 4, split, f"{split}-{i // 2}"])


def spec_json(fmt: str, where: str, size: int) -> str:
    from tasks.spec import TaskSpec

    if fmt == "table":
        spec = TaskSpec(name="scale-table", source=where, format="table", num_classes=4, image_size=size,
                        table={"files": "labels.csv", "group_column": "patient"})
    else:
        spec = TaskSpec(name="scale-npz", source=where, format="medmnist", num_classes=4, image_size=size)
    return spec.model_dump_json()


# ---------------------------------------------------------------- measured in a child process


def _rss_anon_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


class _Peak:
    """Samples RssAnon every 2 ms in a thread; ``peak`` is the largest value seen."""

    def __init__(self):
        self.peak = _rss_anon_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_anon_mb())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_anon_mb())
        return self.peak


def measure_epoch(mode: str, spec_text: str, cache: str, batch_size: int) -> dict:
    import torch

    from tasks.codecs.images import array_to_rgb
    from tasks.loaders import build_loader
    from tasks.spec import TaskSpec
    from tasks.transforms import default_transform

    torch.set_num_threads(1)
    spec = TaskSpec.model_validate_json(spec_text)
    transform = default_transform(spec)
    import pyarrow.csv  # noqa: F401  (imports are not the data's cost: a training process has them already)
    import shpeft_core.train  # noqa: F401  (the loader's epoch seeding imports it)

    start = _rss_anon_mb()
    sampler = _Peak()
    t0 = time.perf_counter()
    n = 0
    if mode == "npz_in_memory":  # the split held in memory, as the .npz loader did before
        images = np.load(spec.source)["train_images"]
        t1 = time.perf_counter()
        for i in range(0, len(images), batch_size):
            torch.stack([transform(array_to_rgb(im, "bench")) for im in images[i:i + batch_size]])
            n += len(images[i:i + batch_size])
    else:
        loader = build_loader(spec, "train", transform=transform, batch_size=batch_size, cache=cache)
        t1 = time.perf_counter()
        for x, _ in loader:
            n += x.shape[0]
    seconds = time.perf_counter() - t1
    peak = sampler.stop()
    return {"images": n, "build_s": t1 - t0, "epoch_s": seconds, "images_per_s": n / seconds,
            "peak_rss_anon_mb": peak, "start_rss_anon_mb": start}


def measure_fingerprint(spec_text: str, cache: str) -> dict:
    from tasks.fingerprint import dataset_fingerprint
    from tasks.spec import TaskSpec

    from tasks.formats import get_format

    spec = TaskSpec.model_validate_json(spec_text)
    get_format(spec.format)  # imports (torch, pyarrow) are the process's, not the fingerprint's cost
    import pyarrow.csv  # noqa: F401

    t0 = time.perf_counter()
    fp = dataset_fingerprint(spec, cache=cache)
    return {"seconds": time.perf_counter() - t0, "fingerprint": fp}


def _child(args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *args], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- driver


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000, help="N: training images of the smaller dataset (>= 2000 "
                   "for the measurement the README quotes); the larger has 3N")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--eval-images", type=int, default=100, help="val and test images each")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--smoke-test", action="store_true", help="N=60 at 64 px: checks the script in seconds")
    p.add_argument("--workdir", default=None, help="where to write the datasets (default: a temporary folder, removed)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        kind, *rest = a.child
        out = (measure_epoch(rest[0], rest[1], rest[2], int(rest[3])) if kind == "epoch"
               else measure_fingerprint(rest[0], rest[1]))
        print(json.dumps(out))
        return
    if a.smoke_test:
        a.images, a.image_size, a.eval_images = 60, 64, 10
    work = a.workdir or tempfile.mkdtemp(prefix="shpeft-data-scale-")
    os.makedirs(work, exist_ok=True)
    sizes = {"N": a.images, "3N": 3 * a.images}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}; {a.image_size} px RGB; N = {a.images}; batch {a.batch_size}; {work}", flush=True)
    try:
        results = run(work, sizes, a)
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results))


def run(work: str, sizes: dict[str, int], a) -> dict:
    per: dict[str, dict[str, dict]] = {"npz": {}, "table": {}, "npz_in_memory": {}}
    fps: dict[str, dict] = {}
    for label, n in sizes.items():
        t0 = time.perf_counter()
        npz = os.path.join(work, f"{label}.npz")
        write_npz(npz, n, a.eval_images, a.image_size)
        table = os.path.join(work, f"{label}-table")
        write_table(table, n, a.eval_images, a.image_size)
        print(f"[{label}] wrote {n} training images as .npz ({os.path.getsize(npz) / 2**20:.0f} MB) and as a label "
              f"table in {time.perf_counter() - t0:.0f}s", flush=True)
        cache = os.path.join(work, f"cache-{label}")
        for fmt, where in (("npz", npz), ("table", table)):
            spec = spec_json(fmt, where, a.image_size)
            if fmt == "npz":  # the first rank of the first job prepares the archive; it is timed, not measured
                t1 = time.perf_counter()
                _child(["epoch", "npz", spec, cache, str(a.batch_size)])
                per[fmt].setdefault(label, {})["prepare_s"] = time.perf_counter() - t1
            got = _child(["epoch", fmt, spec, cache, str(a.batch_size)])
            per[fmt].setdefault(label, {}).update(got)
            if label == "3N":
                digests = os.path.join(work, f"digests-{fmt}")
                first = _child(["fingerprint", spec, digests])
                second = _child(["fingerprint", spec, digests])
                assert first["fingerprint"] == second["fingerprint"]
                fps[fmt] = {"first": first["seconds"], "second": second["seconds"]}
            print(f"[{label}] {fmt:14s} peak RssAnon {got['peak_rss_anon_mb']:7.1f} MB "
                  f"(at start {got['start_rss_anon_mb']:.1f}), {got['images_per_s']:7.1f} images/s "
                  f"(loader built in {got['build_s']:.2f}s)", flush=True)
        got = _child(["epoch", "npz_in_memory", spec_json("npz", npz, a.image_size), cache, str(a.batch_size)])
        per["npz_in_memory"][label] = got
        print(f"[{label}] {'npz_in_memory':14s} peak RssAnon {got['peak_rss_anon_mb']:7.1f} MB "
              f"(at start {got['start_rss_anon_mb']:.1f}), {got['images_per_s']:7.1f} images/s "
              f"(split loaded in {got['build_s']:.2f}s; baseline)", flush=True)

    def summary(fmt: str) -> dict:
        big, small = per[fmt]["3N"], per[fmt]["N"]
        return {"rss_growth_mb": round(big["peak_rss_anon_mb"] - small["peak_rss_anon_mb"], 1),
                "peak_rss_anon_mb_n": round(small["peak_rss_anon_mb"], 1),
                "peak_rss_anon_mb_3n": round(big["peak_rss_anon_mb"], 1),
                "images_per_s": round(big["images_per_s"], 1), "build_s_3n": round(big["build_s"], 2)}

    base = summary("npz_in_memory")
    formats = {}
    for fmt in ("npz", "table"):
        s = summary(fmt)
        s.update(fingerprint_first_s=round(fps[fmt]["first"], 3), fingerprint_second_s=round(fps[fmt]["second"], 3))
        if fmt == "npz":
            s["prepare_s_3n"] = round(per["npz"]["3N"]["prepare_s"], 1)
        formats[fmt] = s
    print(f"\n{'format':15s} {'rss growth N->3N':>17s} {'vs in-memory':>13s} {'images/s':>9s} {'vs in-memory':>13s} "
          f"{'fingerprint 1st':>16s} {'2nd':>7s}")
    for fmt, s in formats.items():
        print(f"{fmt:15s} {s['rss_growth_mb']:14.1f} MB {s['rss_growth_mb'] / base['rss_growth_mb']:12.3f}x "
              f"{s['images_per_s']:9.1f} {s['images_per_s'] / base['images_per_s']:12.2f}x "
              f"{s['fingerprint_first_s']:14.2f} s {s['fingerprint_second_s']:5.2f} s")
    print(f"{'npz_in_memory':15s} {base['rss_growth_mb']:14.1f} MB {1:12.3f}x {base['images_per_s']:9.1f} {1:12.2f}x "
          f"{'(baseline)':>16s}")
    ok = all(s["rss_growth_mb"] < 100 and s["fingerprint_second_s"] < 1 for s in formats.values())
    print(f"goals (rss growth < 100 MB, second fingerprint < 1 s): {'met' if ok else 'NOT met'}")
    return {"formats": formats, "baseline": {"npz_in_memory": base}, "images": sizes, "image_size": a.image_size}


if __name__ == "__main__":
    main()
