from handlers.base import batch_signature
from serving.types import BatchMode, TensorSpec


def test_one_literal_leading_size_means_that_fixed_batch():
    sig = batch_signature((TensorSpec("a", "float32", (4, 3)), TensorSpec("b", "int64", (4,))))
    assert (sig.batch, sig.batch_sizes, sig.max_batch) == (BatchMode.FIXED, (4,), 4)


def test_a_free_or_disagreeing_leading_size_means_dynamic():
    assert batch_signature((TensorSpec("a", "float32", (-1, 3)),)).batch is BatchMode.DYNAMIC
    mixed = (TensorSpec("a", "float32", (2, 3)), TensorSpec("b", "float32", (5, 3)))
    assert batch_signature(mixed).batch is BatchMode.DYNAMIC


def test_scalar_inputs_have_no_batch_dimension():
    assert batch_signature((TensorSpec("a", "float32", ()),)).batch is BatchMode.NONE
