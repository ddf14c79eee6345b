"""TensorFlow SavedModels on TensorFlow (CPU, or a GPU where the installed TensorFlow sees one).

The model is served through one of its signatures: ``serving_default`` unless ``onebox.toml``
names another (``signature_name = "..."``). The signature gives the inputs' and outputs' names,
dtypes and shapes, so no declaration is needed. ``tags = ["..."]`` picks the MetaGraph of a
SavedModel that holds several; by default the only one, or the one tagged ``serve`` (what
``tf.saved_model.save`` and ``keras.Model.export`` write and TF Serving loads).

tensorflow is imported inside the methods only: detection runs where it is absent.
"""

from __future__ import annotations

import logging

import numpy as np

from handlers.base import Handler, batch_signature
from serving.errors import BadRequest, ConfigError, InsufficientMemory, ModelError
from serving.types import Artifact, Device, ModelConfig, Signature, Tensors, TensorSpec

log = logging.getLogger("onebox")

DEFAULT_SIGNATURE = "serving_default"
DEFAULT_TAGS = ("serve",)
#: noise TensorFlow puts around an op's message; the rest is what a client can act on
_NOISE = ("Graph execution error", "Detected at node", "<stack traces unavailable>", "[[", "Hint:")


def numpy_dtype(tf_dtype) -> str:
    """The numpy dtype name for a TensorFlow dtype (strings are ``object``)."""
    if tf_dtype.name == "string":
        return "object"
    return np.dtype(tf_dtype.as_numpy_dtype).name


def spec_from(name: str, tf_spec) -> TensorSpec:
    """A TensorSpec from a ``tf.TensorSpec``: unknown dimensions are -1, an unknown rank ``(-1,)``."""
    dims = tf_spec.shape.as_list() if tf_spec.shape.rank is not None else None
    shape = (-1,) if dims is None else tuple(-1 if d is None else int(d) for d in dims)
    return TensorSpec(name, numpy_dtype(tf_spec.dtype), shape)


def function_signature(function) -> Signature:
    """Inputs and outputs of a signature function (a ``ConcreteFunction`` from ``.signatures``).

    A signature takes keyword arguments only and returns a dict, so both sides are named; they
    are sorted by name, as a loaded SavedModel gives them in no fixed order (a protobuf map). The
    leading dimensions give the batch mode: ``None`` everywhere is DYNAMIC, one fixed size FIXED.
    """
    _, kwargs = function.structured_input_signature
    inputs = tuple(spec_from(name, kwargs[name]) for name in sorted(kwargs))
    outputs = tuple(spec_from(name, spec) for name, spec in sorted(function.structured_outputs.items()))
    return batch_signature(inputs, outputs)


def tf_device(tf, device: Device, config: ModelConfig) -> str:
    """The TensorFlow device string for a host device, configured before the runtime starts.

    A cuda host sees its one GPU as ``/GPU:0`` (the supervisor sets ``CUDA_VISIBLE_DEVICES``);
    memory growth is turned on so that several hosts on one GPU do not each take all of it, as
    TensorFlow does by default. A cpu host hides any GPU. Both settings, and ``threads``, take
    effect only before TensorFlow's runtime starts: a second model in the same host keeps what
    the first one set (logged).
    """
    gpus = tf.config.list_physical_devices("GPU")  # does not start the runtime
    if device.kind == "cpu":
        _configure(lambda: tf.config.set_visible_devices([], "GPU") if gpus else None, "hiding the GPUs")
        name = "/CPU:0"
    elif device.kind == "cuda":
        index = device.index or 0
        if index >= len(gpus):
            raise ConfigError(
                f"device {device.name} requested but this TensorFlow sees {len(gpus)} GPU(s): "
                "tensorflow-cpu has no GPU support; install `tensorflow[and-cuda]` (Linux), or serve on the "
                'CPU (device = "cpu" in onebox.toml, or ONEBOX_DEVICE=cpu)'
            )
        _configure(lambda: tf.config.experimental.set_memory_growth(gpus[index], True), "memory growth")
        name = f"/GPU:{index}"
    else:
        raise ConfigError(f"TensorFlow here runs on cpu or cuda, not {device.name}")
    if config.threads:
        _configure(lambda: tf.config.threading.set_intra_op_parallelism_threads(config.threads), "threads")
    return name


def _configure(change, what: str) -> None:
    try:
        change()
    except RuntimeError as exc:  # the runtime already started (an earlier model in this host)
        log.warning("TensorFlow kept its earlier setting for %s: %s", what, exc)


def _load(tf, artifact: Artifact, tags: list | None):
    """``tf.saved_model.load`` with ``tags``; without them, the only MetaGraph, or else ``serve``'s."""
    try:
        try:
            return tf.saved_model.load(str(artifact.path), tags=tags)
        except ValueError:  # several MetaGraphs and no tags: take the serving one, as TF Serving does
            if tags is not None:
                raise
            return tf.saved_model.load(str(artifact.path), tags=list(DEFAULT_TAGS))
    except (RuntimeError, ValueError) as exc:  # no MetaGraph with these tags
        raise ConfigError(f"{artifact.path}: {op_message(exc)} (choose tags in onebox.toml)") from None
    except tf.errors.ResourceExhaustedError as exc:
        raise InsufficientMemory(f"not enough memory to load {artifact.path}: {op_message(exc)}") from None


def op_message(exc) -> str:
    """The line(s) of a TensorFlow op error a client can act on, without node names or op ids."""
    lines = [
        line.strip()
        for line in str(getattr(exc, "message", exc)).splitlines()
        if line.strip() and not line.strip().startswith(_NOISE)
    ]
    text = " ".join(lines) or type(exc).__name__
    return text.split(" [Op:")[0]


class SavedModelHandler(Handler):
    """A SavedModel's serving signature, called with one batch of named tensors at a time."""

    name = "tf_savedmodel"

    def load(self, artifact: Artifact, device: Device, config: ModelConfig) -> None:
        """Load the SavedModel on the host's device and read the chosen signature."""
        import tensorflow as tf

        self._tf = tf
        self.device_name = tf_device(tf, device, config)
        key = config.extra.get("signature_name", DEFAULT_SIGNATURE)
        if not isinstance(key, str):
            raise ConfigError(f"signature_name must be a string, not {key!r}")
        tags = config.extra.get("tags")
        tags = [tags] if isinstance(tags, str) else tags
        if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
            raise ConfigError(f"tags must be a list of strings, not {tags!r}")
        with tf.device(self.device_name):
            self.model = _load(tf, artifact, tags)
        signatures = self.model.signatures
        if key not in signatures:
            raise ConfigError(
                f"{artifact.path} has no signature {key!r}; it has {sorted(signatures) or 'none'} "
                "(choose one with signature_name in onebox.toml)"
            )
        self.function = signatures[key]
        self.signature = function_signature(self.function)
        specs = self.function.structured_input_signature[1]
        self._dtypes = {name: spec.dtype for name, spec in specs.items()}
        self._rank_unknown = {name for name, spec in specs.items() if spec.shape.rank is None}
        log.info("SavedModel %s: signature %r on %s", artifact.path, key, self.device_name)

    def predict(self, inputs: Tensors) -> Tensors:
        """Run one batch through the signature; TensorFlow's refusals become 400, OOM 507.

        Names, dimensions after the batch's and dtypes were checked and cast against
        :attr:`signature` when each request arrived (serving.host.validation). The whole batch's
        shape is checked here, the batch dimension of a fixed-batch signature included: a loaded
        signature checks none itself, so a wrong shape would fail deep in the graph, or not at all.
        """
        tf = self._tf
        feed = {}
        for spec in self.signature.inputs:
            if spec.name not in inputs:
                raise BadRequest(
                    f"missing input {spec.name!r}; the model takes {[s.name for s in self.signature.inputs]}"
                )
            array = np.asarray(inputs[spec.name], dtype=spec.dtype)
            if spec.name not in self._rank_unknown:
                _check_shape(spec, array.shape)
            feed[spec.name] = tf.convert_to_tensor(array, dtype=self._dtypes[spec.name])
        try:
            with tf.device(self.device_name):
                outputs = self.function(**feed)
        except tf.errors.InvalidArgumentError as exc:  # what TF Serving answers 400 INVALID_ARGUMENT
            raise BadRequest(f"the model refused the input: {op_message(exc)}") from None
        except tf.errors.ResourceExhaustedError as exc:
            raise InsufficientMemory(
                f"out of memory running a batch on {self.device_name}: {op_message(exc)}"
            ) from None
        except tf.errors.OpError as exc:
            raise ModelError(f"{type(exc).__name__}: {op_message(exc)}") from None
        return {spec.name: outputs[spec.name].numpy() for spec in self.signature.outputs}

    def warmup(self, batch_sizes: list[int]) -> None:
        """Run each batch size once, unless an input's rank is unknown (its shape would be a guess)."""
        if self._rank_unknown:
            log.warning(
                "not warming up: the signature leaves the rank of %s unknown", sorted(self._rank_unknown)
            )
            return
        super().warmup(batch_sizes)

    def unload(self) -> None:
        """Drop the model (TensorFlow frees its variables once nothing refers to them)."""
        self.model = self.function = None


def _check_shape(spec: TensorSpec, shape: tuple) -> None:
    """Refuse a shape the signature excludes before TensorFlow sees it."""
    known = [(i, d) for i, d in enumerate(spec.shape) if d >= 0]
    if len(shape) != len(spec.shape) or any(shape[i] != d for i, d in known):
        want = "[" + ", ".join("?" if d < 0 else str(d) for d in spec.shape) + "]"
        raise BadRequest(f"input {spec.name!r} must have shape {want}, got {list(shape)}")
