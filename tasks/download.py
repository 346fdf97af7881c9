"""MedMNIST .npz files: where the official file lives, and fetching it when a network exists."""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Callable

from shpeft_core import io as sio

from tasks.codecs.images import DatasetError

__all__ = ["MEDMNIST_URL", "MEDMNIST_SIZES", "medmnist_filename", "medmnist_url", "is_offline", "fetch_medmnist"]

MEDMNIST_URL = "https://zenodo.org/records/10519652/files/{filename}"
MEDMNIST_SIZES = (28, 64, 128, 224)


def medmnist_filename(name: str, size: int | None) -> str:
    """Official file name: ``pathmnist.npz`` at 28 px, ``pathmnist_64.npz`` at 64 px, etc."""
    if size is not None and size not in MEDMNIST_SIZES:
        raise DatasetError(f"image_size={size}: MedMNIST files exist at {MEDMNIST_SIZES} px")
    return f"{name}.npz" if size in (None, 28) else f"{name}_{size}.npz"


def medmnist_url(name: str, size: int | None) -> str:
    return MEDMNIST_URL.format(filename=medmnist_filename(name, size))


def is_offline() -> bool:
    """True when the environment says not to use the network (SHPEFT_OFFLINE or HF_HUB_OFFLINE)."""
    for var in ("SHPEFT_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    return False


def _urlopen_bytes(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as r:  # noqa: S310 - fixed https URL
        return r.read()


def fetch_medmnist(
    name: str,
    size: int | None,
    dest_uri: str,
    *,
    download: Callable[[str], bytes] | None = None,
) -> str:
    """Put the official ``{name}{_size}.npz`` at ``dest_uri`` (atomic); returns its sha256.

    Offline (SHPEFT_OFFLINE=1 or HF_HUB_OFFLINE=1) this fails at once, saying which file to put where.
    ``download`` (url -> bytes) replaces the HTTP client, e.g. for a mirror.
    """
    url = medmnist_url(name, size)
    if download is None and is_offline():
        raise DatasetError(
            f"{dest_uri}: MedMNIST file missing and the network is off (SHPEFT_OFFLINE/HF_HUB_OFFLINE). "
            f"Download {url} elsewhere and put it at {dest_uri}"
        )
    try:
        data = (download or _urlopen_bytes)(url)
    except Exception as e:  # any transport failure becomes one actionable message
        raise DatasetError(
            f"{dest_uri}: could not download {url} ({type(e).__name__}: {e}); put that file there by hand"
        ) from None
    if not data.startswith(b"PK"):
        raise DatasetError(f"{url}: the download is not an .npz (zip) archive; nothing was written to {dest_uri}")
    return sio.atomic_write_bytes(dest_uri, data)
