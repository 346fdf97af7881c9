"""The job file's schema: one YAML document describing a backbone, a store, many tasks and how to tune them.

Validated with pydantic before anything runs (``orchestrator.job.load`` reads and validates a file). Every
section forbids unknown keys; any problem is reported as one `JobSpecError` whose message names the
field path and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    WithJsonSchema,
    field_validator,
    model_serializer,
    model_validator,
)

from shpeft_core.methods import default_lrs, get_method, method_names, methods_help
from shpeft_core.methods.lora import LORA_TARGETS
from shpeft_core.options import (AGNOSTIC_SOURCES, ESTIMATORS, GRANULARITIES, HEAD_INITS, HEAD_WARMUPS, HELP, LOSSES,
                                 MIXES, NORMALIZATIONS, REDUCES)
from tasks.spec import TaskSpec

__all__ = [
    "JobSpecError",
    "BackboneSection",
    "CatalogueTaskRef",
    "ImportanceSection",
    "SelectionSection",
    "TrainingSection",
    "AshaSection",
    "LoraSection",
    "MethodSection",
    "SweepSection",
    "MlflowSection",
    "TensorboardSection",
    "WandbSection",
    "TrackingSection",
    "JobSpec",
    "resolve_task",
    "task_name",
    "canonical_json",
    "content_hash",
]



class JobSpecError(ValueError):
    """A job file that cannot run; the message names the field path and the allowed values."""


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no whitespace) for content hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def content_hash(obj: Any, length: int = 16) -> str:
    """Short sha256 hex of the canonical JSON of ``obj``."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def _known_method(name: str) -> str:
    from shpeft_core.methods import MethodError

    try:
        get_method(name)
    except MethodError:
        raise ValueError(f"{name!r} is not a method; allowed: {list(method_names())}") from None
    return name


# A method's name: checked against the method registry (built-ins and plug-ins), listed in the schema.
MethodName = Annotated[str, AfterValidator(_known_method),
                       WithJsonSchema({"type": "string", "enum": list(method_names())})]


# Marks a field added after jobs were first written: at its default it is left out of the section's
# serialised form, so jobs written before it keep their id (and their finished artifacts).
ADDED_LATER = {"omit_at_default": True}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    @model_serializer(mode="wrap")
    def _serialise(self, handler):
        out = handler(self)
        if isinstance(out, dict):
            for name, field in type(self).model_fields.items():
                extra = field.json_schema_extra
                if (isinstance(extra, dict) and extra.get("omit_at_default") and name in out
                        and getattr(self, name) == field.get_default(call_default_factory=True)):
                    del out[name]
        return out


class BackboneSection(_Section):
    name: str = Field(description="timm model name, e.g. vit_base_patch16_224 or test_vit.", min_length=1)
    source: str | None = Field(
        default=None,
        description="Where the weights come from: 'hub' (timm pretrained from the HF hub), a local file "
        "or any fsspec URI of a .safetensors/.pth/.bin file; null = random init (tests only).",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Extra timm.create_model keyword arguments (e.g. img_size)."
    )


class CatalogueTaskRef(_Section):
    catalogue: str = Field(description="Name of a dataset in the built-in catalogue (`shpeft tasks list`).")
    source: str = Field(description="Local path or fsspec URI of your copy of that dataset.", min_length=1)
    name: str | None = Field(default=None, description="Task name in outputs; defaults to the catalogue name.")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="TaskSpec fields to override (e.g. metric, image_size, format)."
    )


def _task_entry_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "catalogue" if "catalogue" in value else "inline"
    return "catalogue" if isinstance(value, CatalogueTaskRef) else "inline"


TaskEntry = Annotated[
    Union[Annotated[CatalogueTaskRef, Tag("catalogue")], Annotated[TaskSpec, Tag("inline")]],
    Discriminator(_task_entry_kind),
]


class ImportanceSection(_Section):
    estimator: Literal[ESTIMATORS] = Field(default="grad2", description=HELP["estimator"])
    batches: int = Field(default=16, ge=1, description="Batches of gradients accumulated per dataset.")
    batch_size: int | None = Field(
        default=None, ge=1, description="Batch size for importance; defaults to training.batch_size."
    )
    loss: Literal[LOSSES] = Field(default="ce", description=HELP["loss"])
    head_warmup: Literal[HEAD_WARMUPS] = Field(default="linear_probe", description=HELP["head_warmup"])
    agnostic: Literal[AGNOSTIC_SOURCES] = Field(default="auto", description=HELP["agnostic"],
                                                json_schema_extra=ADDED_LATER)
    pool: list[str] | None = Field(
        default=None,
        description="Names of the datasets forming the shared task-agnostic pool (target tasks and/or "
        "pool_datasets); null = every target task plus every pool dataset.",
    )
    include_target: bool = Field(
        default=False,
        description="Let a task's own map into its task-agnostic map; false = leave-one-out (the pool without "
        "the task), so alpha measures how task-specific a selection really is.",
    )
    pool_datasets: list[TaskEntry] = Field(
        default_factory=list,
        description="Extra datasets used only for the task-agnostic pool (never fine-tuned).",
    )
    normalization: Literal[NORMALIZATIONS] = Field(default="rank", description=HELP["normalization"])
    reduce: Literal[REDUCES] = Field(default="mean", description=HELP["reduce"])
    magnitude_blend: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Weight of pre-trained |w| blended into the agnostic map."
    )
    use_gpu: bool | None = Field(
        default=None, description="Compute importance on a GPU; defaults to training.use_gpu."
    )


class SelectionSection(_Section):
    density: float = Field(
        default=1e-4, gt=0.0, le=1.0, description="Fraction of eligible weights trained, in (0, 1]."
    )
    alpha: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="Hybrid weight in [0, 1]: 1 = task-specific only, 0 = task-agnostic only.",
    )
    mix: Literal[MIXES] = Field(default="union", description=HELP["mix"])
    granularity: Literal[GRANULARITIES] = Field(default="global", description=HELP["granularity"])
    rules: list[str] | None = Field(
        default=None,
        description="Eligible weights: regexes full-matched against module paths of Linear/Conv2d layers "
        "(null = the built-in ViT/Swin/ConvNeXt rules: qkv, proj, fc1, fc2, patch embedding).",
    )

    @field_validator("rules")
    @classmethod
    def _regexes(cls, v: list[str] | None) -> list[str] | None:
        import re

        for r in v or []:
            try:
                re.compile(r)
            except re.error as exc:
                raise ValueError(f"rule {r!r} is not a regular expression: {exc}") from None
        if v is not None and not v:
            raise ValueError("rules must hold at least one regex (or be null for the built-in rules)")
        return v


class LoraSection(_Section):
    rank: int = Field(default=8, ge=1, description="LoRA rank r.")
    alpha: float = Field(default=16.0, gt=0.0, description="LoRA scaling alpha (peft lora_alpha).")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="LoRA dropout.")
    targets: str = Field(
        default=LORA_TARGETS, description="Regex of module paths that get adapters (peft target_modules)."
    )


class MethodSection(_Section):
    name: MethodName = Field(default="shpeft", description=f"How each task is fine-tuned: {methods_help()}.")
    per_task: dict[str, MethodName] = Field(
        default_factory=dict, description="Method overrides by task name."
    )
    lr: dict[MethodName, float] = Field(
        default_factory=dict,
        description="Learning rate per method, e.g. {full: 2.0e-3, shpeft: 3.0e-2}; wins over training.lr and "
        "each method's default (its default_lr in shpeft_core.methods).",
    )

    @field_validator("lr")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {m: x for m, x in v.items() if not x > 0}
        if bad:
            raise ValueError(f"learning rates must be > 0, got {bad}")
        return v
    lora: LoraSection = Field(default_factory=LoraSection, description="Settings of the lora method.")

    def for_task(self, task: str) -> str:
        return self.per_task.get(task, self.name)


# Marks a field that changes where or how fast a run happens, never its result: left out of the config
# hash (orchestrator.job.keys), so changing it keeps a task's finished artifact.
RESOURCE_ONLY = {"affects_results": False}


def affects_results(section: type[BaseModel], name: str) -> bool:
    extra = section.model_fields[name].json_schema_extra
    return not (isinstance(extra, dict) and extra.get("affects_results") is False)


class TrainingSection(_Section):
    epochs: int = Field(default=10, ge=1, description="Training epochs per task.")
    batch_size: int = Field(default=32, ge=1, description="Per-worker batch size.")
    lr: float | None = Field(
        default=None, gt=0.0,
        description="Learning rate of the trained backbone entries for every method (method.lr sets it per "
        f"method); null = each method's default {default_lrs()}.")
    head_lr: float | None = Field(default=None, gt=0.0, description="Learning rate of the head; defaults to lr.")
    weight_decay: float = Field(default=0.0, ge=0.0, description="AdamW weight decay.")
    warmup_epochs: int = Field(default=1, ge=0, description="Linear warm-up epochs before cosine decay.")
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0, description="Cross-entropy label smoothing.")
    head_init: Literal[HEAD_INITS] = Field(default="warm", description=HELP["head_init"])
    seed: int = Field(default=0, ge=0, description="Seed for data order and initialisation.")
    workers_per_task: int = Field(default=1, ge=1, description="Data-parallel Ray Train workers per task.")
    use_gpu: bool = Field(default=False, description="Train (and compute importance) on GPUs.",
                          json_schema_extra=RESOURCE_ONLY)
    cpus_per_worker: float = Field(default=1.0, gt=0.0, description="CPUs reserved per training worker.",
                                   json_schema_extra=RESOURCE_ONLY)
    gpus_per_worker: float = Field(
        default=0.0, ge=0.0, description="GPUs reserved per worker (fractions share a GPU); 1 when use_gpu and 0.",
        json_schema_extra=RESOURCE_ONLY)
    data_workers: int = Field(default=0, ge=0, description="DataLoader worker processes per training worker.",
                              json_schema_extra=RESOURCE_ONLY)
    max_concurrent_tasks: int | None = Field(
        default=None, ge=1, description="Most tasks training at once; null = as many as the cluster's CPUs/GPUs hold.",
        json_schema_extra=RESOURCE_ONLY)
    max_failures: int = Field(
        default=2, ge=0, description="Worker failures a task's trainer survives (resuming from its last checkpoint).",
        json_schema_extra=RESOURCE_ONLY)

    @model_validator(mode="after")
    def _gpu_consistency(self) -> "TrainingSection":
        if self.gpus_per_worker > 0 and not self.use_gpu:
            raise ValueError("gpus_per_worker > 0 needs use_gpu: true")
        return self


class AshaSection(_Section):
    grace_period: int = Field(default=1, ge=1, description="Epochs every trial runs before it can be stopped.")
    reduction_factor: float = Field(default=2.0, gt=1.0, description="ASHA's halving rate (> 1).")
    brackets: int = Field(default=1, ge=1, description="Number of ASHA brackets.")


def _check_range(value: tuple[float, float], lo: float, hi: float, lo_open: bool) -> tuple[float, float]:
    a, b = value
    if not (a <= b):
        raise ValueError(f"range must be [low, high] with low <= high, got [{a}, {b}]")
    left = "(" if lo_open else "["
    for v in (a, b):
        if (v <= lo if lo_open else v < lo) or v > hi or math.isnan(v):
            raise ValueError(f"range values must lie in {left}{lo}, {hi}], got [{a}, {b}]")
    return value


class SweepSection(_Section):
    enabled: bool = Field(default=False, description="Tune density and alpha per task with Optuna TPE + ASHA.")
    trials_per_task: int = Field(default=8, ge=1, description="Trials per task.")
    density_range: tuple[float, float] = Field(
        default=(1e-4, 1e-2), description="[low, high] in (0, 1], sampled log-uniformly."
    )
    alpha_range: tuple[float, float] = Field(default=(0.0, 1.0), description="[low, high] in [0, 1], uniform.")
    lr_range: tuple[float, float] | None = Field(
        default=None, description="[low, high] learning rate, sampled log-uniformly; null = training.lr fixed."
    )
    epochs: int | None = Field(default=None, ge=1, description="Epochs per trial (ASHA max_t); defaults to training.epochs.")
    max_concurrent_trials: int | None = Field(
        default=None, ge=1, description="Most trials at once; null = as many as the cluster holds."
    )
    asha: AshaSection = Field(default_factory=AshaSection, description="ASHA early-stopping settings.")
    seed: int = Field(default=0, ge=0, description="Seed of the TPE sampler.")

    @field_validator("density_range")
    @classmethod
    def _density(cls, v: tuple[float, float]) -> tuple[float, float]:
        return _check_range(v, 0.0, 1.0, lo_open=True)

    @field_validator("lr_range")
    @classmethod
    def _lr(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        return None if v is None else _check_range(v, 0.0, 10.0, lo_open=True)

    @field_validator("alpha_range")
    @classmethod
    def _alpha(cls, v: tuple[float, float]) -> tuple[float, float]:
        return _check_range(v, 0.0, 1.0, lo_open=False)


# URI schemes MLflow can track to; a typo ("fil:", "htp://") fails at load instead of mid-job.
MLFLOW_SCHEMES = ("file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


class MlflowSection(_Section):
    uri: str | None = Field(
        default=None,
        description="Tracking URI: file:/abs/mlruns (a local folder; works offline), sqlite:///mlflow.db, "
        "http(s)://server, databricks. Relative paths resolve against the working directory, as the store does. "
        "null = $MLFLOW_TRACKING_URI, else file:<store>/mlruns.",
    )
    experiment: str = Field(default="shpeft", min_length=1, description="MLflow experiment the job's runs go to.")

    @field_validator("uri")
    @classmethod
    def _scheme(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = v.strip()
        if not v:
            raise ValueError("uri must not be empty (null = the default)")
        scheme = v.split(":", 1)[0].split("+", 1)[0].lower() if ":" in v else "file"
        if scheme not in MLFLOW_SCHEMES or (scheme in ("http", "https") and "://" not in v):
            raise ValueError(f"uri {v!r}: scheme {scheme!r} is not one MLflow tracks to; allowed: "
                             f"{list(MLFLOW_SCHEMES)} (e.g. file:/abs/mlruns, http://host:5000)")
        return v


class TensorboardSection(_Section):
    dir: str | None = Field(
        default=None,
        description="Local folder for event files, one folder per task and trial under <dir>/<job_id>/; "
        "relative to the working directory; null = <store>/tensorboard.",
    )


class WandbSection(_Section):
    project: str = Field(min_length=1, description="Weights & Biases project (needs the wandb package).")
    entity: str | None = Field(default=None, description="W&B entity (team or user); null = your default.")
    mode: Literal["online", "offline"] = Field(default="online", description="offline = write locally, sync later.")


class TrackingSection(_Section):
    mlflow: MlflowSection | None = Field(
        default=None, description="Log to MLflow: one parent run per job, a nested run per task and sweep trial."
    )
    tensorboard: TensorboardSection | None = Field(
        default=None, description="Write TensorBoard event files per task and sweep trial ({} = defaults)."
    )
    wandb: WandbSection | None = Field(default=None, description="Log to Weights & Biases, one run per task and trial.")
    artifacts: Literal["all", "tasks", "none"] = Field(
        default="all",
        description="Artifacts uploaded to MLflow/W&B: all = every task's and trial's delta/lora/checkpoint and "
        "the job's plots; tasks = not the trials'; none = params and metrics only.",
    )

    @property
    def enabled(self) -> bool:
        return any(x is not None for x in (self.mlflow, self.tensorboard, self.wandb))


class JobSpec(_Section):
    backbone: BackboneSection = Field(description="The shared pre-trained backbone.")
    store: str = Field(
        description="fsspec URI or absolute/relative local folder where every output is written.", min_length=1
    )
    tasks: list[TaskEntry] = Field(min_length=1, description="Target tasks: inline task specs or catalogue references.")
    importance: ImportanceSection = Field(default_factory=ImportanceSection, description="Importance estimation.")
    method: MethodSection = Field(default_factory=MethodSection, description="Fine-tuning method (shpeft or a baseline).")
    selection: SelectionSection = Field(default_factory=SelectionSection, description="Hybrid weight selection.")
    training: TrainingSection = Field(default_factory=TrainingSection, description="Per-task fine-tuning.")
    sweep: SweepSection = Field(default_factory=SweepSection, description="Optional density/alpha sweep.")
    tracking: TrackingSection = Field(
        default_factory=TrackingSection, description="Experiment tracking (MLflow, TensorBoard, W&B); off by default."
    )

    @model_validator(mode="after")
    def _names(self) -> "JobSpec":
        targets = [task_name(t) for t in self.tasks]
        dupes = sorted({n for n in targets if targets.count(n) > 1})
        if dupes:
            raise ValueError(f"task names must be unique, duplicated: {dupes}")
        pool_names = [task_name(t) for t in self.importance.pool_datasets]
        clash = sorted(set(pool_names) & set(targets)) + sorted({n for n in pool_names if pool_names.count(n) > 1})
        if clash:
            raise ValueError(f"importance.pool_datasets names must be unique and differ from task names: {clash}")
        unknown_tasks = sorted(set(self.method.per_task) - set(targets))
        if unknown_tasks:
            raise ValueError(f"method.per_task names {unknown_tasks} are not tasks of this job; tasks: {targets}")
        if self.importance.pool is not None:
            known = set(targets) | set(pool_names)
            unknown = [n for n in self.importance.pool if n not in known]
            if unknown:
                raise ValueError(
                    f"importance.pool names {unknown} are unknown; allowed: {sorted(known)}"
                )
        return self


def resolve_task(entry):
    """A job's task entry as a TaskSpec: inline specs as they are, catalogue names via tasks.catalogue."""
    if not isinstance(entry, CatalogueTaskRef):
        return entry
    from tasks.catalogue import CATALOGUE

    if entry.catalogue not in CATALOGUE:
        raise ValueError(
            f"tasks: catalogue name {entry.catalogue!r} is unknown; see `shpeft tasks list` (known: {sorted(CATALOGUE)})"
        )
    return CATALOGUE[entry.catalogue].to_spec(entry.source, name=entry.name or entry.catalogue, **entry.overrides)


def task_name(entry: CatalogueTaskRef | TaskSpec) -> str:
    if isinstance(entry, CatalogueTaskRef):
        return entry.name or entry.catalogue
    return entry.name
