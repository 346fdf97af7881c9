"""Experiment tracking from the driver: one ``Tracker`` fed by the progress events, writing a run per
job, task and sweep trial to each configured backend.

``tracker`` (the Tracker, ``make_tracker``, ``check_tracking`` and the backend registry), ``base`` (the
``TrackingBackend`` interface), one module per backend (``mlflow_backend``, ``tensorboard_backend``,
``wandb_backend``), ``uris`` (where a section makes a backend write)."""
