"""Per-artifact probes: what a file or directory is, from its bytes only (artifacts.md §2–§12).

Each probe returns an :class:`Artifact` naming the kind, the handler that would serve it
(``""`` when nothing can serve it without user code), the packages and devices it needs and why.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from handlers import sniff
from serving.types import Artifact

ANY_DEVICE = ("cpu", "cuda")
_CORE_NAMESPACES = {"aten", "prim", "quantized", "_caffe2", "profiler", "_quantized", "quantized_decomposed"}
_NAMESPACE = re.compile(rb"(?:ops|torch\.classes)\.(\w+)\.")
_NEURON_INF1 = re.compile(rb"ops\.neuron\.forward_(?:v2_)?\d+\(")
_ONNX_TYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64"}
_ONNX_TYPES |= {9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16"}
_STATE_DICT_GLOBALS = re.compile(
    r"^(collections\.OrderedDict|torch\._utils\._rebuild_\w+|torch\.\w*Storage|torch\.\w+)$"
)


def _artifact(path: Path, model_dir: Path, kind: str, handler: str, reason: str, **kw) -> Artifact:
    try:
        rel = str(path.relative_to(model_dir))
    except ValueError:
        rel = str(path)
    return Artifact(
        kind=kind, handler=handler, path=path, model_dir=model_dir, reason=reason, files=(rel,), **kw
    )


def probe_directory(path: Path, model_dir: Path) -> Artifact | None:
    """Directory formats (§11 step 1): TensorFlow SavedModel and its TF-TRT / Neuron sub-types."""
    pb = next((path / n for n in ("saved_model.pb", "saved_model.pbtxt") if (path / n).is_file()), None)
    if pb is None:
        return None
    hits = sniff.file_contains(pb, (b"TRTEngineOp", b"NeuronOp"))
    trt_assets = sorted(p.name for p in (path / "assets").glob("trt-serialized-engine.*"))
    if b"TRTEngineOp" in hits or trt_assets:
        return _artifact(
            path,
            model_dir,
            "tf_trt",
            "tf_trt",
            "SavedModel with TRTEngineOp nodes (TF-TRT)",
            packages=("tensorflow",),
            devices=("cuda",),
            details={"engine_assets": trt_assets},
        )
    if b"NeuronOp" in hits:
        return _artifact(
            path,
            model_dir,
            "tf_neuron",
            "tf_neuron",
            "SavedModel with NeuronOp nodes (tensorflow-neuron)",
            packages=("tensorflow",),
            devices=("neuron",),
        )
    return _artifact(
        path,
        model_dir,
        "tf_savedmodel",
        "tf_savedmodel",
        f"{pb.name} found: TensorFlow SavedModel",
        packages=("tensorflow",),
        devices=ANY_DEVICE,
    )


def probe_file(path: Path, model_dir: Path) -> Artifact | None:
    """One file by content, most specific first (§11 step 2); None if it is not a model."""
    try:
        data = sniff.head(path)
    except OSError:
        return None
    if data.startswith(b"PK\x03\x04"):
        return _probe_zip(path, model_dir)
    trt = _tensorrt_offset(data)
    if trt is not None:
        return _artifact(
            path,
            model_dir,
            "tensorrt_engine",
            "tensorrt_engine",
            f"starts with TensorRT engine magic {data[trt : trt + 4]!r}",
            packages=("tensorrt",),
            devices=("cuda",),
            details={"header_offset": trt},
        )
    if data[4:8] == b"ORTM":
        return _artifact(
            path,
            model_dir,
            "ort",
            "onnx",
            "ORT-format flatbuffer (bytes 4..7 'ORTM')",
            packages=("onnxruntime",),
            devices=ANY_DEVICE,
        )
    if data.startswith(b"\x89HDF\r\n\x1a\n"):
        return _artifact(
            path,
            model_dir,
            "keras_h5",
            "keras",
            "HDF5 file (legacy Keras .h5)",
            packages=("keras",),
            devices=ANY_DEVICE,
        )
    if data.startswith(sniff.TORCH_LEGACY_MAGIC):
        return _artifact(
            path,
            model_dir,
            "torch_legacy_save",
            "",
            "legacy (non-zip) torch.save file: weights or a "
            "pickled module, not servable without code/inference.py (model_fn)",
            packages=("torch",),
        )
    if data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return _probe_pickle(path, model_dir)
    if data.startswith(b"tree\nversion=v"):
        return _artifact(
            path,
            model_dir,
            "lightgbm",
            "lightgbm",
            "LightGBM text model ('tree\\nversion=')",
            packages=("lightgbm",),
            devices=("cpu",),
        )
    if data.startswith(b'{"learner"') or (
        data[:2] in (b"{L", b"{i", b"{U", b"{l", b"{I") and b"learner" in data[:64]
    ):
        return _artifact(
            path,
            model_dir,
            "xgboost",
            "xgboost",
            "XGBoost JSON/UBJSON model ('learner' object)",
            packages=("xgboost",),
            devices=ANY_DEVICE,
        )
    if data[:1] == b"\x08" and not path.name.endswith((".onnx.data", ".onnx_data")):
        summary = sniff.onnx_summary(path)
        if summary is not None:
            return _onnx(path, model_dir, summary)
    return None


def _tensorrt_offset(data: bytes) -> int | None:
    if data[:4] in (b"ftrt", b"ptrt"):
        return 0
    # Ultralytics-style exports prefix a uint32 LE length and JSON metadata.
    if len(data) >= 8 and data[4:5] == b"{":
        n = int.from_bytes(data[:4], "little")
        if data[4 + n : 8 + n] in (b"ftrt", b"ptrt"):
            return 4 + n
    return None


def _onnx(path: Path, model_dir: Path, s: dict) -> Artifact:
    def spec(v):
        dims = [d if isinstance(d, int) and d > 0 else -1 for d in (v["dims"] or [])]
        return {
            "name": v["name"],
            "dtype": _ONNX_TYPES.get(v["elem_type"], str(v["elem_type"])),
            "shape": dims,
        }

    details = {
        "ir_version": s["ir_version"],
        "opsets": s["opsets"],
        "producer": s["producer"],
        "external_data": s["external_data"],
        "inputs": [spec(i) for i in s["inputs"]],
        "outputs": [spec(o) for o in s["outputs"]],
    }
    reason = f"ONNX ModelProto (ir_version {s['ir_version']}, opsets {s['opsets']})"
    return _artifact(
        path,
        model_dir,
        "onnx",
        "onnx",
        reason,
        packages=("onnxruntime",),
        devices=ANY_DEVICE,
        details=details,
    )


def _probe_pickle(path: Path, model_dir: Path) -> Artifact:
    globs = sniff.pickle_globals(sniff.head(path, 1 << 20))
    libraries = sorted(
        {g.split(".")[0] for g in globs} - {"builtins", "copyreg", "collections", "numpy", "_codecs"}
    )
    known = {
        "sklearn": "scikit-learn",
        "xgboost": "xgboost",
        "lightgbm": "lightgbm",
        "torch_tensorrt": "torch_tensorrt",
    }
    lib = next((name for name in known if name in libraries), None)
    kind = f"{lib}_pickle" if lib else "pickle"
    return _artifact(
        path,
        model_dir,
        kind,
        "sklearn_pickle" if lib == "sklearn" else "",
        f"Python pickle referencing {', '.join(libraries) or 'no modules'}; unpickling runs code, "
        "so it is served only through code/inference.py (model_fn)",
        packages=tuple(libraries),
        devices=("cpu",),
        details={"globals": sorted(globs)[:50]},
    )


def _probe_zip(path: Path, model_dir: Path) -> Artifact | None:
    names = sniff.zip_members(path)
    if names is None:
        return None
    members = sniff.strip_root(names)
    if (
        "archive_format" in members
        and sniff.read_member(path, members["archive_format"], 16).strip() == b"pt2"
    ):
        return _probe_pt2(path, model_dir, members)
    if "serialized_exported_program.json" in members:
        return _artifact(
            path,
            model_dir,
            "torch_export_legacy",
            "torch_export_legacy",
            "older torch.export.save layout (serialized_exported_program.json); re-save it with "
            "torch.export.save from the torch release in this image",
            packages=("torch",),
        )
    if "constants.pkl" in members and any(m.startswith("code/") for m in members):
        return _probe_torchscript(path, model_dir, members)
    if "data.pkl" in members:
        globs = sniff.pickle_globals(sniff.read_member(path, members["data.pkl"]))
        if all(_STATE_DICT_GLOBALS.match(g) for g in globs):
            what, kind = "a state_dict (weights only, no model code)", "torch_state_dict"
        else:
            what, kind = (
                "a pickled nn.Module (needs its class source and weights_only=False)",
                "torch_pickled_module",
            )
        return _artifact(
            path,
            model_dir,
            kind,
            "",
            f"torch.save archive holding {what}; not servable without code/inference.py defining model_fn",
            packages=("torch",),
            devices=ANY_DEVICE,
            details={"globals": sorted(globs)[:50]},
        )
    if "config.json" in members and "metadata.json" in members:
        return _artifact(
            path,
            model_dir,
            "keras",
            "keras",
            "zip with config.json + metadata.json (Keras v3 .keras)",
            packages=("keras",),
            devices=ANY_DEVICE,
        )
    if "MAR-INF/MANIFEST.json" in names:
        return _artifact(
            path,
            model_dir,
            "torchserve_mar",
            "",
            "TorchServe .mar archive: unpack it and serve the "
            "model file inside (with its handler as code/inference.py)",
        )
    return None


def _code_text(path: Path, members: dict[str, str]) -> bytes:
    return b"\n".join(
        sniff.read_member(path, full)
        for m, full in members.items()
        if m.startswith("code/") and m.endswith(".py")
    )


# Compiled TorchScript flavours, most specific first: (kind, what marks it in code/ — a module
# folder or a regular expression on the code text —, why, package, device).
_TORCHSCRIPT_FLAVOURS = (
    ("torch_tensorrt_ts", None, re.compile(rb"ops\.tensorrt\.execute_engine\(|torch\.classes\.tensorrt\.Engine"),
     "TorchScript calling tensorrt::execute_engine (Torch-TensorRT)", "torch_tensorrt", "cuda"),
    ("torch_neuronx", "code/__torch__/torch_neuronx/", re.compile(rb"ops\.neuron\.forward_v2\("),
     "TorchScript calling neuron::forward_v2 (torch-neuronx, Inf2/Trn)", "torch_neuronx", "neuron"),
    ("torch_neuron", "code/__torch__/torch_neuron/", _NEURON_INF1,
     "TorchScript calling neuron::forward_<n> (torch-neuron, Inf1)", "torch_neuron", "neuron"),
)  # fmt: skip


def _probe_torchscript(path: Path, model_dir: Path, members: dict[str, str]) -> Artifact:
    code = _code_text(path, members)
    namespaces = sorted({n.decode() for n in _NAMESPACE.findall(code)} - _CORE_NAMESPACES)
    details = {"custom_namespaces": namespaces, "traced": "traced_inputs.pkl" in members}
    for kind, folder, marker, reason, package, device in _TORCHSCRIPT_FLAVOURS:
        if (folder and any(m.startswith(folder) for m in members)) or marker.search(code):
            return _artifact(
                path,
                model_dir,
                kind,
                kind,
                reason,
                packages=("torch", package),
                devices=(device,),
                details=details,
            )
    details["bakes_cuda_device"] = bool(re.search(rb'"cuda(:\d+)?"', code))
    reason = "zip with constants.pkl and code/ (TorchScript archive)"
    if namespaces:
        reason += f"; uses extension ops {namespaces}: import their package first"
    return _artifact(
        path,
        model_dir,
        "torchscript",
        "torchscript",
        reason,
        packages=("torch",),
        devices=ANY_DEVICE,
        details=details,
    )


def _probe_pt2(path: Path, model_dir: Path, members: dict[str, str]) -> Artifact | None:
    aoti_meta = [
        m for m in members if m.startswith("data/aotinductor/") and m.endswith("wrapper_metadata.json")
    ]
    if any(m.startswith("data/aotinductor/") for m in members):
        meta = json.loads(sniff.read_member(path, members[aoti_meta[0]])) if aoti_meta else {}
        device = meta.get("AOTI_DEVICE_KEY") or "cpu"
        return _artifact(
            path,
            model_dir,
            "torch_aoti",
            "torch_aoti",
            f"PT2 archive with data/aotinductor/ (AOTInductor package compiled for {device})",
            packages=("torch",),
            devices=(device,),
            details={"metadata": meta},
        )
    if any(m.startswith("data/executorch/") for m in members):
        return _artifact(
            path, model_dir, "executorch", "", "PT2 archive with an ExecuTorch payload: out of scope"
        )
    models = [m for m in members if m.startswith("models/") and m.endswith(".json")]
    if not models:
        return None
    text = sniff.read_member(path, members[models[0]], 64 << 20)
    program = json.loads(text)
    namespaces = sorted({n.decode() for n in re.findall(rb"torch\.ops\.(\w+)\.", text)} - _CORE_NAMESPACES)
    details = {
        "model_json": members[models[0]],
        "torch_version": program.get("torch_version"),
        "custom_namespaces": namespaces,
    }
    if b"tensorrt.execute_engine" in text:
        return _artifact(
            path,
            model_dir,
            "torch_tensorrt_ep",
            "torch_tensorrt_ep",
            "ExportedProgram calling tensorrt.execute_engine (Torch-TensorRT)",
            packages=("torch", "torch_tensorrt"),
            devices=("cuda",),
            details=details,
        )
    devices = {
        t.get("device", {}).get("type") for t in program["graph_module"]["graph"]["tensor_values"].values()
    }
    details["recorded_devices"] = sorted(d for d in devices if d)
    return _artifact(
        path,
        model_dir,
        "torch_export",
        "torch_export",
        "PT2 archive with models/*.json (torch.export ExportedProgram)",
        packages=("torch",),
        devices=ANY_DEVICE,
        details=details,
    )
