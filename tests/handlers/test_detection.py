"""Detection: artifacts recognised by bytes and zip members, the choice among candidates, compatibility."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import zipfile

import pytest

from handlers.base import DetectionError
from handlers.registry import check_compatible, describe_detection, detect, handler_class
from serving.errors import ServingError
from tests.handlers.conftest import build_onnx


def write_zip(path, members: dict[str, bytes], root: str | None = "archive"):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(f"{root}/{name}" if root else name, data)
    return path


def torchscript_zip(path, code: bytes):
    return write_zip(
        path,
        {
            "constants.pkl": b"\x80\x02).",
            "data.pkl": b"\x80\x02}.",
            "version": b"3",
            "code/__torch__.py": code,
        },
    )


def only(tmp_path, name: str, data: bytes):
    (tmp_path / name).write_bytes(data)
    return detect(tmp_path)


# ---------------------------------------------------------------- real exported files


def test_traced_torchscript_is_detected_as_torchscript(tmp_path, torch_artifacts):
    src, _ = torch_artifacts
    (tmp_path / "model.pt").write_bytes((src / "traced.pt").read_bytes())
    art = detect(tmp_path)
    assert (art.kind, art.handler, art.packages) == ("torchscript", "torchscript", ("torch",))
    assert art.details["traced"] is True and set(art.devices) == {"cpu", "cuda"}


@pytest.mark.parametrize("name", ["dynamic.pt2", "static.pt2"])
def test_exported_program_is_detected_with_its_model_json(tmp_path, torch_artifacts, name):
    src, _ = torch_artifacts
    (tmp_path / name).write_bytes((src / name).read_bytes())
    art = detect(tmp_path)
    assert art.kind == "torch_export" and art.details["model_json"].endswith("models/model.json")
    assert art.details["recorded_devices"] == ["cpu"]


def test_state_dict_is_recognised_but_needs_a_user_script(tmp_path, torch_artifacts):
    src, _ = torch_artifacts
    (tmp_path / "weights.pt").write_bytes((src / "weights.pt").read_bytes())
    art = detect(tmp_path)
    assert art.kind == "torch_state_dict" and art.handler == ""
    with pytest.raises(ServingError, match="inference.py"):
        check_compatible(art, ["cpu"])


def test_pickled_module_is_told_apart_from_a_state_dict(tmp_path, torch_artifacts):
    src, _ = torch_artifacts
    (tmp_path / "whole.pt").write_bytes((src / "whole.pt").read_bytes())
    art = detect(tmp_path)
    assert art.kind == "torch_pickled_module"
    assert any(g.startswith("torch.nn.modules") for g in art.details["globals"])


@pytest.mark.slow
def test_aoti_package_is_detected_with_its_compile_device(tmp_path, aoti_package):
    (tmp_path / "model.pt2").write_bytes(aoti_package.read_bytes())
    art = detect(tmp_path)
    assert art.kind == "torch_aoti" and art.devices == ("cpu",)
    assert art.details["metadata"]["AOTI_DEVICE_KEY"] == "cpu"


def test_onnx_walk_reports_opsets_and_symbolic_batch(tmp_path):
    build_onnx(tmp_path / "model.onnx", ir_version=10, opset=18)
    art = detect(tmp_path)
    assert art.kind == "onnx" and art.details["ir_version"] == 10 and art.details["opsets"] == {"": 18}
    assert art.details["inputs"] == [{"name": "x", "dtype": "float32", "shape": [-1, 4]}]
    assert art.details["external_data"] is False


def test_onnx_walk_reports_static_batch_and_external_data(tmp_path):
    onnx = pytest.importorskip("onnx")
    build_onnx(tmp_path / "tmp.onnx", batch=2)
    model = onnx.load(str(tmp_path / "tmp.onnx"))
    (tmp_path / "tmp.onnx").unlink()
    onnx.save_model(
        model,
        str(tmp_path / "model.onnx"),
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    art = detect(tmp_path)
    assert art.details["inputs"][0]["shape"] == [2, 4] and art.details["external_data"] is True


def test_old_style_onnx_initializers_are_not_listed_as_inputs(tmp_path):
    onnx = pytest.importorskip("onnx")
    build_onnx(tmp_path / "model.onnx")
    model = onnx.load(str(tmp_path / "model.onnx"))
    model.graph.input.append(onnx.helper.make_tensor_value_info("W", onnx.TensorProto.FLOAT, [4, 3]))
    onnx.save(model, str(tmp_path / "model.onnx"))
    assert [i["name"] for i in detect(tmp_path).details["inputs"]] == ["x"]


# ---------------------------------------------------------------- synthetic bytes for kinds not buildable here


@pytest.mark.parametrize(
    ("code", "kind", "device"),
    [
        (b"ops.tensorrt.execute_engine([x], self.engine)", "torch_tensorrt_ts", "cuda"),
        (b"_0 = ops.neuron.forward_v2([x], self.model)", "torch_neuronx", "neuron"),
        (b"_0 = ops.neuron.forward_v2_1([x], self.model)", "torch_neuron", "neuron"),
        (b"_0 = ops.neuron.forward_1([x])", "torch_neuron", "neuron"),
        (b"return torch.relu(x)", "torchscript", "cpu"),
    ],
)
def test_torchscript_subtype_comes_from_code_text(tmp_path, code, kind, device):
    torchscript_zip(tmp_path / "model.pt", b"def forward(self, x):\n    " + code + b"\n")
    art = detect(tmp_path)
    assert art.kind == kind and device in art.devices


def test_torchscript_extension_namespace_is_reported(tmp_path):
    torchscript_zip(tmp_path / "model.pt", b"return ops.my_ext.fancy(x)\n")
    art = detect(tmp_path)
    assert art.details["custom_namespaces"] == ["my_ext"] and "my_ext" in art.reason


def test_tensorrt_engine_magic_is_recognised_even_after_a_json_prefix(tmp_path):
    assert only(tmp_path, "model.plan", b"ftrt" + bytes(64)).kind == "tensorrt_engine"
    meta = json.dumps({"batch": 1}).encode()
    (tmp_path / "model.plan").unlink()
    art = only(tmp_path, "model.engine", len(meta).to_bytes(4, "little") + meta + b"ftrt" + bytes(16))
    assert art.kind == "tensorrt_engine" and art.details["header_offset"] == 4 + len(meta)


def test_tensorrt_engine_is_refused_with_no_handler_message(tmp_path):
    art = only(tmp_path, "model.engine", b"ftrt" + bytes(64))
    with pytest.raises(ServingError, match="recognised as tensorrt_engine.*no handler for it yet"):
        check_compatible(art, ["cpu", "cuda:0"])


@pytest.mark.parametrize(
    ("marker", "kind"), [(b"TRTEngineOp", "tf_trt"), (b"NeuronOp", "tf_neuron"), (b"MatMul", "tf_savedmodel")]
)
def test_saved_model_subtype_comes_from_an_op_scan(tmp_path, marker, kind):
    (tmp_path / "variables").mkdir()
    (tmp_path / "saved_model.pb").write_bytes(b"\x08\x01\x12\x40" + b"\x00" * 20 + marker + b"\x00" * 20)
    art = detect(tmp_path)
    assert art.kind == kind and art.packages == ("tensorflow",)


def test_tf_serving_layout_picks_the_highest_version(tmp_path):
    for version in ("1", "10", "2"):
        (tmp_path / "m" / version).mkdir(parents=True)
        (tmp_path / "m" / version / "saved_model.pb").write_bytes(b"\x08\x01\x12\x00")
    assert detect(tmp_path).path == tmp_path / "m" / "10"


def test_synthetic_aoti_cuda_package_needs_a_gpu(tmp_path):
    meta = json.dumps({"AOTI_DEVICE_KEY": "cuda", "AOTI_COMPUTE_CAPABILITY": "90"}).encode()
    write_zip(
        tmp_path / "model.pt2",
        {
            "archive_format": b"pt2",
            "data/aotinductor/model/abc.wrapper.so": b"\x7fELF",
            "data/aotinductor/model/abc.wrapper_metadata.json": meta,
        },
    )
    art = detect(tmp_path)
    assert art.kind == "torch_aoti" and art.devices == ("cuda",)
    pytest.importorskip("torch")
    with pytest.raises(ServingError, match="runs only on cuda.*cpu"):
        check_compatible(art, ["cpu"])
    check_compatible(art, ["cpu", "cuda:0"])


def test_torch_tensorrt_exported_program_is_recognised(tmp_path):
    program = json.dumps(
        {"graph_module": {"graph": {"nodes": [{"target": "torch.ops.tensorrt.execute_engine.default"}]}}}
    )
    write_zip(tmp_path / "trt.ep", {"archive_format": b"pt2", "models/model.json": program.encode()})
    art = detect(tmp_path)
    assert art.kind == "torch_tensorrt_ep" and art.packages == ("torch", "torch_tensorrt")


@pytest.mark.parametrize(
    ("name", "data", "kind"),
    [
        ("model.ort", b"\x1c\x00\x00\x00ORTM" + bytes(32), "ort"),
        ("model.h5", b"\x89HDF\r\n\x1a\n" + bytes(32), "keras_h5"),
        ("xgboost-model", b'{"learner":{"attributes":{}},"version":[3,2,0]}', "xgboost"),
        ("model.txt", b"tree\nversion=v4\nnum_class=1\n", "lightgbm"),
        (
            "model.pkl",
            b"\x80\x02csklearn.linear_model._logistic\nLogisticRegression\nq\x00)\x81q\x01}b.",
            "sklearn_pickle",
        ),
    ],
)
def test_other_formats_are_recognised_by_magic(tmp_path, name, data, kind):
    assert only(tmp_path, name, data).kind == kind


def test_keras_v3_zip_is_recognised(tmp_path):
    write_zip(
        tmp_path / "model.keras",
        {"config.json": b"{}", "metadata.json": b"{}", "model.weights.h5": b""},
        root=None,
    )
    assert detect(tmp_path).kind == "keras"


def test_protobuf_lookalike_garbage_is_not_onnx(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07" + bytes(range(256)) * 4)
    with pytest.raises(DetectionError, match="nothing servable"):
        detect(tmp_path)


# ---------------------------------------------------------------- choosing


def test_empty_directory_lists_files_and_supported_kinds(tmp_path):
    (tmp_path / "README.md").write_text("hi")
    with pytest.raises(DetectionError, match=r"README\.md.*supported kinds: torchscript"):
        detect(tmp_path)


def test_two_models_are_ambiguous_until_model_file_chooses(tmp_path, torch_artifacts):
    src, _ = torch_artifacts
    build_onnx(tmp_path / "model.onnx")
    (tmp_path / "model.pt").write_bytes((src / "traced.pt").read_bytes())
    with pytest.raises(
        DetectionError, match=r"model\.onnx \(onnx\).*model\.pt \(torchscript\).*ONEBOX_MODEL_FILE"
    ):
        detect(tmp_path)
    assert detect(tmp_path, model_file="model.pt").kind == "torchscript"


def test_single_wrapping_folder_is_descended_and_sidecars_ignored(tmp_path):
    (tmp_path / "export").mkdir()
    build_onnx(tmp_path / "export" / "model.onnx")
    (tmp_path / "export" / "model.onnx.data").write_bytes(b"")
    (tmp_path / ".DS_Store").write_bytes(b"junk")
    art = detect(tmp_path)
    assert art.files == ("export/model.onnx",)


def test_user_script_wins_and_keeps_the_builtin_artifact_as_inner(tmp_path):
    build_onnx(tmp_path / "model.onnx")
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "inference.py").write_text("def input_fn(body, ct):\n    return body\n")
    art = detect(tmp_path)
    assert (art.kind, art.handler) == ("user_script", "user_script")
    assert art.details["inner"]["kind"] == "onnx" and art.details["functions"] == ["input_fn"]
    assert "onnxruntime" in art.packages
    check_compatible(art, ["cpu"])


def test_program_name_selects_another_script(tmp_path):
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "custom.py").write_text("def model_fn(d):\n    return None\n")
    with pytest.raises(DetectionError):
        detect(tmp_path)
    art = detect(tmp_path, program="custom.py")
    assert art.path.name == "custom.py" and art.details["inner"] is None
    check_compatible(art, ["cpu"])


def test_user_script_without_model_fn_or_model_is_refused(tmp_path):
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "inference.py").write_text("def predict_fn(x, m):\n    return x\n")
    with pytest.raises(ServingError, match="no model_fn"):
        check_compatible(detect(tmp_path), ["cpu"])


def test_missing_package_is_named(tmp_path):
    build_onnx(tmp_path / "model.onnx")
    art = dataclasses.replace(detect(tmp_path), packages=("onebox_no_such_runtime",))
    with pytest.raises(ServingError, match="onebox_no_such_runtime"):
        check_compatible(art, ["cpu"])


def test_describe_detection_names_kind_file_and_reason(tmp_path):
    build_onnx(tmp_path / "model.onnx")
    text = describe_detection(detect(tmp_path))
    assert "kind:     onnx" in text and "model.onnx" in text and "ONNX ModelProto" in text


def test_handler_registry_imports_handlers_lazily():
    assert handler_class("onnx").name == "onnx"
    with pytest.raises(ServingError, match="no handler named"):
        handler_class("tensorrt_engine")


def test_detect_imports_no_framework(tmp_path, torch_artifacts):
    src, _ = torch_artifacts
    for name in ("traced.pt", "dynamic.pt2"):
        (tmp_path / name).write_bytes((src / name).read_bytes())
    build_onnx(tmp_path / "model.onnx")
    script = (
        "import sys; from pathlib import Path; from handlers.registry import detect, describe_detection\n"
        f"for f in ('traced.pt', 'dynamic.pt2', 'model.onnx'): describe_detection(detect(Path({str(tmp_path)!r}), model_file=f))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnxruntime', 'onnx')))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
