"""Ray Serve: one backbone per replica, any number of task deltas multiplexed by their URI.

A replica builds the backbone once. Each request names its task delta (the delta's URI as the
Serve multiplexed model id, header ``serve_multiplexed_model_id``); the replica loads and verifies
the delta on first use and keeps the most recent ``max_deltas`` of them (a few MB each; never a
copy of the backbone). Requests are batched whatever delta they name (``RequestBatcher``), and each
batch is one mixed-task forward (shpeft_core.mixed): the frozen backbone's output plus each
request's own sparse correction and head. Nothing is ever written to the served weights, so batches
need no lock and a bad delta cannot touch them.

Routes under the application's prefix: ``POST`` with image bytes (PNG/JPEG/... or DICOM) in the
body returns the task, class index and name and every class's probability (a multi_label task: every
finding's sigmoid probability and the findings present, ``task_kind`` saying which); ``GET .../-/backbone``
returns the base weights' fingerprints (to check that nothing stays applied).

``serve_until_stopped`` is `shpeft serve` from Ray's start to its clean-up: it leaves no embedded Ray
and, on a shared cluster, no application of its own behind, however it ends.

What a request can make a replica do (docs/threat-model.md): with ``delta_root`` set, only regular files
whose real path (symlinks resolved) is under it are read, at most ``max_delta_bytes``, within
``load_timeout_s`` (a load runs in a thread of its own, so a stalled one holds no other); a delta is
validated against the served backbone when it is loaded (``validate_delta`` and the mixed forward's own
checks), before it is ever used; the backbone is the one configured here, a delta's metadata never
chooses it. Bodies are at most ``max_body_bytes`` and images at most the pixel limit, checked before
decoding. A background thread re-hashes the whole backbone every ``backbone_check_s`` seconds without
holding up requests, and ``GET /-/backbone`` only reads its cached result. A replica whose weights ever differ takes itself out of service (one log line,
503 to every request, and Serve's health check replaces it).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import posixpath
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

import torch
from ray import serve
from torch import nn

from orchestrator.serving.predict import (
    DELTA_READ_TIMEOUT_S,
    PredictError,
    present_findings,
    task_kind,
    task_probabilities,
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

__all__ = ["APP_NAME", "MODEL_ID_HEADER", "INFO_ROUTE", "ServeError", "DeltaServer", "build_app", "start", "state_sha256",
           "resolve_delta_uri", "serve_until_stopped"]

MODEL_ID_HEADER = "serve_multiplexed_model_id"
INFO_ROUTE = "/-/backbone"
APP_NAME = "shpeft"
MAX_DELTA_BYTES = 512 << 20  # a ViT-B/16 delta at 1% density is ~7 MB
MAX_BODY_BYTES = 64 << 20
BACKBONE_CHECK_S = 300.0

logger = logging.getLogger("shpeft.serve")


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


def _strip_file(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def resolve_delta_uri(uri: str, root: str | None) -> str:
    """The URI a request's delta id names, or ServeError 403 when it is not under ``root``.

    Relative ids resolve against ``root``. A local root is compared on real paths (symlinks resolved), so a
    link under the root cannot reach other files; a remote root on the normalised path. Nothing is read or
    checked for existence before the id is known to be inside the root: a client cannot probe other files.
    """
    if not root:
        return uri
    local_root = "://" not in root or root.startswith("file://")
    if local_root:
        base = _strip_file(root)
        if "://" in uri and not uri.startswith("file://"):
            raise ServeError(f"delta {uri} is outside the served delta root {root}", 403)
        path = _strip_file(uri)
        path = path if os.path.isabs(path) else os.path.join(base, path)
        real_root, real = os.path.realpath(base), os.path.realpath(path)
        if os.path.commonpath([real_root, real]) != real_root:
            raise ServeError(f"delta {uri} is outside the served delta root {root}", 403)
        return real
    proto, _, base = root.partition("://")
    if "://" in uri:
        uproto, _, rest = uri.partition("://")
        if uproto != proto:
            raise ServeError(f"delta {uri} is outside the served delta root {root}", 403)
    else:
        rest = uri if uri.startswith("/") else posixpath.join(base, uri)
    norm, base_norm = posixpath.normpath(rest), posixpath.normpath(base)
    if not norm.startswith(base_norm.rstrip("/") + "/"):
        raise ServeError(f"delta {uri} is outside the served delta root {root}", 403)
    return f"{proto}://{norm}"


@serve.deployment(name="shpeft", ray_actor_options={"num_cpus": 1})
class DeltaServer:
    """One backbone, many deltas. ``backbone``: the job file's section (name, source, kwargs)."""

    def __init__(self, backbone: dict[str, Any], *, max_deltas: int = 16, delta_root: str | None = None,
                 device: str = "cpu", max_batch_size: int = 16, batch_wait_s: float = 0.005,
                 load_timeout_s: float = DELTA_READ_TIMEOUT_S, max_delta_bytes: int = MAX_DELTA_BYTES,
                 max_body_bytes: int = MAX_BODY_BYTES, max_image_pixels: int | None = None,
                 backbone_check_s: float = BACKBONE_CHECK_S):
        from shpeft_core.backbone import build_backbone
        from tasks.codecs.images import set_max_image_pixels
        from tasks.transforms import transform_for

        self.device = device
        self.delta_root = delta_root
        self.load_timeout_s, self.max_delta_bytes, self.max_body_bytes = load_timeout_s, max_delta_bytes, max_body_bytes
        if max_image_pixels is not None:  # the driver's limit, wherever this replica runs
            set_max_image_pixels(max_image_pixels)
        # The head is the delta's; this one only stands in between requests.
        self.model = build_backbone(backbone, 1).to(device).eval()
        self.base = backbone_identity(self.model)
        self.base_state = state_sha256(self.model)
        self.transform = transform_for(self.model, train=False)  # as in evaluation and `shpeft predict`
        # Hooks on the layers, installed once; the weights are never written (see the module docstring).
        self.mixed = MixedTaskModel(self.model)
        # Only the backbone check takes it: nothing writes or needs the weights exclusively.
        self.lock = threading.Lock()
        self.out_of_service: str | None = None
        self._backbone_state = {"fingerprint": self.base.metadata["backbone_fingerprint"],
                                "state_sha256": self.base_state, "checked_at": _now()}

        async def load(uri: str) -> LoadedDelta:
            return await self._load_with_timeout(uri)

        # Wired here (not as a decorator) so the cache size is a deployment argument.
        self.get_delta = serve.multiplexed(max_num_models_per_replica=max_deltas)(load)
        self.batcher = RequestBatcher(self._run_batch, max_batch_size=max_batch_size, wait_s=batch_wait_s)
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0, "most_deltas_in_a_batch": 0}
        if backbone_check_s and backbone_check_s > 0:
            threading.Thread(target=self._check_backbone_every, args=(backbone_check_s,), daemon=True,
                             name="shpeft-backbone-check").start()

    async def _load_with_timeout(self, uri: str) -> LoadedDelta:
        """``_load`` in a thread of its own, given up after ``load_timeout_s``: Serve loads one delta at a
        time per replica, so a load that never ends must not hold the next one (nor a shared pool)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def settle(fn, value):
            if not done.done():
                fn(value)

        def work():
            try:
                outcome = (done.set_result, self._load(uri))
            except BaseException as exc:  # handed to the awaiting request
                outcome = (done.set_exception, exc)
            try:
                loop.call_soon_threadsafe(settle, *outcome)
            except RuntimeError:  # the loop is gone: the request gave up long ago
                pass

        threading.Thread(target=work, daemon=True, name="shpeft-delta-load").start()
        try:
            return await asyncio.wait_for(done, self.load_timeout_s)
        except asyncio.TimeoutError:
            raise ServeError(f"delta {uri} was not loaded within {self.load_timeout_s:g} s", 504) from None

    def _load(self, uri: str) -> LoadedDelta:
        from shpeft_core.io import StorageError, check_regular_file, local_path, read_regular_bytes, sha256_bytes

        uri = resolve_delta_uri(uri, self.delta_root)
        try:
            local = local_path(uri)
            if local is not None and not os.path.isdir(local):  # a folder is said what it is (a LoRA artifact?)
                check_regular_file(local, uri)
        except FileNotFoundError:
            raise ServeError(f"delta {uri} not found", 404) from None
        except StorageError as exc:
            raise ServeError(str(exc), 422) from None
        try:
            delta = load_task_delta(uri, max_bytes=self.max_delta_bytes, timeout_s=self.load_timeout_s)
            check_same_backbone([self.base, delta], ["the served backbone", uri])
            # Refuses now what would reach further or fail mid-batch (what a delta may touch, non-finite
            # values, parameter names, shapes, indices, head: validate_delta); writes nothing.
            prepared = self.mixed.prepare(delta, where=uri, check_fingerprint=False, name=task_name(delta, uri))
        except TimeoutError as exc:
            raise ServeError(f"delta {exc}", 504) from None
        except (PredictError, DeltaError) as exc:
            if str(exc).endswith(": no such file"):  # a remote delta (a local one was checked above)
                raise ServeError(f"delta {uri} not found", 404) from None
            raise ServeError(f"delta {uri}: {exc}" if uri not in str(exc) else str(exc), 422) from None
        try:  # the sha256 of the file's bytes, for the answers (read once more, bounded the same way)
            sha = sha256_bytes(read_regular_bytes(uri, max_bytes=self.max_delta_bytes, timeout_s=self.load_timeout_s))
        except (OSError, StorageError) as exc:
            raise ServeError(f"delta {uri}: {exc}", 422) from None
        return LoadedDelta(uri, delta, prepared.name, class_names(delta), sha, prepared)

    def _take_out_of_service(self, reason: str) -> None:
        if self.out_of_service is None:
            self.out_of_service = reason
            logger.error("shpeft replica out of service: %s", reason)

    def check_health(self) -> None:
        """Serve's health check: a replica whose weights changed is replaced."""
        if self.out_of_service is not None:
            raise RuntimeError(f"out of service: {self.out_of_service}")

    def check_backbone(self) -> dict:
        """Hash the whole backbone now (fingerprint and state digest) and cache it; out of service if it changed.
        No request writes the weights, so this reads them while batches run."""
        from shpeft_core.backbone import backbone_fingerprint

        with self.lock:  # one check at a time
            fp, state = backbone_fingerprint(self.model), state_sha256(self.model)
        self._backbone_state = {"fingerprint": fp, "state_sha256": state, "checked_at": _now()}
        if fp != self.base.metadata["backbone_fingerprint"] or state != self.base_state:
            self._take_out_of_service(f"backbone weights changed since start-up (fingerprint {fp[:12]}, "
                                      f"was {self.base.metadata['backbone_fingerprint'][:12]})")
        return self._backbone_state

    def _check_backbone_every(self, seconds: float) -> None:
        while self.out_of_service is None:
            time.sleep(seconds)
            try:
                self.check_backbone()
            except Exception as exc:  # pragma: no cover - keep checking; say why once per failure
                logger.warning("backbone check failed: %s", exc)

    def _decode(self, data: bytes) -> torch.Tensor:
        if not data:
            raise ServeError("request body is empty; send the image bytes (PNG, JPEG, DICOM, ...)")
        try:
            return self.transform(decode_image_bytes(data, "request body"))
        except PredictError as exc:
            raise ServeError(str(exc)) from None

    async def predict(self, image: bytes) -> dict:
        """One image's prediction with the delta named by the caller's multiplexed model id."""
        if self.out_of_service is not None:
            raise ServeError(f"this replica is out of service ({self.out_of_service}); retry", 503)
        if len(image) > self.max_body_bytes:
            raise ServeError(f"request body is {len(image):,} bytes, over the limit of {self.max_body_bytes:,}", 413)
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
        if self.out_of_service is not None:
            raise ServeError(f"this replica is out of service ({self.out_of_service}); retry", 503)
        slot: dict[int, int] = {}  # id(LoadedDelta) -> its place among the batch's deltas
        task_index = [slot.setdefault(id(ld), len(slot)) for ld, _ in requests]
        deltas = list({id(ld): ld for ld, _ in requests}.values())
        x = torch.stack([image for _, image in requests])
        # The fingerprint was checked once at start-up and each delta's at load: no batch hashes the backbone.
        logits = self.mixed(x, [ld.prepared for ld in deltas], task_index)
        probs = [task_probabilities(lg, ld.delta).cpu() for lg, ld in zip(logits, deltas)]
        seen = [0] * len(deltas)
        out: list[dict] = []
        for t in task_index:
            ld, p = deltas[t], probs[t][seen[t]]
            seen[t] += 1
            kind = task_kind(ld.delta)
            row = {"task": ld.task, "delta": ld.uri, "delta_sha256": ld.sha256, "task_kind": kind,
                   "class_names": ld.class_names, "probabilities": p.tolist()}
            if kind == "multi_label":
                row["findings"] = present_findings(p.tolist(), ld.class_names)
            else:
                k = int(p.argmax())
                row.update(class_index=k, class_name=ld.class_names[k])
            out.append(row)
        st = self.stats  # one batch runs at a time (RequestBatcher)
        st["requests"] += len(requests)
        st["batches"] += 1
        st["largest_batch"] = max(st["largest_batch"], len(requests))
        st["most_deltas_in_a_batch"] = max(st["most_deltas_in_a_batch"], len(deltas))
        return out

    def info(self) -> dict:
        """The last backbone check (cached: nothing is hashed for the caller) and what this replica answered."""
        st = self._backbone_state
        return {"backbone": self.base.metadata["backbone"], "fingerprint": st["fingerprint"],
                "fingerprint_at_start": self.base.metadata["backbone_fingerprint"],
                "state_sha256": st["state_sha256"], "state_sha256_at_start": self.base_state,
                "checked_at": st["checked_at"],
                "unchanged": st["fingerprint"] == self.base.metadata["backbone_fingerprint"]
                and st["state_sha256"] == self.base_state,
                "in_service": self.out_of_service is None, "out_of_service": self.out_of_service, **self.stats}

    async def _body(self, request) -> bytes:
        """The request body, refused (413) past ``max_body_bytes`` without reading the rest."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise ServeError(f"request body is {int(declared):,} bytes, over the limit of {self.max_body_bytes:,}", 413)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                raise ServeError(f"request body is over the limit of {self.max_body_bytes:,} bytes", 413)
        return bytes(body)

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        if request.method == "GET" and request.url.path.rstrip("/").endswith(INFO_ROUTE):
            return JSONResponse(self.info())
        if request.method != "POST":
            return JSONResponse({"error": f"POST image bytes to predict, or GET {INFO_ROUTE}"}, status_code=405)
        try:
            return JSONResponse(await self.predict(await self._body(request)))
        except ServeError as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        except Exception as exc:  # never a bare 500: one line for the client, the traceback in the replica's log
            logger.exception("request failed")
            return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)


def build_app(backbone: dict[str, Any], *, replicas: int = 1, max_deltas: int = 16, delta_root: str | None = None,
              device: str = "cpu", max_batch_size: int = 16, batch_wait_s: float = 0.005,
              cpus_per_replica: float = 1.0, **limits):
    """The Serve application: ``replicas`` copies of the backbone, each multiplexing up to ``max_deltas`` deltas.

    ``limits``: DeltaServer's load_timeout_s, max_delta_bytes, max_body_bytes, max_image_pixels (default: this
    process's pixel limit, so every replica enforces the same) and backbone_check_s."""
    from tasks.codecs.images import max_image_pixels

    limits.setdefault("max_image_pixels", max_image_pixels())
    gpus = 1 if str(device).startswith("cuda") else 0
    return DeltaServer.options(
        num_replicas=replicas, ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus},
        # Serve's default (5 in flight per replica) would cap every batch at 5 requests.
        max_ongoing_requests=2 * max_batch_size,
    ).bind(dict(backbone), max_deltas=max_deltas, delta_root=delta_root, device=device, max_batch_size=max_batch_size,
           batch_wait_s=batch_wait_s, **limits)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
