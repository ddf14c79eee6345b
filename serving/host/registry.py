"""The models a host owns: loading, state, the request path into each model's batcher, unloading.

Single-model mode is this registry with one model loaded at start. States move
``LOADING -> READY -> UNLOADING`` (or ``LOADING -> FAILED``); a failed load leaves an entry that
says why, so ``/ping`` can stay non-200 and the reason can be shown.
"""

from __future__ import annotations

import itertools
import logging
import sys
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from pathlib import Path

import numpy as np

from handlers.base import Handler
from handlers.registry import check_compatible, detect, handler_class
from serving.batching import Batcher, Outcome
from serving.errors import (
    BadRequest,
    Conflict,
    DeadlineExceeded,
    InsufficientMemory,
    NotFound,
    NotReady,
    ServingError,
)
from serving.host.model_config import batch_policy, load_model_config, warmup_sizes
from serving.host.validation import conform_inputs
from serving.settings import Settings
from serving.types import Artifact, Device, ModelConfig, RawRequest, RawResponse, Tensors

log = logging.getLogger(__name__)


class State(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADING = "unloading"


@dataclass
class Model:
    """One model on this host."""

    name: str
    path: Path
    state: State = State.LOADING
    artifact: Artifact | None = None
    handler: Handler | None = None
    config: ModelConfig | None = None
    batcher: Batcher | None = None
    serial: _SerialScript | None = None
    error: str = ""
    load_seconds: float = 0.0
    footprint: int = 0  # bytes of its files, counted against Settings.model_memory_bytes

    def describe(self) -> dict:
        """What a frontend needs to call the model, and what `onebox` prints about it."""
        handler = self.handler
        return {
            "name": self.name,
            "path": str(self.path),
            "state": self.state.value,
            "error": self.error,
            "kind": self.artifact.kind if self.artifact else None,
            "handler": self.artifact.handler if self.artifact else None,
            "raw": bool(handler and handler.raw),
            "signature": handler.signature.to_dict() if handler else None,
            "gather_rows": self.gather_rows(),
            "load_seconds": round(self.load_seconds, 3),
            "footprint": self.footprint,
        }

    def gather_rows(self) -> int:
        """The most rows a frontend may send as one call made of several requests (0: none).

        Only a model that batches rows may receive them: its batcher treats the call as one
        request of that many rows, which it would have put in one batch anyway; a model without
        a batch dimension, or batching one row at a time, gets each request alone.
        """
        if self.batcher is None or self.handler is None or self.handler.raw:
            return 0
        policy = self.batcher.policy
        if not policy.splittable:
            return 0
        return policy.max_batch_size if policy.max_batch_size > 1 else 0


class ModelRegistry:
    """Loads and serves models on one device."""

    def __init__(self, settings: Settings, device: Device, observe=None):
        self.settings = settings
        self.device = device
        self.observe = observe  # called with (model name, BatchStats) after each batch
        self._models: dict[str, Model] = {}
        self._lock = threading.Lock()

    # -- management ----------------------------------------------------------------------
    def load(self, name: str, path: Path, *, keep_failure: bool = True) -> Model:
        """Load ``path`` as ``name``; Conflict if the name is taken.

        A failed load raises; with ``keep_failure`` its entry stays, FAILED with the reason (the
        single model: ``/ping`` says why), else it is gone (a multi-model endpoint lists only
        what loaded). Running out of memory raises InsufficientMemory (507).
        """
        model = Model(name, Path(path))
        with self._lock:
            if name in self._models and self._models[name].state is not State.FAILED:
                raise Conflict(f"model {name!r} is already loaded")
            self._models[name] = model
        started = time.perf_counter()
        try:
            self._load(model)
        except BaseException as exc:
            error = _out_of_memory(exc, name)
            model.state = State.FAILED
            model.error = _reason(error or exc)
            _release(model)
            if not keep_failure:
                with self._lock:
                    if self._models.get(name) is model:
                        del self._models[name]
            if error is not None:
                raise error from None
            raise
        model.load_seconds = time.perf_counter() - started
        model.state = State.READY
        return model

    def _load(self, model: Model) -> None:
        settings = self.settings
        if not model.path.is_dir():
            raise NotFound(f"model directory {model.path} does not exist")
        if settings.model_memory_bytes is not None:
            self._reserve(model, _footprint(model.path), settings.model_memory_bytes)
        artifact = detect(model.path, program=settings.program, model_file=settings.model_file)
        check_compatible(artifact, [self.device.kind])
        model.artifact = artifact
        config = load_model_config(model.path, settings.model_defaults)
        model.config = config
        if artifact.kind == "user_script" and settings.install_requirements:
            _install_requirements(model.path / "code")
        handler = handler_class(artifact.handler)()
        handler.load(artifact, self.device, config)
        model.handler = handler
        policy = batch_policy(
            config, handler.signature, raw=handler.raw, concurrency=handler.concurrent_batches
        )
        run, launch = handler.predict, handler.launch if handler.pipelined else None
        if handler.raw and not config.batch:
            model.serial = _SerialScript(handler)
            run, launch = model.serial.run, None
        allocate = handler.input_buffer if launch is not None else None
        # on the batcher's own threads: the state a warm-up builds may be per thread (cuDNN plans)
        warmup = partial(handler.warmup, warmup_sizes(policy)) if config.warmup and not handler.raw else None
        model.batcher = Batcher(
            run,
            policy,
            launch=launch,
            allocate=allocate,
            warmup=warmup,
            name=model.name,
            observe=self._observer(model.name),
            depth=handler.launch_depth,
            # opt-in: 4 threads sped one H200 host's copies up 1.5x, but slowed 3 hosts (the GIL)
            copy_threads=config.copy_threads or 1,
            gather=handler.takes_rows,
        )
        model.batcher.wait_warm()

    def _reserve(self, model: Model, size: int, cap: int) -> None:
        """Count ``size`` bytes against ``cap`` for ``model``, or refuse it (507)."""
        with self._lock:
            held = sum(
                m.footprint for m in self._models.values() if m is not model and m.state is not State.FAILED
            )
            if held + size > cap:
                raise InsufficientMemory(
                    f"model {model.name!r} needs {_mb(size)} and {_mb(held)} of the {_mb(cap)} for models "
                    "are taken (ONEBOX_MODEL_MEMORY_MB): unload a model first"
                )
            model.footprint = size

    def _observer(self, name: str):
        if self.observe is None:
            return None
        return lambda stats: self.observe(name, stats)

    def unload(self, name: str) -> None:
        """Stop taking requests for ``name``, finish its queued ones, release it."""
        with self._lock:
            model = self._models.get(name)
            if model is None or model.state is State.UNLOADING:
                raise NotFound(f"model {name!r} is not loaded")
            model.state = State.UNLOADING
        try:
            if model.batcher:
                model.batcher.close(drain=True)
            if model.handler:
                model.handler.unload()
        finally:
            with self._lock:
                self._models.pop(name, None)

    def close(self) -> None:
        """Unload everything (drains queued requests)."""
        for name in list(self._models):
            try:
                self.unload(name)
            except ServingError:
                pass

    def models(self) -> list[Model]:
        """A snapshot of the models and their states."""
        with self._lock:
            return list(self._models.values())

    def get(self, name: str) -> Model:
        """The READY model called ``name``: NotFound or NotReady otherwise."""
        model = self._models.get(name)
        if model is None or model.state is State.UNLOADING:
            raise NotFound(f"model {name!r} is not loaded")
        if model.state is State.LOADING:
            raise NotReady(f"model {name!r} is still loading")
        if model.state is State.FAILED:
            raise NotReady(f"model {name!r} failed to load: {model.error}")
        return model

    # -- request path --------------------------------------------------------------------
    def infer(self, name: str, inputs: Tensors, deadline: float) -> Tensors:
        """Queue decoded inputs for ``name`` and wait for its rows of the batch's outputs."""
        future, capped = self.submit(name, inputs, deadline)
        return wait_result(future, capped)

    def submit(
        self, name: str, inputs: Tensors, deadline: float, *, inline: bool = True
    ) -> tuple[Outcome, float]:
        """Queue decoded inputs for ``name``; the future of its outputs and the deadline that applies.

        With ``inline`` an idle model may run the batch on the calling thread (the future is
        then done on return); without, the call never waits for the model.
        """
        model = self.get(name)
        if model.handler.raw:
            raise BadRequest(f"model {name!r} takes raw request bodies")
        inputs = conform_inputs(inputs, model.handler.signature)
        capped = _model_deadline(model, deadline)
        # run on this thread only where the frontend's own deadline covers a slow call; a model
        # timeout shorter than the request's must be enforced here, by waiting on the future
        here = inline and capped >= deadline
        return model.batcher.submit(inputs, capped, run_here=here), capped

    def model_deadline(self, name: str, deadline: float) -> float:
        """``deadline`` shortened to the model's own ``timeout_s``."""
        return _model_deadline(self.get(name), deadline)

    def invoke(self, name: str, request: RawRequest, deadline: float) -> RawResponse:
        """Run a raw request through a user script (through the batcher when it opted in)."""
        model = self.get(name)
        handler = model.handler
        if not handler.raw:
            raise BadRequest(f"model {name!r} takes decoded tensors")
        capped = _model_deadline(model, deadline)
        here = capped >= deadline  # see submit: only where the frontend enforces the deadline
        deadline = capped
        if model.config.batch:
            inputs = handler.prepare(request)
            outputs = wait_result(model.batcher.submit(inputs, deadline, run_here=here), deadline)
            return handler.finish(outputs, request)
        # one request at a time through the same queue: user code need not be thread-safe,
        # and deadlines and the queue limit apply as for tensors
        serial = model.serial
        ticket = serial.enqueue(request)
        try:
            wait_result(model.batcher.submit({"ticket": ticket}, deadline, run_here=here), deadline)
            return serial.take(ticket)
        finally:
            serial.forget(ticket)


class _SerialScript:
    """Runs user-script requests one at a time behind a batcher of size 1.

    The batcher carries only a ticket number; the raw request waits here. This keeps one queue,
    one deadline rule and one 429 rule for every kind of model.
    """

    def __init__(self, handler: Handler):
        self.handler = handler
        self._pending: dict[int, RawRequest | RawResponse] = {}
        self._counter = itertools.count()

    def enqueue(self, request: RawRequest) -> np.ndarray:
        ticket = next(self._counter)
        self._pending[ticket] = request
        return np.array([ticket], dtype=np.int64)

    def run(self, inputs: Tensors) -> Tensors:
        ticket = int(inputs["ticket"][0])
        self._pending[ticket] = self.handler.invoke_raw(self._pending[ticket])
        return inputs

    def take(self, ticket: np.ndarray) -> RawResponse:
        return self._pending[int(ticket[0])]

    def forget(self, ticket: np.ndarray) -> None:
        self._pending.pop(int(ticket[0]), None)


def _release(model: Model) -> None:
    """Stop a failed model's batcher threads and free what its handler holds (device memory)."""
    try:
        if model.batcher:
            model.batcher.close(drain=False)
        if model.handler:
            model.handler.unload()
    except Exception:
        log.exception("releasing model %r after its failed load", model.name)


def _footprint(directory: Path) -> int:
    """Bytes of the files under ``directory``: what loading it takes, near enough to budget by."""
    total = 0
    for path in directory.rglob("*"):
        try:
            if path.is_file():
                total += path.stat().st_size
        except OSError:
            pass
    return total


def _mb(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MB"


def _out_of_memory(exc: BaseException, name: str) -> InsufficientMemory | None:
    """A load that ran out of host or device memory, as the 507 a multi-model endpoint answers."""
    if isinstance(exc, InsufficientMemory):
        return exc
    # torch.OutOfMemoryError (CUDA), onnxruntime's and TensorFlow's allocation failures: matched
    # by name and message, as no framework is imported here
    text = str(exc).lower()
    if (
        isinstance(exc, MemoryError)
        or type(exc).__name__ in ("OutOfMemoryError", "ResourceExhaustedError")
        or ("out of memory" in text)
    ):
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return InsufficientMemory(f"not enough memory to load model {name!r}: {first}")
    return None


def _reason(exc: BaseException) -> str:
    return exc.message if isinstance(exc, ServingError) else f"{type(exc).__name__}: {exc}"


def _model_deadline(model: Model, deadline: float) -> float:
    """The caller's deadline, shortened to the model's own ``timeout_s`` from onebox.toml."""
    return min(deadline, time.time() + model.config.timeout_s)


def wait_result(future, deadline: float):
    """The future's result, or DeadlineExceeded once ``deadline`` (``time.time()`` seconds) passes."""
    try:
        return future.result(timeout=max(deadline - time.time(), 0.001))
    except TimeoutError:
        raise DeadlineExceeded("the model did not answer within the request's deadline") from None


def _install_requirements(code_dir: Path) -> None:
    from handlers.user_module import install_requirements

    install_requirements(code_dir, [sys.executable, "-m", "pip"])
