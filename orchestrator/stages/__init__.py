"""The stages of a job, each a function of the job's plans: importance maps (per dataset, then
task-agnostic, cached by content), training (every task at once), sweeps (Optuna + ASHA per task in one
Tune run), one run inside one process (``task_run``), and the evaluation of a saved artifact."""

# What a process that trains and evaluates runs imports once when it starts (a warm pool actor's preload,
# ``runtime.worker_pool``): torch, timm, the loaders, and the first evaluation's scikit-learn (~1 s).
RUN_IMPORTS = ("torch", "timm", "sklearn.metrics", "tasks.loaders", "tasks.transforms",
               "orchestrator.stages.task_run", "orchestrator.stages.evaluation")
