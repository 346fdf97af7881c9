"""Folders of DICOM files, laid out as an image folder; pixels through the modality LUT and VOI window.

pydicom is imported only when a file is decoded or written (``pip install 'shpeft[dicom]'``).
"""

from __future__ import annotations

from shpeft_core import io as sio

from tasks.codecs.dicom import decode_dicom, dicom_bytes, is_dicom_bytes
from tasks.codecs.images import DICOM_EXTENSIONS
from ..spec import TaskSpec
from .base import SplitArrays
from .files import ext
from .imagefolder import ImageFolderFormat

__all__ = ["DicomFormat", "FORMAT", "DICOM_MODALITY"]

# modality words used for tasks -> DICOM Modality (0008,0060) codes; anything else is OT (other)
DICOM_MODALITY = {"ct": "CT", "pathology": "SM", "ultrasound": "US", "fundus": "OP", "mri": "MR", "xray": "DX"}


class DicomFormat(ImageFolderFormat):
    name = "dicom"
    hint_rank = 2
    keeps_splits = False  # written as <root>/<class>/file: the loader's seeded split applies
    kind = "DICOM (.dcm/.dicom or extensionless with a DICM preamble)"

    def claims_extension(self, ext: str) -> bool:
        return ext in DICOM_EXTENSIONS

    def accepts(self, fs, path: str) -> bool:
        if ext(path) in DICOM_EXTENSIONS:
            return True
        if ext(path) != "":
            return False
        with fs.open(path, "rb") as f:
            return is_dicom_bytes(f.read(132))

    def decode(self, data: bytes, path: str, spec: TaskSpec):
        return decode_dicom(data, path, spec.window)

    def fingerprint_fields(self, spec: TaskSpec) -> dict:
        return {**super().fingerprint_fields(spec), "window": list(spec.window) if spec.window else None}

    def write(self, dest: str, data: SplitArrays, *, class_names: list[str], modality: str, name: str) -> str:
        # No split folders: the loader's seeded split is exercised on this format.
        i = 0
        for split, (imgs, labels) in data.items():
            for img, lab in zip(imgs, labels):
                sio.atomic_write_bytes(
                    sio.join_uri(dest, class_names[lab], f"{i:05d}.dcm"),
                    dicom_bytes(img, modality=DICOM_MODALITY.get(modality, "OT"), uid_seed=f"{name}/{i}"),
                )
                i += 1
        return dest


FORMAT = DicomFormat()
