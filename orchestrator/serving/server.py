"""Ray Serve: one backbone per replica, any number of task deltas multiplexed by their URI.

A replica builds the backbone once. Each request names its task delta (the delta's URI as the
Serve multiplexed model id, header ``serve_multiplexed_model_id``); the replica loads and verifies
the delta on first use and keeps the most recent ``max_deltas`` of them (a few MB each; never a
copy of the backbone). Requests are batched whatever delta they name (``RequestBatcher``), and each
batch is one mixed-task forward (shpeft_core.mixed): the frozen backbone's output plus each
request's own sparse correction and head. Nothing is ever written to the served weights, so batches
need no lock and a bad delta cannot touch them.

Routes under the application's prefix: ``POST`` with image bytes (PNG/JPEG/... or DICOM) in the
body returns the task, class index and name and every class's probability; ``GET .../-/backbone``
returns the base weights' fingerprints (to check that nothing stays applied).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from dataclasses import dataclass
from typing import Any

import torch
from ray import serve
from torch import nn

from orchestrator.serving.predict import (
    PredictError,
    backbone_identity,
    check_same_backbone,
    class_names,
    decode_image_bytes,
    load_task_delta,
    task_name,
)
from orchestrator.serving.batching import RequestBatcher
from shpeft_core.delta import DeltaError, TaskDelta
from shpeft_core.mixed import MixedTaskModel, PreparedDelta

__all__ = ["APP_NAME", "MODEL_ID_HEADER", "INFO_ROUTE", "ServeError", "DeltaServer", "build_app", "start", "state_sha256"]

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
    prepared: PreparedDelta  # the delta checked against the served model, as its mixed forward reads it


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
        from orchestrator.stages.task_run import build_backbone
        from tasks.transforms import transform_for

        self.device = device
        self.delta_root = delta_root
        # The head is the delta's; this one only stands in between requests.
        self.model = build_backbone(backbone, 1).to(device).eval()
        self.base = backbone_identity(self.model)
        self.base_state = state_sha256(self.model)
        self.transform = transform_for(self.model, train=False)  # as in evaluation and `shpeft predict`
        # Hooks on the layers, installed once; the weights are never written (see the module docstring).
        self.mixed = MixedTaskModel(self.model)
        # Only the backbone check's hashing takes it: nothing else writes or needs the weights exclusively.
        self.lock = threading.Lock()

        async def load(uri: str) -> LoadedDelta:
            return await asyncio.to_thread(self._load, uri)

        # Wired here (not as a decorator) so the cache size is a deployment argument.
        self.get_delta = serve.multiplexed(max_num_models_per_replica=max_deltas)(load)
        self.batcher = RequestBatcher(self._run_batch, max_batch_size=max_batch_size, wait_s=batch_wait_s)
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0, "most_deltas_in_a_batch": 0}

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
            # Refuses now what would fail mid-batch (parameter names, shapes, indices, head); writes nothing.
            prepared = self.mixed.prepare(delta, where=uri, check_fingerprint=False, name=task_name(delta, uri))
        except (PredictError, DeltaError) as exc:
            raise ServeError(f"delta {uri}: {exc}" if uri not in str(exc) else str(exc), 422) from None
        return LoadedDelta(uri, delta, task_name(delta, uri), class_names(delta), sha256_file(uri), prepared)

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

    async def _predict_batch(self, loaded: LoadedDelta, image: torch.Tensor) -> dict:
        """This request's answer, computed in a batch with whatever requests arrive with it."""
        return await self.batcher.submit((loaded, image))

    def _run_batch(self, requests: list[tuple[LoadedDelta, torch.Tensor]]) -> list[dict]:
        """One mixed-task forward for the whole batch; the answers in request order."""
        slot: dict[int, int] = {}  # id(LoadedDelta) -> its place among the batch's deltas
        task_index = [slot.setdefault(id(ld), len(slot)) for ld, _ in requests]
        deltas = list({id(ld): ld for ld, _ in requests}.values())
        x = torch.stack([image for _, image in requests])
        # The fingerprint was checked once at start-up and each delta's at load: no batch hashes the backbone.
        logits = self.mixed(x, [ld.prepared for ld in deltas], task_index)
        probs = [lg.double().softmax(dim=-1).cpu() for lg in logits]
        seen = [0] * len(deltas)
        out: list[dict] = []
        for t in task_index:
            ld, p = deltas[t], probs[t][seen[t]]
            seen[t] += 1
            k = int(p.argmax())
            out.append({"task": ld.task, "delta": ld.uri, "delta_sha256": ld.sha256, "class_index": k,
                        "class_name": ld.class_names[k], "class_names": ld.class_names,
                        "probabilities": p.tolist()})
        st = self.stats  # one batch runs at a time (RequestBatcher)
        st["requests"] += len(requests)
        st["batches"] += 1
        st["largest_batch"] = max(st["largest_batch"], len(requests))
        st["most_deltas_in_a_batch"] = max(st["most_deltas_in_a_batch"], len(deltas))
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
