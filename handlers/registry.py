"""Detection and the handler registry (DESIGN §4, artifacts.md §11).

Detection reads bytes only; handler modules (and so their frameworks) are imported lazily by
:func:`handler_class`, never by :func:`detect`.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

from handlers.base import DetectionError, Handler
from handlers.probes import probe_directory, probe_file
from serving.errors import ServingError
from serving.types import Artifact

#: handler name -> "module:Class"; only these can be loaded in this image
HANDLERS = {
    "onnx": "handlers.onnx_runtime:OnnxHandler",
    "torchscript": "handlers.torch_script:TorchScriptHandler",
    "torch_export": "handlers.torch_export:TorchExportHandler",
    "torch_aoti": "handlers.torch_aoti:AotiHandler",
    "tf_savedmodel": "handlers.tensorflow_savedmodel:SavedModelHandler",
    "user_script": "handlers.user_module:UserScriptHandler",
}
SUPPORTED_KINDS = (
    "torchscript",
    "torch_export",
    "torch_aoti",
    "onnx",
    "ort",
    "tf_savedmodel (a TensorFlow SavedModel directory)",
    "user_script (code/inference.py)",
)
_IGNORED_SUFFIXES = (".py", ".md", ".toml", ".yaml", ".yml", ".lock", ".cfg", ".ini", ".onnx.data")
DEFAULT_PROGRAM = "inference.py"


class IncompatibleArtifact(ServingError):
    """The artifact was recognised but this image or host cannot run it (a message to act on)."""


def handler_class(name: str) -> type[Handler]:
    """The handler class registered as ``name``, importing its module only now."""
    try:
        target = HANDLERS[name]
    except KeyError:
        raise IncompatibleArtifact(f"no handler named {name!r}; this image has {sorted(HANDLERS)}") from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)


def artifact_from_dict(data: dict) -> Artifact:
    """Rebuild an :class:`Artifact` from :meth:`Artifact.to_dict` (used for ``details["inner"]``)."""
    return Artifact(
        kind=data["kind"],
        handler=data["handler"],
        path=Path(data["path"]),
        model_dir=Path(data["model_dir"]),
        packages=tuple(data["packages"]),
        devices=tuple(data["devices"]),
        reason=data["reason"],
        files=tuple(data["files"]),
        details=dict(data["details"]),
    )


def _normalise(model_dir: Path) -> Path:
    """Step 0: descend a single wrapping folder; pick the highest TF Serving version folder."""
    root = model_dir
    while True:
        entries = [p for p in root.iterdir() if not p.name.startswith(".") and p.name != "code"]
        dirs = [p for p in entries if p.is_dir()]
        files = [p for p in entries if p.is_file() and not p.name.endswith(_IGNORED_SUFFIXES)]
        if len(dirs) == 1 and not files and probe_directory(dirs[0], model_dir) is None:
            root = dirs[0]
            continue
        versions = [d for d in dirs if d.name.isdigit() and (d / "saved_model.pb").exists()]
        if versions and probe_directory(root, model_dir) is None:
            return max(versions, key=lambda d: int(d.name))
        return root


def _candidates(root: Path, model_dir: Path) -> tuple[list[Artifact], list[str]]:
    """Every recognised artifact under ``root`` (not recursing into unknown folders) and the files seen."""
    whole = probe_directory(root, model_dir)
    seen = sorted(
        str(p.relative_to(model_dir))
        for p in root.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") or part == "code" for part in p.relative_to(model_dir).parts)
    )
    if whole is not None:
        return [whole], seen
    found = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or entry.name == "code":
            continue
        if entry.is_dir():
            art = probe_directory(entry, model_dir)
        elif entry.name.endswith(_IGNORED_SUFFIXES):
            art = None
        else:
            art = probe_file(entry, model_dir)
        if art is not None:
            found.append(art)
    return found, seen


def _choose(found: list[Artifact], seen: list[str], model_dir: Path, allow_none: bool) -> Artifact | None:
    if not found:
        if allow_none:
            return None
        raise DetectionError(
            f"nothing servable in {model_dir}: files found {seen[:30] or 'none'}; supported kinds: "
            f"{', '.join(SUPPORTED_KINDS)}"
        )
    servable = [a for a in found if a.handler] or found
    if len(servable) > 1:
        names = ", ".join(f"{a.files[0]} ({a.kind})" for a in servable)
        raise DetectionError(
            f"several model candidates in {model_dir}: {names}. Choose one with ONEBOX_MODEL_FILE or "
            "model_file in onebox.toml (a path relative to the model directory)"
        )
    return servable[0]


def _script_facts(script: Path) -> dict:
    """Which toolkit functions a user script defines, from its syntax tree (nothing is executed)."""
    try:
        tree = ast.parse(script.read_text(encoding="utf-8", errors="replace"))
    except SyntaxError as exc:
        return {"functions": [], "syntax_error": f"line {exc.lineno}: {exc.msg}"}
    names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    names |= {
        t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)
    }
    toolkit = ("model_fn", "input_fn", "predict_fn", "output_fn", "transform_fn")
    return {"functions": sorted(n for n in names if n in toolkit)}


def detect(model_dir: Path, program: str | None = None, model_file: str | None = None) -> Artifact:
    """What ``model_dir`` holds: a user script (``code/<program>``) or one built-in artifact.

    ``model_file`` (ONEBOX_MODEL_FILE / onebox.toml) names the artifact when there are several.
    Raises :class:`DetectionError` when nothing, or more than one thing, is servable.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise DetectionError(f"model directory {model_dir} does not exist")
    script = model_dir / "code" / (program or DEFAULT_PROGRAM)
    if model_file:
        target = model_dir / model_file
        if not target.exists():
            raise DetectionError(f"model_file {model_file!r} not found in {model_dir}")
        art = probe_directory(target, model_dir) if target.is_dir() else probe_file(target, model_dir)
        found, seen = ([art] if art else []), [model_file]
        if art is None and not script.is_file():
            raise DetectionError(
                f"model_file {model_file!r} is not a recognised model; supported kinds: "
                f"{', '.join(SUPPORTED_KINDS)}"
            )
    else:
        found, seen = _candidates(_normalise(model_dir), model_dir)
    if not script.is_file():
        art = _choose(found, seen, model_dir, allow_none=False)
        assert art is not None
        return art
    try:
        inner = _choose(found, seen, model_dir, allow_none=True)
        ambiguity = ""
    except DetectionError as exc:
        inner, ambiguity = None, exc.message
    facts = _script_facts(script)
    uses_inner = "model_fn" not in facts["functions"] and "transform_fn" not in facts["functions"]
    details = {
        "program": script.name,
        "code_dir": str(script.parent),
        **facts,
        "inner": inner.to_dict() if inner is not None and inner.handler else None,
    }
    if ambiguity:
        details["inner_error"] = ambiguity
    reason = f"code/{script.name} found: SageMaker inference-toolkit user script"
    if inner is not None and uses_inner:
        reason += f"; no model_fn, so {inner.files[0]} ({inner.kind}) is loaded by its handler"
    devices = inner.devices if inner is not None and uses_inner else ("cpu", "cuda", "neuron")
    packages = ("sagemaker_inference",) + (inner.packages if inner is not None and uses_inner else ())
    rel = str(script.relative_to(model_dir))
    files = (rel,) + (inner.files if inner is not None else ())
    return Artifact(
        kind="user_script",
        handler="user_script",
        path=script,
        model_dir=model_dir,
        packages=packages,
        devices=devices,
        reason=reason,
        files=files,
        details=details,
    )


def check_compatible(artifact: Artifact, available_devices: list[str]) -> None:
    """Fail fast, before loading, when this image or host cannot run ``artifact``.

    ``available_devices`` are device names such as ``cpu``, ``cuda:0``, ``neuron:0-1``.
    """
    if artifact.kind == "user_script":
        facts = artifact.details
        if facts.get("syntax_error"):
            raise IncompatibleArtifact(f"{artifact.files[0]} has a syntax error at {facts['syntax_error']}")
        inner = facts.get("inner")
        if inner is None and not {"model_fn", "transform_fn"} & set(facts.get("functions", [])):
            why = facts.get("inner_error") or "no built-in model artifact was found beside it"
            raise IncompatibleArtifact(f"{artifact.files[0]} defines no model_fn and {why}")
    elif not artifact.handler:
        raise IncompatibleArtifact(f"{artifact.files[0]}: {artifact.reason}")
    elif artifact.handler not in HANDLERS:
        raise IncompatibleArtifact(
            f"{artifact.files[0]} recognised as {artifact.kind} ({artifact.reason}); this image has no handler "
            f"for it yet. Supported kinds: {', '.join(SUPPORTED_KINDS)}"
        )
    missing = [p for p in artifact.packages if importlib.util.find_spec(p) is None]
    if missing:
        raise IncompatibleArtifact(
            f"{artifact.files[0]} ({artifact.kind}) needs the Python package(s) {missing}, which this image "
            "lacks: install them (or use the image variant for this runtime)"
        )
    kinds = {d.partition(":")[0] for d in available_devices}
    if not kinds & set(artifact.devices):
        raise IncompatibleArtifact(
            f"{artifact.files[0]} ({artifact.kind}) runs only on {'/'.join(artifact.devices)}, and this host has "
            f"{', '.join(available_devices) or 'no devices'}"
        )


def describe_detection(artifact: Artifact) -> str:
    """A human-readable account of a detection, for ``onebox detect``."""
    lines = [
        f"kind:     {artifact.kind}",
        f"file(s):  {', '.join(artifact.files)}",
        f"handler:  {artifact.handler or '(none: needs code/inference.py)'}"
        + ("" if not artifact.handler or artifact.handler in HANDLERS else " (not available in this image)"),
        f"packages: {', '.join(artifact.packages) or '-'}",
        f"devices:  {', '.join(artifact.devices)}",
        f"why:      {artifact.reason}",
    ]
    inner = artifact.details.get("inner")
    if inner:
        lines.append(f"model:    {inner['files'][0]} ({inner['kind']}, handler {inner['handler']})")
    for key in ("opsets", "metadata", "custom_namespaces", "inner_error"):
        if artifact.details.get(key):
            lines.append(f"{key}: {artifact.details[key]}")
    return "\n".join(lines)


def probe_for(model_dir: Path, handler: str) -> Artifact | None:
    """The first artifact in ``model_dir`` that ``handler`` serves (each handler's ``probe``)."""
    found, _ = _candidates(_normalise(Path(model_dir)), Path(model_dir))
    return next((a for a in found if a.handler == handler), None)
