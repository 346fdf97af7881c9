"""shpeft_core: hybrid importance, sparse-delta training and the task delta format (torch + timm)."""

from .backbone import BackboneSpec, backbone_fingerprint, create_backbone, head_parameter_names
from .delta import (
    FORMAT_VERSION,
    DeltaError,
    DeltaHandle,
    TaskDelta,
    apply_delta,
    create_model_for_delta,
    extract_delta,
    load_delta,
    merge_delta,
    save_delta,
)
from .eligibility import DEFAULT_RULES, eligible_parameters
from .importance import ESTIMATORS, ImportanceConfig, ImportanceMap, combine_importance, compute_importance
from .selection import Mask, hybrid_scores, mask_size, select_mask
from .sparse import apply_sparse_training, count_trainable, trainable_parameters
from .train import TrainConfig, TrainState, evaluate, fit, load_train_state, save_train_state

__all__ = [
    "BackboneSpec", "create_backbone", "backbone_fingerprint", "head_parameter_names",
    "DEFAULT_RULES", "eligible_parameters",
    "ESTIMATORS", "ImportanceConfig", "ImportanceMap", "compute_importance", "combine_importance",
    "Mask", "hybrid_scores", "select_mask", "mask_size",
    "apply_sparse_training", "trainable_parameters", "count_trainable",
    "TrainConfig", "TrainState", "fit", "evaluate", "save_train_state", "load_train_state",
    "FORMAT_VERSION", "DeltaError", "TaskDelta", "DeltaHandle", "extract_delta", "save_delta",
    "load_delta", "apply_delta", "merge_delta", "create_model_for_delta",
]
