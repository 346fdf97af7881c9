"""GPS (gradient-based parameter selection): per output neuron, the inputs whose weights the task's loss
moves most (|sum of gradients|), plus the head. Its ranking is the task's own ``grad1`` map."""

from __future__ import annotations

from . import register_method
from .base import MethodError
from .sparse import MaskMethod


@register_method
class GPS(MaskMethod):
    name = "gps"
    help = "per-row top entries of the task's |sum of gradients| (GPS)"
    uses_importance = True

    def importance_estimator(self, job_estimator: str) -> str:
        return "grad1"

    def alpha(self, job_alpha: float) -> float:
        return 1.0

    def granularity(self, job_granularity: str) -> str:
        return "per_row"

    def mask(self, model, *, specific, agnostic, density, alpha, granularity, mix, seed, rules=None):
        from ..selection import hybrid_mask

        if specific is None:
            raise MethodError("gps needs the task's importance map")
        return hybrid_mask(specific, None, 1.0, density, "per_row")
