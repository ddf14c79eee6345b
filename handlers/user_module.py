"""The user's ``code/inference.py``, called exactly as the SageMaker inference toolkit calls it.

``model_fn``, ``input_fn``, ``predict_fn``, ``output_fn`` and ``transform_fn`` take an optional
trailing ``context`` chosen by arity (toolkit ``_run_handler_function``). Missing functions get
the toolkit's defaults; a missing ``model_fn`` loads the built-in artifact found beside the script.
"""

from __future__ import annotations

import importlib.util
import inspect
import io
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np

from handlers.base import Handler
from handlers.user_context import CUSTOM_ATTRIBUTES, Context, header_lookup
from serving.errors import (
    ConfigError,
    ModelError,
    NotAcceptable,
    ServingError,
    UnsupportedMediaType,
    UserCodeError,
)
from serving.types import (
    Artifact,
    BatchMode,
    Device,
    ModelConfig,
    RawRequest,
    RawResponse,
    Signature,
    Tensors,
)

log = logging.getLogger(__name__)

UTF8_TYPES = ("application/json", "text/csv")  # decoded to str only for exactly these (toolkit)
_TOOLKIT_FUNCTIONS = ("model_fn", "input_fn", "predict_fn", "output_fn", "transform_fn")


def install_requirements(code_dir: Path, pip_cmd: list[str]) -> None:
    """``pip install -r code_dir/requirements.txt`` if it exists; a failure raises ConfigError."""
    requirements = Path(code_dir) / "requirements.txt"
    if not requirements.is_file():
        return
    cmd = [*pip_cmd, "install", "--no-input", "-r", str(requirements)]
    log.info("installing %s", requirements)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise ConfigError(f"installing {requirements} failed (exit {done.returncode}): {tail}")


def import_script(script: Path):
    """Import ``script`` as a module named after its stem, with its folder on ``sys.path``."""
    folder = str(script.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(script.stem, script)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import {script}")
    module = importlib.util.module_from_spec(spec)
    # Registered before running so pickles and helper modules can refer to it by name.
    sys.modules[script.stem] = module
    spec.loader.exec_module(module)
    return module


class BuiltinModel:
    """The model the default ``model_fn`` returns: a built-in handler behind a callable."""

    def __init__(self, handler: Handler):
        self.handler = handler

    def __call__(self, data):
        """Predict on an array (or a dict of named arrays); one output comes back as an array."""
        specs = self.handler.signature.inputs
        if isinstance(data, dict):
            inputs = {k: np.asarray(v) for k, v in data.items()}
        else:
            inputs = {specs[0].name: np.asarray(data, dtype=specs[0].dtype)}
        out = self.handler.predict(inputs)
        return next(iter(out.values())) if len(out) == 1 else out


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


class UserScriptHandler(Handler):
    """Runs a SageMaker inference-toolkit script; takes raw requests (``raw = True``)."""

    name = "user_script"
    raw = True

    @classmethod
    def probe(cls, model_dir: Path) -> Artifact | None:
        """The user script in ``model_dir/code``, if there is one."""
        from handlers.registry import DEFAULT_PROGRAM, detect

        if not (Path(model_dir) / "code" / DEFAULT_PROGRAM).is_file():
            return None
        return detect(model_dir)

    def load(self, artifact: Artifact, device: Device, config: ModelConfig) -> None:
        """Import the script, check its functions, then run ``model_fn`` (or the default)."""
        self.model_dir = artifact.model_dir
        self.device = device
        self.config = config
        self.default_accept = str(config.extra.get("default_accept", "application/json"))
        self.inner: Handler | None = None
        self.gpu_id = device.index if device.kind == "cuda" else None
        try:
            module = import_script(artifact.path)
        except Exception as exc:
            log.exception("importing %s failed", artifact.path)
            raise ModelError(f"importing {artifact.files[0]} failed: {_short(exc)}") from None
        fns = {name: getattr(module, name, None) for name in _TOOLKIT_FUNCTIONS}
        if fns["transform_fn"] and (fns["input_fn"] or fns["predict_fn"] or fns["output_fn"]):
            raise ModelError(
                f"{artifact.files[0]}: cannot use transform_fn together with input_fn, predict_fn "
                "and/or output_fn (define transform_fn alone, or the three without it)"
            )
        self.input_fn = fns["input_fn"] or self._default_input_fn
        self.predict_fn = fns["predict_fn"] or self._default_predict_fn
        self.output_fn = fns["output_fn"] or self._default_output_fn
        self.transform_fn = fns["transform_fn"] or self._default_transform_fn
        context = self._context({})
        pre, warm = getattr(module, "pre_model_fn", None), getattr(module, "model_warmup_fn", None)
        if pre is not None:
            self._guard("pre_model_fn", pre, str(self.model_dir))
        model_fn = fns["model_fn"] or (lambda model_dir: self._default_model_fn(artifact))
        self.model = self._guard("model_fn", model_fn, str(self.model_dir), context=context)
        if warm is not None:
            self._guard("model_warmup_fn", warm, str(self.model_dir), self.model)
        batched = bool(config.batch) and config.max_batch_size > 1
        self.signature = Signature(
            batch=BatchMode.DYNAMIC if batched else BatchMode.NONE,
            max_batch=config.max_batch_size if batched else None,
        )

    def unload(self) -> None:
        """Drop the model (and the built-in handler behind it, if any)."""
        if self.inner is not None:
            self.inner.unload()
        self.model = self.inner = None

    # ------------------------------------------------------------------ requests

    def invoke_raw(self, request: RawRequest) -> RawResponse:
        """One request through ``transform_fn`` (by default input_fn -> predict_fn -> output_fn)."""
        context = self._context(self._request_headers(request))
        accept = self._accept(request)
        data = self._decode(request)
        result = self._guard(
            "transform_fn", self.transform_fn, self.model, data, request.content_type, accept, context=context
        )
        return self._response(result, accept, context)

    def prepare(self, request: RawRequest) -> Tensors:
        """Batching: ``input_fn`` on one request, as an array named ``input`` (leading dim = rows)."""
        context = self._context(self._request_headers(request))
        data = self._guard(
            "input_fn", self.input_fn, self._decode(request), request.content_type, context=context
        )
        array = np.asarray(data)
        return {"input": array if array.ndim else array.reshape(1)}

    def predict(self, inputs: Tensors) -> Tensors:
        """Batching: ``predict_fn`` on the concatenated batch."""
        out = self._guard(
            "predict_fn", self.predict_fn, inputs["input"], self.model, context=self._context({})
        )
        return {"output": np.asarray(out)}

    def finish(self, outputs: Tensors, request: RawRequest) -> RawResponse:
        """Batching: ``output_fn`` on this request's rows of the batch result."""
        context = self._context(self._request_headers(request))
        accept = self._accept(request)
        result = self._guard("output_fn", self.output_fn, outputs["output"], accept, context=context)
        return self._response(result, accept, context)

    # ------------------------------------------------------------------ helpers

    def _context(self, headers: dict[str, str]) -> Context:
        return Context(self.model_dir, self.gpu_id, [headers])

    @staticmethod
    def _request_headers(request: RawRequest) -> dict[str, str]:
        headers = {"Content-Type": request.content_type, "Accept": request.accept}
        if request.custom_attributes is not None:
            headers[CUSTOM_ATTRIBUTES] = request.custom_attributes
        return headers

    def _accept(self, request: RawRequest) -> str:
        accept = (request.accept or "").strip()
        return self.default_accept if accept in ("", "*/*") else accept

    @staticmethod
    def _decode(request: RawRequest):
        if request.content_type in UTF8_TYPES:
            return request.body.decode("utf-8")
        return request.body

    def _guard(self, what: str, fn, *args, context: Context | None = None):
        """Call a user function by arity; map its exceptions to serving errors without tracebacks."""
        try:
            params = len(inspect.signature(fn).parameters)
            if context is not None and params == len(args) + 1:
                return fn(*args, context)
            if params != len(args):
                raise TypeError(f"{fn.__name__} takes {params} arguments but {len(args)} were given")
            return fn(*args)
        except ServingError:
            raise
        except Exception as exc:
            status, message = getattr(exc, "status_code", None), getattr(exc, "message", None)
            if isinstance(status, int) and message is not None:
                log.warning("%s raised a toolkit error %s: %s", what, status, message)
                raise UserCodeError(status, str(message)) from None
            log.exception("%s raised", what)
            raise ModelError(f"{what} raised {_short(exc)}") from None

    def _response(self, result, accept: str, context: Context) -> RawResponse:
        content_type = accept
        if isinstance(result, tuple) and len(result) == 2:
            result, content_type = result
        if isinstance(result, str):
            body = result.encode("utf-8")
        elif isinstance(result, bytes | bytearray | memoryview):
            body = bytes(result)
        else:
            raise ModelError(
                f"the script returned {type(result).__name__}; expected bytes or str "
                "(or a (body, content_type) tuple)"
            )
        attributes = header_lookup(context.get_response_headers(0), CUSTOM_ATTRIBUTES)
        return RawResponse(body=body, content_type=str(content_type), custom_attributes=attributes)

    # ------------------------------------------------------------------ toolkit defaults

    def _default_model_fn(self, artifact: Artifact):
        from handlers.registry import artifact_from_dict, handler_class

        inner = artifact.details.get("inner")
        if not inner:
            raise ConfigError(
                f"{artifact.files[0]} defines no model_fn and no built-in model artifact was found "
                "beside it; define model_fn(model_dir)"
            )
        inner_artifact = artifact_from_dict(inner)
        handler = handler_class(inner_artifact.handler)()
        handler.load(inner_artifact, self.device, self.config)
        self.inner = handler
        return BuiltinModel(handler)

    @staticmethod
    def _default_input_fn(input_data, content_type):
        from sagemaker_inference import decoder, errors

        if content_type == "application/x-npy":  # the toolkit allows pickles here; we do not
            data = input_data.encode() if isinstance(input_data, str) else input_data
            return np.load(io.BytesIO(data), allow_pickle=False)
        try:
            return decoder.decode(input_data, content_type)
        except errors.UnsupportedFormatError:
            raise UnsupportedMediaType(
                f"no decoder for Content-Type {content_type!r}; define input_fn"
            ) from None

    @staticmethod
    def _default_predict_fn(data, model):
        if isinstance(model, BuiltinModel):
            return model(data)
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(model, torch.nn.Module | torch.jit.ScriptModule):
            array = np.asarray(data)
            # As the PyTorch toolkit does (torch.FloatTensor of the decoded array).
            tensor = torch.as_tensor(array.astype(np.float32) if array.dtype.kind in "iubf" else array)
            weight = next(model.parameters(), None)
            if weight is not None:
                tensor = tensor.to(weight.device)
            with torch.no_grad():
                out = model(tensor)
            return out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else out
        if callable(model):
            return model(data)
        raise ConfigError("the script defines no predict_fn and its model is not callable")

    @staticmethod
    def _default_output_fn(prediction, accept):
        from sagemaker_inference import encoder, utils

        for content_type in utils.parse_accept(accept):
            if content_type in encoder.SUPPORTED_CONTENT_TYPES:
                return encoder.encode(prediction, content_type), content_type
        raise NotAcceptable(f"no encoder for Accept {accept!r}; define output_fn")

    def _default_transform_fn(self, model, input_data, content_type, accept, context=None):
        data = self._guard("input_fn", self.input_fn, input_data, content_type, context=context)
        prediction = self._guard("predict_fn", self.predict_fn, data, model, context=context)
        return self._guard("output_fn", self.output_fn, prediction, accept, context=context)
