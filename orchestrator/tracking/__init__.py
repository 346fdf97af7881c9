"""Experiment tracking from the driver: one ``Tracker`` fed by the progress events, writing a run per
job, task and sweep trial to each configured backend (MLflow, TensorBoard, W&B)."""
