"""Per-model settings from ``onebox.toml``, merged over the server-wide defaults and checked
against what the loaded artifact accepts.

Example ``onebox.toml``::

    max_batch_size = 32
    max_delay_ms = 2
    batch_sizes = [1, 8, 32]     # static sizes: pad up to the next one
    max_queue = 512
    timeout_s = 10
    precision = "fp16"
    cuda_sync = "auto"           # spin | block | auto: how a host thread waits for a CUDA batch
    pipeline = true              # answer a batch while the next one runs on the GPU (torch, CUDA)
    [[inputs]]                   # declare a signature the artifact does not carry (TorchScript)
    name = "x"
    dtype = "float32"
    shape = [-1, 4]
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from serving.batching import BatchPolicy
from serving.errors import ConfigError
from serving.types import BatchMode, ModelConfig, Signature

CONFIG_FILE = "onebox.toml"
_FIELDS = {f.name: f for f in dataclasses.fields(ModelConfig)}
_TYPES = {
    "max_batch_size": int,
    "max_delay_ms": (int, float),
    "batch_sizes": list,
    "max_queue": int,
    "timeout_s": (int, float),
    "batch": bool,
    "precision": str,
    "device": str,
    "warmup": bool,
    "cuda_graphs": bool,
    "threads": int,
    "concurrent_batches": int,
    "cuda_sync": str,
    "pipeline": bool,
    "pipeline_depth": int,
    "copy_threads": int,
}
CUDA_SYNC = ("auto", "spin", "block")


def load_model_config(model_dir: Path, defaults: ModelConfig) -> ModelConfig:
    """``defaults`` overridden by ``model_dir/onebox.toml`` when it exists; unknown keys go to ``extra``."""
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        return defaults
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    changes: dict = {}
    extra = dict(defaults.extra)
    for key, value in data.items():
        if key not in _TYPES:
            extra[key] = value
            continue
        if not isinstance(value, _TYPES[key]) or (isinstance(value, bool) and _TYPES[key] is int):
            raise ConfigError(f"{path}: {key} = {value!r} has the wrong type")
        changes[key] = tuple(value) if key == "batch_sizes" else value
    if changes.get("pipeline_depth", 1) not in (1, 2):
        raise ConfigError(f"{path}: pipeline_depth must be 1 or 2")
    if changes.get("copy_threads", 1) < 1:
        raise ConfigError(f"{path}: copy_threads must be an integer >= 1")
    if changes.get("timeout_s", 1) <= 0:
        raise ConfigError(f"{path}: timeout_s must be a positive number of seconds")
    if changes.get("precision") not in (None, "fp32", "fp16", "bf16"):
        raise ConfigError(f"{path}: precision must be fp32, fp16 or bf16")
    if changes.get("cuda_sync", "auto") not in CUDA_SYNC:
        raise ConfigError(f"{path}: cuda_sync must be one of {', '.join(CUDA_SYNC)}")
    return dataclasses.replace(defaults, **changes, extra=extra, explicit=frozenset(changes))


def batch_policy(
    config: ModelConfig, signature: Signature, *, raw: bool = False, concurrency: int = 1
) -> BatchPolicy:
    """The batcher policy for a loaded model, or ConfigError when the knobs contradict the artifact."""
    if raw and not config.batch:
        return BatchPolicy(max_batch_size=1, max_queue=config.max_queue, splittable=False)
    # server-wide ONEBOX_* defaults adapt to each artifact; what onebox.toml says must hold exactly
    if signature.batch is BatchMode.NONE and not config.explicit & {"max_batch_size", "batch_sizes"}:
        return BatchPolicy(max_batch_size=1, max_queue=config.max_queue, splittable=False)
    if "max_batch_size" not in config.explicit and signature.max_batch is not None:
        config = dataclasses.replace(config, max_batch_size=min(config.max_batch_size, signature.max_batch))
    if signature.batch is BatchMode.NONE:
        if config.max_batch_size > 1:
            raise ConfigError("max_batch_size > 1, but this artifact has no batch dimension")
        if any(size > 1 for size in config.batch_sizes):
            hint = " (a user script batches only with batch = true and max_batch_size > 1)" if raw else ""
            raise ConfigError(
                f"batch_sizes {list(config.batch_sizes)} need a batch dimension, but this model has none{hint}"
            )
        return BatchPolicy(max_batch_size=1, max_queue=config.max_queue, splittable=False)
    sizes = tuple(config.batch_sizes)
    if signature.batch is BatchMode.FIXED:
        allowed = set(signature.batch_sizes)
        bad = [s for s in sizes if s not in allowed]
        if bad:
            raise ConfigError(
                f"batch_sizes {bad} are not among the sizes the artifact accepts {sorted(allowed)}"
            )
        sizes = sizes or tuple(sorted(allowed))
    max_batch = config.max_batch_size
    if sizes and max_batch == 1 and max(sizes) > 1:
        max_batch = max(sizes)  # a fixed-size artifact batches up to its sizes by default
    if signature.max_batch is not None and max_batch > signature.max_batch:
        raise ConfigError(
            f"max_batch_size = {max_batch} is larger than the artifact accepts ({signature.max_batch})"
        )
    if sizes and max_batch > max(sizes):
        raise ConfigError(f"max_batch_size = {max_batch} is larger than the largest of batch_sizes {sizes}")
    policy = BatchPolicy(
        max_batch_size=max_batch,
        max_delay_ms=config.max_delay_ms,
        batch_sizes=tuple(s for s in sizes if s <= max_batch) if sizes else (),
        max_queue=max(config.max_queue, max_batch),
        splittable=True,
        concurrent_batches=config.concurrent_batches or concurrency,
    )
    policy.validate()
    return policy


def warmup_sizes(policy: BatchPolicy) -> list[int]:
    """Every batch size the batcher can form: the fixed sizes, or each size from 1 to the maximum."""
    if policy.batch_sizes:
        return list(policy.batch_sizes)
    return list(range(1, policy.max_batch_size + 1))
