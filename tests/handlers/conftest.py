"""Tiny models built from code for the handler tests."""

from __future__ import annotations

import numpy as np
import pytest


def build_onnx(path, batch: int | str = "batch", ir_version: int = 10, opset: int = 18):
    """y = relu(x @ W + b) with x: [batch, 4] -> y: [batch, 3]; returns (W, b)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["z"]),
            helper.make_node("Relu", ["z"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    onnx.save(model, str(path))
    return w, b


def make_mlp():
    """A small torch MLP in eval mode whose forward takes ``x``."""
    torch = pytest.importorskip("torch")

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden, self.out = torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.out(torch.relu(self.hidden(x)))

    torch.manual_seed(0)
    return MLP().eval()


@pytest.fixture(scope="session")
def torch_artifacts(tmp_path_factory):
    """TorchScript (traced), ExportedProgram (dynamic and static batch), state_dict and pickled module."""
    torch = pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("torch")
    model = make_mlp()
    x = torch.randn(2, 4)
    torch.jit.save(torch.jit.trace(model, x), str(out / "traced.pt"))
    dyn = torch.export.export(
        model, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=64)}}
    )
    torch.export.save(dyn, str(out / "dynamic.pt2"))
    torch.export.save(torch.export.export(model, (x,)), str(out / "static.pt2"))
    torch.save(model.state_dict(), str(out / "weights.pt"))
    torch.save(torch.nn.Linear(4, 3), str(out / "whole.pt"))
    return out, model


@pytest.fixture(scope="session")
def aoti_package(tmp_path_factory, torch_artifacts):
    """A CPU AOTInductor package compiled for batch 2 (needs a C++ compiler; ~30 s)."""
    torch = pytest.importorskip("torch")
    _, model = torch_artifacts
    path = tmp_path_factory.mktemp("aoti") / "model.pt2"
    try:
        torch._inductor.aoti_compile_and_package(
            torch.export.export(model, (torch.randn(2, 4),)), package_path=str(path)
        )
    except Exception as exc:  # no compiler toolchain on this host
        pytest.skip(f"AOTInductor compilation unavailable here: {type(exc).__name__}: {exc}")
    return path


REGEX_SOURCE = """
#include <regex>
#include <string>
// what an AOTInductor wrapper does at load: parse a device string with std::regex
extern "C" int parse_device(const char* s) {
    std::smatch m;
    std::string text(s);
    return std::regex_match(text, m, std::regex("(cpu|cuda)(:([0-9]+))?")) ? 1 : 0;
}
"""


@pytest.fixture(scope="session")
def shared_objects(tmp_path_factory):
    """Two builds of one std::regex library: ``dynamic`` (libstdc++.so.6 NEEDED) and ``static``
    (``-static-libstdc++``: its own copy of the C++ runtime, as the broken AOTI wrappers had)."""
    import shutil
    import subprocess

    if shutil.which("g++") is None:
        pytest.skip("needs g++ to build the shared-object fixtures")
    root = tmp_path_factory.mktemp("elf")
    (root / "regex.cpp").write_text(REGEX_SOURCE)
    builds = {"dynamic": [], "static": ["-static-libstdc++", "-static-libgcc"]}
    for name, flags in builds.items():
        done = subprocess.run(
            ["g++", "-O1", "-shared", "-fPIC", *flags, "regex.cpp", "-o", f"{name}.so"],
            cwd=root, capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode:
            pytest.skip(f"g++ could not build the {name} fixture: {done.stderr[-500:]}")
    return {name: root / f"{name}.so" for name in builds}
