"""What a command runs from start to finish: ``run`` (a job: pre-flight, stages, catalogue, report),
``compare`` (every method on the same tasks and seeds, its learning rate chosen on validation first:
``compare_tuning``, ``compare_runs``; and its report) and ``demo`` (synthetic data, a
job and a comparison). A workflow orders stages; the work itself is in ``stages``."""
