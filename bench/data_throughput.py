"""Images per second through each task loader vs decoding the same files in a bare loop.

For every format (npz, imagefolder, parquet, dicom) a synthetic task is written, then measured:
  bare    - a plain Python loop: read bytes, decode with Pillow/pydicom (npz: index the array), to tensor
  loader  - build_loader(..., num_workers=0) and (..., num_workers=W)
and, as the yardstick, one ViT training step (forward + backward) on the same batch size. Ratios are
loader / bare and loader / ViT step; a ratio above 1 against the ViT means the loader keeps up.

    python bench/data_throughput.py [--smoke-test] [--images N] [--workers W]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import numpy as np
import torch

from tasks.codecs.dicom import decode_dicom
from tasks.codecs.images import array_to_rgb, decode_image
from tasks.loaders import build_dataset, build_loader
from tasks.synthetic import SyntheticTask, write_task
from tasks.transforms import transform_for


def _to_tensor(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)


def bare_loop(spec) -> tuple[int, float]:
    """Decode every training image of ``spec`` once, the simplest way, without the loader."""
    t0 = time.perf_counter()
    n = 0
    if spec.format == "medmnist":
        d = np.load(spec.source)
        for img in d["train_images"]:
            _to_tensor(array_to_rgb(img, "bare"))
            n += 1
    elif spec.format in ("imagefolder", "dicom"):
        ds = build_dataset(spec, "train", None)  # only for the file list
        t0 = time.perf_counter()
        for path, _ in ds.items:
            with open(path, "rb") as f:
                data = f.read()
            img = decode_dicom(data, path) if spec.format == "dicom" else decode_image(data, path)
            _to_tensor(img)
            n += 1
    else:
        import pyarrow.parquet as pq

        for name in sorted(os.listdir(spec.source)):
            table = pq.read_table(os.path.join(spec.source, name), columns=["image", "split"])
            for data, split in zip(table.column("image").to_pylist(), table.column("split").to_pylist()):
                if split == "train":
                    _to_tensor(decode_image(data, "bare"))
                    n += 1
    return n, time.perf_counter() - t0


def loader_rate(spec, *, workers: int, batch_size: int, transform=None, epochs: int = 1) -> tuple[int, float]:
    loader = build_loader(spec, "train", transform=transform, batch_size=batch_size, shuffle=True, num_workers=workers)
    t0 = time.perf_counter()
    n = 0
    for _ in range(epochs):
        for x, _ in loader:
            n += len(x)
    return n, time.perf_counter() - t0


def vit_step_rate(model_name: str, img_size: int, batch_size: int, steps: int) -> float:
    import timm

    model = timm.create_model(model_name, pretrained=False, num_classes=5, img_size=img_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch_size, 3, img_size, img_size)
    y = torch.randint(0, 5, (batch_size,))
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()  # first step warms up allocators
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return batch_size * steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke-test", action="store_true", help="tiny sizes, finishes in seconds")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--model", default="vit_tiny_patch16_224", help="timm model for the ViT-step yardstick")
    p.add_argument("--model-size", type=int, default=224)
    args = p.parse_args()
    if args.smoke_test:
        args.images, args.model, args.model_size = 120, "test_vit", 32
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, torch threads {torch.get_num_threads()}, "
          f"python {platform.python_version()}, torch {torch.__version__}")
    print(f"images {args.images} at {args.image_size} px, batch {args.batch_size}, workers {args.workers}")

    vit = vit_step_rate(args.model, args.model_size, min(args.batch_size, 32), 2 if args.smoke_test else 5)
    print(f"ViT step ({args.model} at {args.model_size} px, fwd+bwd+AdamW): {vit:,.0f} img/s")

    rows = []
    with tempfile.TemporaryDirectory() as root:
        for i, fmt in enumerate(("medmnist", "imagefolder", "parquet", "dicom")):
            task = SyntheticTask(f"bench-{fmt}", "shape", "ct" if i % 2 == 0 else "pathology", 4, 2.0,
                                 args.images, args.image_size, 100 + i)
            spec = write_task(root, task, fmt)
            n_b, t_b = bare_loop(spec)
            bare = n_b / t_b
            n0, t0 = loader_rate(spec, workers=0, batch_size=args.batch_size)
            nw, tw = loader_rate(spec, workers=args.workers, batch_size=args.batch_size, epochs=2)
            tf = transform_for({"input_size": (3, args.model_size, args.model_size)}, train=True)
            nr, tr = loader_rate(spec, workers=args.workers, batch_size=args.batch_size, transform=tf)
            rows.append((fmt, task.modality, bare, n0 / t0, nw / tw, nr / tr))
    print()
    header = f"{'format':<12}{'bare img/s':>12}{'loader w=0':>12}{'ratio':>7}{f'loader w={args.workers}':>12}{'ratio':>7}" \
             f"{f'+resize {args.model_size}':>14}{'vs ViT':>8}"
    print(header)
    print("-" * len(header))
    for fmt, _mod, bare, l0, lw, lr in rows:
        print(f"{fmt:<12}{bare:>12,.0f}{l0:>12,.0f}{l0 / bare:>7.2f}{lw:>12,.0f}{lw / bare:>7.2f}{lr:>14,.0f}{lr / vit:>8.1f}")
    print("\nratio = loader / bare loop (same run); vs ViT = loader with the backbone's transform / ViT step rate")


if __name__ == "__main__":
    main()
