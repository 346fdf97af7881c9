"""What every fine-tuning method declares: the one interface the rest of shpeft asks about a method.

A method is a subclass of :class:`Method` registered under its name (``shpeft_core.methods``). Everything
the pipeline, the sweeps, the comparison, the reports, the store and serving need to know about a method is
an attribute or a method here; nothing outside ``shpeft_core/methods/`` tests a method's name.

Importing a method module must stay cheap (no torch at module level): the job file's schema and the CLI's
help read the registry.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = ["Method", "MethodError", "SearchDimension"]


class MethodError(ValueError):
    """A method name or setting that cannot be used, or a method definition that is incomplete."""


# One dimension a sweep (or the comparison's tuning) may search: (scale, low, high), scale "log" or "linear".
SearchDimension = tuple[str, float, float]


class Method:
    """A fine-tuning method. Subclasses set the class attributes and override the hooks they need.

    Attributes:
        name: the method's name in job files, ``--methods`` and every result row.
        help: one line for the CLI and the job file's schema.
        artifact: the kind of artifact it writes (``shpeft_core.artifacts.KINDS``: delta, checkpoint, lora).
        default_lr: learning rate of its trained entries when the job sets none.
        uses_mask: whether it trains a mask over the eligible weights (its artifact is a task delta with
            values; ``density`` is its budget).
        takes_alpha: whether the job's ``selection.alpha`` is what it uses (the hybrid); see ``alpha``.
        takes_mix: whether it takes a hybrid rule (``shpeft:rank_sum`` in ``--methods``).
        own_budget: whether its trainable count is its own (LoRA's rank, every bias, every weight) rather
            than the job's density: reports label it as such.
        settings_section: the attribute of the job's ``method`` section holding its own settings
            (``lora``), or None.
        revision: raised when what the method trains for the same settings changes, so artifacts of the
            earlier behaviour are not reused (it enters a run's config hash once above 0).
        own_importance: settings of the task map it ranks by when they are not the job's (``importance``
            section), e.g. GPS's own pass; the importance stage computes that map beside the job's and keys
            it apart. Its warm head still comes from the job's map, as every method's does.
        on_alpha_axis: whether its results lie on the hybrid's alpha axis (the hybrid and its two ends).
        head_only: whether it trains the head alone: its learning rate is then the head's (a report's
            floor for recovery fractions).
        trains_all: whether it trains every weight (full fine-tuning: a report's ceiling).
    """

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    artifact: ClassVar[str] = "delta"
    default_lr: ClassVar[float] = 1e-2
    uses_mask: ClassVar[bool] = False
    takes_alpha: ClassVar[bool] = False
    takes_mix: ClassVar[bool] = False
    own_budget: ClassVar[bool] = True
    settings_section: ClassVar[str | None] = None
    revision: ClassVar[int] = 0
    own_importance: ClassVar[dict[str, Any] | None] = None
    on_alpha_axis: ClassVar[bool] = False
    head_only: ClassVar[bool] = False
    trains_all: ClassVar[bool] = False

    # ------------------------------------------------------------------ importance and selection

    # Whether it ranks weights by the task's importance map (a method that does not still starts from the
    # warm head that map carries, like every method).
    uses_importance: ClassVar[bool] = False

    def importance_estimator(self, job_estimator: str) -> str:
        """The estimator of the task map it ranks by. Most methods take the job's (``importance.estimator``)."""
        return (self.own_importance or {}).get("estimator", job_estimator)

    def importance_variant(self, job_estimator: str) -> str:
        """The name of the task map it ranks by: the job's estimator, or its own pass's name ("gps")."""
        own = self.own_importance or {}
        return own.get("name") or own.get("estimator") or job_estimator

    def importance_settings(self, job_settings: dict[str, Any]) -> dict[str, Any]:
        """The settings of the task map it ranks by: the job's, with ``own_importance`` over them."""
        own = {k: v for k, v in (self.own_importance or {}).items() if k != "name"}
        return {**job_settings, **own}

    def alpha(self, job_alpha: float) -> float:
        """The hybrid weight it really uses (1 = task-specific only, 0 = task-agnostic only)."""
        return float(job_alpha)

    def needs_agnostic(self, job_alpha: float) -> bool:
        """Whether it needs the task-agnostic map at this alpha."""
        return False

    def granularity(self, job_granularity: str) -> str:
        """Where its top-k is taken (global, per_tensor, per_row)."""
        return job_granularity

    def mask(self, model, *, specific, agnostic, density: float, alpha: float, granularity: str, mix: str,
             seed: int, rules=None, equal_budget: bool = False):
        """The mask it trains (a ``shpeft_core.selection.Mask``), or None when it trains no mask.
        ``equal_budget``: select the job's k even where its own rule would take another count (per row)."""
        return None

    def dense_extras(self, model) -> list[str]:
        """Whole parameters it trains besides its mask and the head (GPS: biases, layer-scale gammas); a
        task delta stores them as dense tensors. Named on the plain timm model."""
        return []

    # ------------------------------------------------------------------ training and artifacts

    def prepare(self, model, *, mask=None, settings: dict[str, Any] | None = None):
        """Make exactly its parameters trainable; returns (model to pass to ``fit``, save handle or None)."""
        raise NotImplementedError(f"method {self.name!r} does not define prepare()")

    def settings(self, method_section) -> dict[str, Any] | None:
        """Its own settings from the job's ``method`` section, as JSON (part of the run's identity)."""
        if self.settings_section is None:
            return None
        return getattr(method_section, self.settings_section).model_dump(mode="json")

    # ------------------------------------------------------------------ sweeps and reports

    def search_space(self, *, density_range, alpha_range) -> dict[str, SearchDimension]:
        """What a sweep may search for it besides the learning rate: density for a mask, alpha for a hybrid."""
        space: dict[str, SearchDimension] = {}
        if self.uses_mask:
            space["density"] = ("log", *density_range)
        if self.takes_alpha:
            space["alpha"] = ("linear", *alpha_range)
        return space

    def tuning_space(self) -> dict[str, list[Any]]:
        """What a comparison may tune for it besides the learning rate, as the values to try (a small grid
        on validation): alpha for the hybrid, the rank for LoRA. Empty for most methods."""
        return {}

    def budget_label(self, *, density: float, granularity: str, equal_budget: bool,
                     settings: dict[str, Any] | None = None) -> str:
        """What its trainable count is, for reports: the job's density, or a budget of its own."""
        if self.uses_mask:
            return f"density {density:g} ({granularity})"
        return "own: " + self.help

    def label(self, mix: str | None = None) -> str:
        """Its name in tables and plots (a hybrid: with its rule)."""
        return f"{self.name} ({mix})" if self.takes_mix and mix else self.name

    def __repr__(self) -> str:
        return f"<method {self.name}>"
