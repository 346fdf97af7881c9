"""Where tracking writes: the MLflow tracking URI and the TensorBoard folder a job section resolves to.

Invariants: relative paths resolve against the working directory, as a relative store does, so the URI
logged and the one `shpeft validate` checked are the same absolute one; nothing is contacted or created
here; a location that cannot be used (a default under a remote store, a remote TensorBoard folder) is a
ValueError naming it.
"""

from __future__ import annotations

import os

from shpeft_core.io import local_path

from orchestrator.store import layout

__all__ = ["local_or_none", "resolve_mlflow_uri", "mlflow_local_dir", "tensorboard_root"]


def local_or_none(uri: str) -> str | None:
    """The local path of a store or folder URI, None for a remote one (without needing its fsspec backend)."""
    if "://" in uri and not uri.startswith(("file://", "local://")):
        return None
    return local_path(uri)


def resolve_mlflow_uri(uri: str | None, store: str) -> str:
    """The tracking URI with local paths made absolute (against the working directory, as the store is).

    None means $MLFLOW_TRACKING_URI, else ``file:<store>/mlruns`` (a local store only).
    """
    if uri is None:
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            root = local_or_none(store)
            if root is None:
                raise ValueError(f"the store {store} is not a local folder; set tracking.mlflow.uri")
            return "file:" + layout.mlflow_default_dir(root)
    if ":" not in uri or (len(uri) > 1 and uri[1] == ":"):  # a bare path (or a Windows drive)
        return "file:" + os.path.abspath(os.path.expanduser(uri))
    scheme, rest = uri.split(":", 1)
    if scheme == "file":
        path = rest[2:] if rest.startswith("//") else rest
        return "file:" + os.path.abspath(os.path.expanduser(path or "."))
    if scheme == "sqlite" and rest.startswith("///") and not rest.startswith("////"):
        return "sqlite:///" + os.path.abspath(os.path.expanduser(rest[3:]))
    return uri


def mlflow_local_dir(uri: str) -> str | None:
    """The local folder a file: or sqlite: tracking URI writes to (None for servers)."""
    if uri.startswith("file:"):
        return uri[len("file:"):]
    if uri.startswith("sqlite:///"):
        return os.path.dirname(uri[len("sqlite:///"):]) or "."
    return None


def tensorboard_root(directory: str | None, store: str, job_id: str) -> str:
    """The job's TensorBoard folder: ``<dir>/<job_id>`` (dir relative to the working directory) or
    ``<store>/tensorboard/<job_id>``; a local folder (event files are written by the driver)."""
    if directory is None:
        root = local_or_none(store)
        if root is None:
            raise ValueError(f"the store {store} is not a local folder; set tracking.tensorboard.dir")
        return layout.tensorboard_dir(root, job_id)
    if "://" in directory and local_or_none(directory) is None:
        raise ValueError(f"{directory} is not a local folder")
    return os.path.join(os.path.abspath(os.path.expanduser(local_or_none(directory) or directory)), job_id)
