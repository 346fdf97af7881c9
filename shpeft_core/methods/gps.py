"""GPS (gradient-based parameter selection, Zhang et al., CVPR 2024), as the reference trains it.

- Its own importance pass (``gps_importance_config``): |sum of gradients| of the head-free supervised-
  contrastive loss on two augmented views (``tasks.transforms.gps_views``), over one whole pass of the
  training split. It is computed beside the job's own map and keyed apart from it (``own_importance``).
- Selection: per output row, the top K = max(1, round(density * row length)) entries (its own budget,
  ``selection.per_row_budget``), or the job's k under ``equal_budget``.
- Besides the selected entries it trains, in full, what the reference trains in full
  (``gps_trainable_extras``): every bias outside normalisation layers and the layer-scale gammas,
  plus the head. Its task delta stores them as dense tensors beside the sparse values.

Importing this module stays cheap: torch is imported inside the functions.
"""

from __future__ import annotations

from typing import Any

from . import register_method
from .base import MethodError
from .sparse import MaskMethod

__all__ = ["GPS", "gps_importance_config", "gps_trainable_extras", "GPS_IMPORTANCE"]

# The settings of GPS's own importance pass, as the importance stage takes them (``views: gps`` draws the
# two augmented views of ``tasks.transforms.gps_views``; ``batches: None`` is one whole pass).
GPS_IMPORTANCE = {"name": "gps", "estimator": "grad1", "batches": None, "loss": "supcon", "head_warmup": "none", "views": "gps"}


def gps_importance_config(rules: tuple[str, ...] | None = None):
    """GPS's importance pass: |sum of gradients| of the head-free supervised-contrastive loss over two
    augmented views, accumulated over one whole pass of the training split (temperature 0.07)."""
    from ..importance import ImportanceConfig

    return ImportanceConfig(estimator="grad1", num_batches=None, head_warmup="none", loss="supcon",
                            supcon_temperature=0.07, rules=rules)


# Reference: github.com/FightingFighting/GPS, utils/pruning.py (prune_by_percentile_gradient_perCell)
# and utils/cuda.py (NativeScaler.maks_gradient, which zeroes the gradient where the mask is 1): a
# parameter whose name contains "norm", "pos_embed" or "cls_token" is frozen; one whose name contains
# "head", "bias" or "gamma" (layer scale) is trained in full; every other weight trains its per-row
# top-K entries only (K = times_para = 1 in the released scripts), with Adam and weight decay 0.
# train_gps.py (calculate_gradient) sums the batches' gradients in train mode with drop-path 0 and no
# dropout in the scripts, i.e. the same network as the eval mode used here for LayerNorm backbones.
def gps_trainable_extras(model) -> list[str]:
    """Names of the parameters GPS trains in full besides the selected weight entries: the classifier,
    every bias outside normalisation layers (Swin's relative-position bias tables included), and
    layer-scale gammas (``eligibility.dense_eligible_parameters``). Normalisation layers (by type, as
    timm's LayerNorm2d has no "norm" in its name, or by name as in the reference), position embeddings
    and class/distillation tokens stay frozen.

    Call it on the plain timm model (before sparse training replaces modules). The selected weights
    are the per-row top-K of ``eligible_parameters``: on ViT/DeiT the same weights the reference ranks;
    on Swin and ConvNeXt the reference also ranks the patch-merging / downsampling and depthwise
    weights, which the project's sparse modules do not hold.
    """
    from ..backbone import head_parameter_names, unwrap
    from ..eligibility import dense_eligible_parameters

    m = unwrap(model)
    keep = set(head_parameter_names(m)) | set(dense_eligible_parameters(m))
    return [name for name, _ in m.named_parameters() if name in keep]


@register_method
class GPS(MaskMethod):
    name = "gps"
    help = "GPS: per-row top entries of its own |sum of gradients| (supervised-contrastive, two views), biases + head"
    uses_importance = True
    own_importance = GPS_IMPORTANCE
    # 1: its own importance pass (supervised-contrastive, two views, one whole pass) and the biases and
    # layer-scale gammas trained beside the selected entries, as the reference does
    revision = 1

    def alpha(self, job_alpha: float) -> float:
        return 1.0

    def granularity(self, job_granularity: str) -> str:
        return "per_row"

    def mask(self, model, *, specific, agnostic, density, alpha, granularity, mix, seed, rules=None,
             equal_budget=False):
        from ..selection import hybrid_mask

        if specific is None:
            raise MethodError("gps needs its importance map")
        return hybrid_mask(specific, None, 1.0, density, "per_row", equal_budget=equal_budget)

    def dense_extras(self, model) -> list[str]:
        from ..backbone import head_parameter_names, unwrap

        heads = set(head_parameter_names(unwrap(model)))
        return [n for n in gps_trainable_extras(model) if n not in heads]

    def prepare(self, model, *, mask=None, settings: dict[str, Any] | None = None):
        from ..backbone import unwrap
        from ..sparse import apply_sparse_training

        if mask is None:
            raise MethodError("gps needs a mask")
        extras = self.dense_extras(model)  # named on the plain model; sparse modules keep the names
        net = apply_sparse_training(model, mask)
        params = dict(unwrap(net).named_parameters())
        for n in extras:
            params[n].requires_grad_(True)
        # their values before training: the delta's base fingerprint is taken with them
        return net, {"dense": {n: params[n].detach().cpu().clone() for n in extras}}

    def budget_label(self, *, density: float, granularity: str, equal_budget: bool, settings=None) -> str:
        if equal_budget:
            return f"density {density:g}, the same k as the other masks (per row) + {self.extras_label}"
        return f"own: per-row K = max(1, round({density:g} x row length)) + {self.extras_label}"

    extras_label = "biases and layer-scale gammas"
