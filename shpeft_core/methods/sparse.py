"""Methods that train a mask over the eligible weights (plus the head) and write a task delta.

| method   | mask                                                                  |
|----------|-----------------------------------------------------------------------|
| shpeft   | the hybrid: top-`density` of alpha x task-specific + (1 - alpha) x task-agnostic (rule `mix`) |
| specific | the same at alpha = 1 (the task's own importance only)                |
| agnostic | the same at alpha = 0 (the importance pooled over other datasets)     |
| random   | a seeded uniform random mask of the same size                         |

Values are trained in place of the selected entries (``shpeft_core.sparse``); the frozen entries cannot
move, whatever the optimiser does.
"""

from __future__ import annotations

from typing import Any

from . import register_method
from .base import Method, MethodError


class MaskMethod(Method):
    """A method whose trainable set is a mask over the eligible weights; its budget is the job's density."""

    artifact = "delta"
    uses_mask = True
    own_budget = False

    def prepare(self, model, *, mask=None, settings: dict[str, Any] | None = None):
        from ..sparse import apply_sparse_training

        if mask is None:
            raise MethodError(f"{self.name} needs a mask")
        return apply_sparse_training(model, mask), None


@register_method
class Hybrid(MaskMethod):
    name = "shpeft"
    help = "hybrid sparse: the task's own importance mixed with the task-agnostic one (alpha, rule)"
    uses_importance = True
    takes_alpha = True
    takes_mix = True
    on_alpha_axis = True

    def tuning_space(self) -> dict[str, list]:
        return {"alpha": [0.25, 0.5, 0.75]} if self.takes_alpha else {}

    def needs_agnostic(self, job_alpha: float) -> bool:
        return self.alpha(job_alpha) < 1.0

    def mask(self, model, *, specific, agnostic, density, alpha, granularity, mix, seed, rules=None,
             equal_budget=False):
        from ..selection import hybrid_mask

        a = self.alpha(alpha)
        if a > 0 and specific is None:
            raise MethodError(f"{self.name} needs the task's importance map")
        if a < 1 and agnostic is None:
            raise MethodError(f"{self.name} at alpha {a:g} needs the task-agnostic importance map")
        return hybrid_mask(specific if a > 0 else None, agnostic if a < 1 else None, a, density, granularity, mix,
                           equal_budget=equal_budget)


@register_method
class Specific(Hybrid):
    name = "specific"
    help = "the hybrid at alpha = 1: the task's own importance only"
    takes_alpha = False
    takes_mix = False

    def alpha(self, job_alpha: float) -> float:
        return 1.0


@register_method
class Agnostic(Hybrid):
    name = "agnostic"
    help = "the hybrid at alpha = 0: the importance pooled over other datasets only"
    takes_alpha = False
    takes_mix = False

    def alpha(self, job_alpha: float) -> float:
        return 0.0


@register_method
class RandomMask(MaskMethod):
    name = "random"
    help = "a seeded uniform random mask of the same size"
    revision = 1  # 1: the job's granularity (it was always global), so its budget per tensor matches the others'

    def mask(self, model, *, specific, agnostic, density, alpha, granularity, mix, seed, rules=None,
             equal_budget=False):
        from ..backbone import unwrap
        from ..eligibility import eligible_parameters
        from ..selection import random_mask

        params = eligible_parameters(unwrap(model), rules)
        if not params:
            raise MethodError("random mask: the model has no eligible weights")
        return random_mask({n: p.shape for n, p in params.items()}, density, seed, granularity,
                           equal_budget=equal_budget)
