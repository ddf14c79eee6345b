"""An AOTInductor package's input signature, read from its generated wrapper without running it.

The wrapper text below is cut from real packages (torch 2.13, CPU): the input checks every
wrapper has, and the ``assert_size_stride`` a wrapper may or may not emit for an input (the
fp16 ResNet-50 package on the H200 gave none, and warm-up then ran 1-D random inputs: graphs were
captured for shapes no request had, and every real batch size was captured while serving).
"""

from __future__ import annotations

import zipfile

import pytest

from handlers.torch_aoti import read_wrapper_signature
from serving.errors import ConfigError
from serving.types import BatchMode, TensorSpec

HEAD = """
    inputs_info_[0].name = "arg2_1";
    outputs_info_[0].name = "output0";
    int32_t arg2_1_expected_dtype = aoti_torch_dtype_float16();
"""
CHECKS = """
    auto arg2_1_size = arg2_1.sizes();
    if (arg2_1_size[0] < 2) {
           << arg2_1_size[0] << "\\n";
    if (arg2_1_size[0] > 128) {
    if (3 != arg2_1_size[1]) {
           << "expected: 3, " << "but got: " << arg2_1_size[1]
    if (224 != arg2_1_size[2]) {
    if (224 != arg2_1_size[3]) {
    auto arg2_1_stride = arg2_1.strides();
    if (150528 != arg2_1_stride[0]) {
"""
BODY = """
    auto arg2_1_size = arg2_1.sizes();
    int64_t s77 = arg2_1_size[0];
"""
ASSERT = """
    if (_check_aoti_runtime_check_inputs_env()) { assert_size_stride(arg2_1, {s77, 3L, 224L, 224L}, {150528L, 50176L, 224L, 1L}, "input"); }
"""


def package(tmp_path, text: str):
    path = tmp_path / "model.pt2"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("model/data/aotinductor/model/cabc.wrapper.cpp", text)
    return path


def declared(shape, dtype="float16", name="x"):
    return (TensorSpec(name, dtype, tuple(shape)),)


@pytest.mark.parametrize(
    "parts", [HEAD + CHECKS + BODY + ASSERT, HEAD + CHECKS + BODY], ids=["asserted", "checked"]
)
def test_the_input_shape_comes_from_the_assert_or_else_from_the_input_checks(tmp_path, parts):
    signature, unknown = read_wrapper_signature(package(tmp_path, parts))
    assert unknown == []
    assert signature.inputs == (TensorSpec("input", "float16", (-1, 3, 224, 224)),)
    assert signature.batch is BatchMode.DYNAMIC


def test_an_input_whose_shape_the_wrapper_does_not_give_is_named_as_unknown(tmp_path):
    # reading the batch size into a variable says nothing of the rank
    signature, unknown = read_wrapper_signature(package(tmp_path, HEAD + BODY))
    assert unknown == ["input"]
    # a declaration in onebox.toml supplies it, and its name
    signature, unknown = read_wrapper_signature(package(tmp_path, HEAD + BODY), declared([-1, 3, 224, 224]))
    assert unknown == [] and signature.inputs == (TensorSpec("x", "float16", (-1, 3, 224, 224)),)


def test_a_declaration_names_the_inputs_and_fills_the_free_dimensions_only(tmp_path):
    path = package(tmp_path, HEAD + CHECKS + BODY + ASSERT)
    signature, _ = read_wrapper_signature(path, declared([-1, -1, 224, -1]))
    assert signature.inputs == (TensorSpec("x", "float16", (-1, 3, 224, 224)),)
    fixed = package(tmp_path, HEAD + ASSERT.replace("{s77, 3L", "{8L, 3L"))
    signature, _ = read_wrapper_signature(fixed, declared([-1, 3, 224, 224]))
    assert signature.batch is BatchMode.FIXED and signature.batch_sizes == (8,)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (declared([-1, 3, 224, 224], dtype="uint8"), "declares input 'x' as uint8; .* compiled for float16"),
        (declared([-1, 3, 256, 256]), r"shape \[-1, 3, 256, 256\]; .* compiled for \[-1, 3, 224, 224\]"),
        (declared([-1, 150528]), "compiled for"),
        (declared([-1, 3, 224, 224]) * 2, "declares 2 input"),
    ],
    ids=["dtype", "dimension", "rank", "count"],
)
def test_a_declaration_that_contradicts_the_wrapper_is_refused(tmp_path, spec, message):
    with pytest.raises(ConfigError, match=message):
        read_wrapper_signature(package(tmp_path, HEAD + CHECKS + BODY + ASSERT), spec)
