"""Ray Serve: one backbone per replica, any number of task deltas multiplexed by their URI.

A replica builds the backbone once. Each request names its task delta (the delta's URI as the
Serve multiplexed model id, header ``serve_multiplexed_model_id``); the replica loads and verifies
the delta on first use and keeps the most recent ``max_deltas`` of them (a few MB each; never a
copy of the backbone). Requests are batched (``@serve.batch``, which splits a batch by delta); for
each delta's group, under one lock, the delta is applied in place (its values at its indices plus
its head), the group goes through one forward, and the delta is removed bit-exactly.

Routes under the application's prefix: ``POST`` with image bytes (PNG/JPEG/... or DICOM) in the
body returns the task, class index and name and every class's probability (a multi_label task: every
finding's sigmoid probability and the findings present, ``task_kind`` saying which); ``GET .../-/backbone``
returns the base weights' fingerprints (to check that nothing stays applied).

``serve_until_stopped`` is `shpeft serve` from Ray's start to its clean-up: it leaves no embedded Ray
and, on a shared cluster, no application of its own behind, however it ends.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch
from ray import serve
from torch import nn

from orchestrator.serving.predict import (
    PredictError,
    present_findings,
    task_kind,
    task_probabilities,
    backbone_identity,
    check_same_backbone,
    class_names,
    decode_image_bytes,
    load_task_delta,
    task_logits,
    task_name,
)
from shpeft_core.delta import DeltaError, TaskDelta, apply_delta

__all__ = ["APP_NAME", "MODEL_ID_HEADER", "INFO_ROUTE", "ServeError", "DeltaServer", "build_app", "start", "state_sha256",
           "serve_until_stopped"]

MODEL_ID_HEADER = "serve_multiplexed_model_id"
INFO_ROUTE = "/-/backbone"
APP_NAME = "shpeft"


class ServeError(ValueError):
    """A request that cannot be answered; ``status`` is the HTTP code, the message names the delta or body."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class LoadedDelta:
    uri: str
    delta: TaskDelta
    task: str
    class_names: list[str]
    sha256: str


def state_sha256(model: nn.Module) -> str:
    """sha256 over every tensor of the state dict, head included: names, dtypes, shapes, bytes."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _under(uri: str, root: str) -> bool:
    root = root.rstrip("/") + "/"
    return uri.startswith(root) and ".." not in uri[len(root):].split("/")


@serve.deployment(name="shpeft", ray_actor_options={"num_cpus": 1})
class DeltaServer:
    """One backbone, many deltas. ``backbone``: the job file's section (name, source, kwargs)."""

    def __init__(self, backbone: dict[str, Any], *, max_deltas: int = 16, delta_root: str | None = None,
                 device: str = "cpu", max_batch_size: int = 16, batch_wait_s: float = 0.005):
        from shpeft_core.backbone import build_backbone
        from tasks.transforms import transform_for

        self.device = device
        self.delta_root = delta_root
        # The head is the delta's; this one only stands in between requests.
        self.model = build_backbone(backbone, 1).to(device).eval()
        self.base = backbone_identity(self.model)
        self.base_state = state_sha256(self.model)
        self.transform = transform_for(self.model, train=False)  # as in evaluation and `shpeft predict`
        # One lock: a delta is applied to the shared weights only while nothing else reads them.
        self.lock = threading.Lock()

        async def load(uri: str) -> LoadedDelta:
            return await asyncio.to_thread(self._load, uri)

        # Wired here (not as a decorator) so the cache size is a deployment argument.
        self.get_delta = serve.multiplexed(max_num_models_per_replica=max_deltas)(load)
        self._predict_batch.set_max_batch_size(max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(batch_wait_s)
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0}

    def _load(self, uri: str) -> LoadedDelta:
        from shpeft_core.io import StorageError, exists, join_uri, sha256_file

        if self.delta_root and "://" not in uri and not uri.startswith("/"):
            uri = join_uri(self.delta_root, uri)
        if self.delta_root and not _under(uri, self.delta_root):
            raise ServeError(f"delta {uri} is outside the served delta root {self.delta_root}", 403)
        try:
            found = exists(uri)
        except StorageError as exc:
            raise ServeError(str(exc), 422) from None
        if not found:
            raise ServeError(f"delta {uri} not found", 404)
        try:
            delta = load_task_delta(uri)
            check_same_backbone([self.base, delta], ["the served backbone", uri])
            with self.lock:  # refuse now what would fail mid-batch (parameter names, shapes, indices)
                apply_delta(self.model, delta, check_fingerprint=False).remove()
        except (PredictError, DeltaError) as exc:
            raise ServeError(f"delta {uri}: {exc}" if uri not in str(exc) else str(exc), 422) from None
        return LoadedDelta(uri, delta, task_name(delta, uri), class_names(delta), sha256_file(uri))

    def _decode(self, data: bytes) -> torch.Tensor:
        if not data:
            raise ServeError("request body is empty; send the image bytes (PNG, JPEG, DICOM, ...)")
        try:
            return self.transform(decode_image_bytes(data, "request body"))
        except PredictError as exc:
            raise ServeError(str(exc)) from None

    async def predict(self, image: bytes) -> dict:
        """One image's prediction with the delta named by the caller's multiplexed model id."""
        uri = serve.get_multiplexed_model_id()
        if not uri:
            raise ServeError(f"no delta given: pass its URI as the {MODEL_ID_HEADER} header "
                             "(or handle.options(multiplexed_model_id=URI))")
        loaded = await self.get_delta(uri)
        x = await asyncio.to_thread(self._decode, image)
        return await self._predict_batch(loaded, x)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _predict_batch(self, loaded: list[LoadedDelta], images: list[torch.Tensor]) -> list[dict]:
        return await asyncio.to_thread(self._run_groups, loaded, images)

    def _run_groups(self, loaded: list[LoadedDelta], images: list[torch.Tensor]) -> list[dict]:
        # Serve already splits a batch by multiplexed model id and runs the parts concurrently: the
        # lock makes them take turns on the shared weights; grouping here keeps a mixed list correct.
        groups: dict[int, list[int]] = {}
        for i, ld in enumerate(loaded):
            groups.setdefault(id(ld), []).append(i)
        out: list[dict] = [{}] * len(loaded)
        with self.lock:
            st = self.stats
            st["requests"] += len(loaded)
            st["batches"] += 1
            st["largest_batch"] = max(st["largest_batch"], len(loaded))
            for rows in groups.values():
                ld = loaded[rows[0]]
                x = torch.stack([images[i] for i in rows])
                # The fingerprint was checked once at start-up and each delta's at load; removal is
                # bit-exact, so no batch hashes the backbone again.
                (logits,) = task_logits(self.model, [ld.delta], x, batch_size=len(rows), device=self.device,
                                        verified=True)
                probs = task_probabilities(logits, ld.delta)
                kind = task_kind(ld.delta)
                for r, p in zip(rows, probs):
                    out[r] = {"task": ld.task, "delta": ld.uri, "delta_sha256": ld.sha256, "task_kind": kind,
                              "class_names": ld.class_names, "probabilities": p.tolist()}
                    if kind == "multi_label":
                        out[r]["findings"] = present_findings(p.tolist(), ld.class_names)
                    else:
                        k = int(p.argmax())
                        out[r].update(class_index=k, class_name=ld.class_names[k])
        return out

    def info(self) -> dict:
        from shpeft_core.backbone import backbone_fingerprint

        with self.lock:
            fp, state = backbone_fingerprint(self.model), state_sha256(self.model)
        return {"backbone": self.base.metadata["backbone"], "fingerprint": fp,
                "fingerprint_at_start": self.base.metadata["backbone_fingerprint"],
                "state_sha256": state, "state_sha256_at_start": self.base_state,
                "unchanged": fp == self.base.metadata["backbone_fingerprint"] and state == self.base_state,
                **self.stats}

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        if request.method == "GET" and request.url.path.rstrip("/").endswith(INFO_ROUTE):
            return JSONResponse(await asyncio.to_thread(self.info))
        if request.method != "POST":
            return JSONResponse({"error": f"POST image bytes to predict, or GET {INFO_ROUTE}"}, status_code=405)
        try:
            return JSONResponse(await self.predict(await request.body()))
        except ServeError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)


def build_app(backbone: dict[str, Any], *, replicas: int = 1, max_deltas: int = 16, delta_root: str | None = None,
              device: str = "cpu", max_batch_size: int = 16, batch_wait_s: float = 0.005,
              cpus_per_replica: float = 1.0):
    """The Serve application: ``replicas`` copies of the backbone, each multiplexing up to ``max_deltas`` deltas."""
    gpus = 1 if str(device).startswith("cuda") else 0
    return DeltaServer.options(
        num_replicas=replicas, ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus},
        # Serve's default (5 in flight per replica) would cap every batch at 5 requests.
        max_ongoing_requests=2 * max_batch_size,
    ).bind(dict(backbone), max_deltas=max_deltas, delta_root=delta_root, device=device, max_batch_size=max_batch_size,
                                                       batch_wait_s=batch_wait_s)


def start(app, *, host: str = "127.0.0.1", port: int = 8000, route_prefix: str = "/") -> str:
    """Deploy ``app`` on the connected Ray (HTTP on host:port) and return its URL once it is running."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=APP_NAME, route_prefix=route_prefix, blocking=False)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}{route_prefix.rstrip('/')}"


def serve_until_stopped(backbone: dict[str, Any], *, host: str = "127.0.0.1", port: int = 8000, route_prefix: str = "/",
                        replicas: int = 1, max_deltas: int = 16, max_batch_size: int = 16, delta_root: str | None = None,
                        device: str = "cpu", address: str | None = None, num_cpus: int | None = None,
                        on_start: Callable[[str], None] | None = None, on_stop: Callable[[], None] | None = None) -> None:
    """`shpeft serve`: serve ``backbone``'s deltas over HTTP until Ctrl-C or SIGTERM, then clean up.

    The backbone is built here once first, so a wrong name or missing weights is one ServeError (422), not a
    replica that never starts. Then: join Ray at ``address`` or start an embedded one, deploy ``build_app``,
    call ``on_start(url)``, block; on Ctrl-C or SIGTERM (a service manager's stop) call ``on_stop()``. In
    every case the embedded Ray is shut down (Serve goes with it) or, on a shared cluster, only this
    application is deleted. A replica that fails to start or a port in use raises ServeError (503) after
    that clean-up.
    """
    import signal
    import time

    from shpeft_core.backbone import build_backbone

    from orchestrator.runtime.session import ray_session

    try:
        build_backbone(backbone, 1)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ServeError(f"backbone {backbone['name']!r} from {backbone.get('source')!r} cannot be built: {exc}",
                         422) from None

    def _stop(signum, frame):
        raise KeyboardInterrupt

    # An embedded Ray goes on exit, and Serve with it; on a shared cluster only this application goes.
    with ray_session(address, num_cpus) as started:
        previous = signal.signal(signal.SIGTERM, _stop)  # after Ray's own handler: a stop acts like Ctrl-C
        try:
            app = build_app(backbone, replicas=replicas, max_deltas=max_deltas, delta_root=delta_root, device=device,
                            max_batch_size=max_batch_size)
            try:
                url = start(app, host=host, port=port, route_prefix=route_prefix)
            except RuntimeError as exc:  # a replica that failed to start, a port in use
                raise ServeError(f"the serve application did not start: {exc}", 503) from None
            if on_start is not None:
                on_start(url)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            if on_stop is not None:
                on_stop()
        finally:
            if not started:
                serve.delete(APP_NAME)
            if previous is not None:  # None: a handler installed outside Python, which cannot be put back
                signal.signal(signal.SIGTERM, previous)
