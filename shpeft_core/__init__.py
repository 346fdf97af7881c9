"""shpeft_core: hybrid importance, sparse-delta training and the task delta format (torch + timm).

Names are imported on first use (PEP 562), so `import shpeft_core.options` or a command's --help
does not pay for torch and timm.
"""

from __future__ import annotations

from ._lazy import lazy_exports

_EXPORTS = {
    "backbone": ["BackboneSpec", "create_backbone", "backbone_fingerprint", "head_parameter_names"],
    "delta": ["FORMAT_VERSION", "DeltaError", "TaskDelta", "DeltaHandle", "extract_delta", "save_delta", "validate_delta",
              "load_delta", "apply_delta", "merge_delta", "create_model_for_delta"],
    "eligibility": ["DEFAULT_RULES", "eligible_parameters"],
    "importance": ["ImportanceConfig", "ImportanceMap", "compute_importance", "combine_importance",
                   "magnitude_importance"],
    "options": ["ESTIMATORS", "MIXES", "GRANULARITIES"],
    "selection": ["Mask", "hybrid_scores", "hybrid_mask", "select_mask", "mask_size"],
    "sparse": ["apply_sparse_training", "trainable_parameters", "count_trainable"],
    "train": ["TrainConfig", "TrainState", "fit", "evaluate", "save_train_state", "load_train_state"],
    "methods": ["Method", "register_method", "get_method", "method_names", "prepare_model", "method_mask",
                "save_artifact", "load_artifact"],
    "metrics": ["class_metrics"],
    "mixed": ["MixedTaskModel"],
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
