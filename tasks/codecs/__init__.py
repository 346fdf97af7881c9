"""Bytes to images: ``images`` (Pillow formats, arrays to RGB) and ``dicom`` (pydicom decoding and
windowing). The dataset formats in ``tasks.formats`` decode through these."""
