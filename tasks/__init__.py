"""Medical classification tasks: specs, catalogue, loaders for every format, validation, synthetic data.

Names are imported on first use (PEP 562): the spec and catalogue need no torch.
"""

from __future__ import annotations

from shpeft_core._lazy import lazy_exports

_EXPORTS = {
    "catalogue": ["CATALOGUE", "CatalogueEntry"],
    "fingerprint": ["dataset_fingerprint"],
    "formats": ["FORMATS", "get_format"],
    "codecs.images": ["DatasetError"],
    "loaders": ["build_dataset", "build_loader"],
    "spec": ["TaskSpec"],
    "transforms": ["default_transform", "transform_for"],
    "check": ["DatasetReport", "check_dataset"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
