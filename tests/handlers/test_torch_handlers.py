"""TorchScript, ExportedProgram and AOTInductor handlers on CPU, compared with running torch directly."""

from __future__ import annotations

import numpy as np
import pytest

from handlers.registry import check_compatible, detect, handler_class
from serving.errors import BadRequest, ConfigError, ServingError
from serving.types import BatchMode, Device, ModelConfig

torch = pytest.importorskip("torch")


def loaded(path, config=ModelConfig(), device="cpu"):
    art = detect(path.parent, model_file=path.name)
    check_compatible(art, ["cpu"])
    handler = handler_class(art.handler)()
    handler.load(art, Device.parse(device), config)
    return handler


def expected(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_torchscript_predicts_like_the_module_at_any_batch(torch_artifacts):
    src, model = torch_artifacts
    handler = loaded(src / "traced.pt")
    assert [s.name for s in handler.signature.inputs] == ["x"]
    assert handler.signature.batch is BatchMode.DYNAMIC
    for rows in (1, 2, 7):
        x = np.random.default_rng(rows).standard_normal((rows, 4)).astype(np.float32)
        out = handler.predict({"x": x})
        np.testing.assert_allclose(out["output"], expected(model, x), rtol=1e-5, atol=1e-6)


def test_torchscript_declared_inputs_give_shapes_outputs_and_warmup(torch_artifacts):
    src, _ = torch_artifacts
    config = ModelConfig(extra={"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}]})
    handler = loaded(src / "traced.pt", config)
    assert handler.signature.inputs[0].shape == (-1, 4)
    assert [(o.name, o.shape) for o in handler.signature.outputs] == [("output", (-1, 3))]
    handler.warmup([1, 4])


def test_torchscript_missing_input_is_a_bad_request(torch_artifacts):
    src, _ = torch_artifacts
    with pytest.raises(BadRequest, match="missing input"):
        loaded(src / "traced.pt").predict({"y": np.zeros((1, 4), np.float32)})


def test_bf16_precision_casts_inputs_and_returns_float32(torch_artifacts):
    src, model = torch_artifacts
    handler = loaded(src / "traced.pt", ModelConfig(precision="bf16"))
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    out = handler.predict({"x": x})["output"]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected(model, x), atol=0.1)


def test_unknown_precision_is_a_config_error(torch_artifacts):
    src, _ = torch_artifacts
    with pytest.raises(ConfigError, match="precision"):
        loaded(src / "traced.pt", ModelConfig(precision="int3"))


def test_dynamic_exported_program_reads_its_range_and_predicts(torch_artifacts):
    src, model = torch_artifacts
    handler = loaded(src / "dynamic.pt2")
    sig = handler.signature
    assert (sig.batch, sig.max_batch) == (BatchMode.DYNAMIC, 64)
    assert sig.inputs[0].name == "x" and sig.inputs[0].shape == (-1, 4) and sig.outputs[0].shape == (-1, 3)
    x = np.random.default_rng(5).standard_normal((5, 4)).astype(np.float32)
    np.testing.assert_allclose(handler.predict({"x": x})["output"], expected(model, x), rtol=1e-5, atol=1e-6)
    with pytest.raises(BadRequest, match="maximum 64"):
        handler.predict({"x": np.zeros((65, 4), np.float32)})


def test_static_exported_program_is_fixed_and_refuses_other_batches(torch_artifacts):
    src, model = torch_artifacts
    handler = loaded(src / "static.pt2")
    assert (handler.signature.batch, handler.signature.batch_sizes) == (BatchMode.FIXED, (2,))
    x = np.random.default_rng(2).standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_allclose(handler.predict({"x": x})["output"], expected(model, x), rtol=1e-5, atol=1e-6)
    with pytest.raises(BadRequest, match=r"compiled for batch sizes \[2\]"):
        handler.predict({"x": np.zeros((3, 4), np.float32)})
    handler.warmup([2])


@pytest.mark.slow
def test_aoti_package_predicts_and_enforces_its_static_batch(aoti_package, torch_artifacts):
    _, model = torch_artifacts
    handler = loaded(aoti_package)
    sig = handler.signature
    assert (sig.batch, sig.batch_sizes, sig.inputs[0].shape, sig.inputs[0].dtype) == (
        BatchMode.FIXED,
        (2,),
        (2, 4),
        "float32",
    )
    x = np.random.default_rng(3).standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_allclose(
        handler.predict({"input": x})["output"], expected(model, x), rtol=1e-5, atol=1e-6
    )
    # AOTI itself would run batch 5 silently with garbage rows; the handler must refuse it.
    with pytest.raises(BadRequest, match="batch size"):
        handler.predict({"input": np.zeros((5, 4), np.float32)})
    with pytest.raises(BadRequest, match="shape"):
        handler.predict({"input": np.zeros((2, 5), np.float32)})


@pytest.mark.slow
def test_cpu_aoti_package_is_refused_on_cuda(aoti_package):
    art = detect(aoti_package.parent)
    with pytest.raises(ServingError, match="compiled for cpu; it cannot run on cuda:0"):
        handler_class("torch_aoti")().load(art, Device("cuda", 0), ModelConfig())


@pytest.mark.slow
def test_aoti_precision_other_than_compiled_is_refused(aoti_package):
    art = detect(aoti_package.parent)
    with pytest.raises(ConfigError, match="fixed at compile time"):
        handler_class("torch_aoti")().load(art, Device("cpu"), ModelConfig(precision="fp16"))


def _with_wrapper(package, wrapper_bytes, dest):
    """A copy of ``package`` whose compiled wrapper is replaced by ``wrapper_bytes``."""
    import zipfile

    with zipfile.ZipFile(package) as src, zipfile.ZipFile(dest, "w") as out:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith(".wrapper.so"):
                data = wrapper_bytes
            out.writestr(item, data)
    return dest


@pytest.mark.slow
def test_aoti_wrapper_with_its_own_libstdcxx_is_refused_before_it_is_loaded(
    aoti_package, shared_objects, tmp_path
):
    from handlers.torch_aoti import IncompatibleBuild, check_runtime_linkage

    check_runtime_linkage(aoti_package)  # this machine's compiler links libstdc++ dynamically
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    _with_wrapper(aoti_package, shared_objects["static"].read_bytes(), bad_dir / "model.pt2")
    art = detect(bad_dir)
    assert art.handler == "torch_aoti"
    with pytest.raises(IncompatibleBuild, match=r"own copy of libstdc\+\+.*CXX=/usr/bin/g\+\+"):
        handler_class("torch_aoti")().load(art, Device("cpu"), ModelConfig())
    # the same package with the dynamically linked build of that library passes
    ok_dir = tmp_path / "ok"
    ok_dir.mkdir()
    check_runtime_linkage(
        _with_wrapper(aoti_package, shared_objects["dynamic"].read_bytes(), ok_dir / "model.pt2")
    )


@pytest.mark.slow
def test_aoti_cuda_graphs_of_a_dynamic_batch_need_batch_sizes(aoti_package, monkeypatch):
    # one graph per batch size and every batch padded up to one: a dynamic package without
    # batch_sizes is refused at load, not left to run its runtime unsynchronised from two lanes
    import dataclasses

    import handlers.torch_aoti as torch_aoti

    art = detect(aoti_package.parent)
    as_cuda = dataclasses.replace(art, details={**art.details, "metadata": {"AOTI_DEVICE_KEY": "cuda"}})
    signature, unknown = torch_aoti.read_wrapper_signature(aoti_package)
    assert signature.batch_sizes == (2,) and unknown == []  # compiled for batch 2: its one size is graphed
    dynamic = dataclasses.replace(signature, batch_sizes=())
    monkeypatch.setattr(torch_aoti, "read_wrapper_signature", lambda path, declared=None: (dynamic, []))
    with pytest.raises(ConfigError, match="needs batch_sizes in onebox.toml"):
        handler_class("torch_aoti")().load(as_cuda, Device("cuda", 0), ModelConfig(cuda_graphs=True))


@pytest.mark.slow
def test_aoti_warms_up_only_inputs_whose_shape_it_knows(aoti_package, monkeypatch, caplog):
    # random inputs of a guessed rank would run (AOTI checks no shapes by default) and have
    # graphs captured for shapes no request has
    import dataclasses

    import handlers.torch_aoti as torch_aoti
    from serving.types import TensorSpec

    art = detect(aoti_package.parent)
    known = handler_class("torch_aoti")()
    known.load(art, Device("cpu"), ModelConfig())
    calls = []
    monkeypatch.setattr(known, "predict", lambda inputs: calls.append(inputs["input"].shape))
    known.warmup([2])
    assert calls == [(2, 4)]

    signature, _ = torch_aoti.read_wrapper_signature(aoti_package)
    guessed = dataclasses.replace(signature, inputs=(TensorSpec("input", "float32", (-1,)),))
    monkeypatch.setattr(
        torch_aoti, "read_wrapper_signature", lambda path, declared=None: (guessed, ["input"])
    )
    unknown = handler_class("torch_aoti")()
    with caplog.at_level("WARNING"):
        unknown.load(art, Device("cpu"), ModelConfig())
    assert "not in this AOTInductor package's wrapper: no warm-up" in caplog.text
    monkeypatch.setattr(unknown, "predict", lambda inputs: calls.append(inputs["input"].shape))
    unknown.warmup([1, 2])
    assert calls == [(2, 4)]
