"""The stages of a job, each a function of the job's plans: importance maps (per dataset, then
task-agnostic, cached by content), training (every task at once), sweeps (Optuna + ASHA per task in one
Tune run), one run inside one process (``task_run``), and the evaluation of a saved artifact."""
