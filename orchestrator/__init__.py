"""orchestrator: shpeft on Ray, from a job file to deltas, reports and served predictions.

Each folder has one role; its ``__init__`` says what belongs there:

- ``job/``: the job file (schema, errors), content keys, each run's frozen plan, pre-compute checks.
- ``store/``: the store's layout (every path), the results catalogue, evaluation files.
- ``runtime/``: Ray itself: sessions, cluster sizing, the warm worker pool, progress, console, task logs,
  the Jobs API for submitting to a cluster.
- ``stages/``: the work of a job: importance maps, training, sweeps, one run in one process, evaluation.
- ``workflows/``: what a command runs end to end (``run``, ``compare``, ``demo``), stage after stage.
- ``reporting/``: tables, plots and the job and comparison reports.
- ``tracking/``: experiment tracking backends (MLflow, TensorBoard, W&B) fed from the driver.
- ``serving/``: using finished deltas: predict, batch predict on Ray Data, Ray Serve, export.
- ``cli/``: the ``shpeft`` command line: parse, call one function, print, exit.
"""
