"""onebox.toml parsing and the batch policy it yields for each kind of artifact signature."""

from __future__ import annotations

import pytest

from serving.batching import BatchPolicy
from serving.errors import ConfigError
from serving.host.model_config import CONFIG_FILE, batch_policy, load_model_config, warmup_sizes
from serving.types import BatchMode, ModelConfig, Signature

DYNAMIC = Signature(batch=BatchMode.DYNAMIC)
DYNAMIC_64 = Signature(batch=BatchMode.DYNAMIC, max_batch=64)
FIXED_4 = Signature(batch=BatchMode.FIXED, batch_sizes=(4,), max_batch=4)
FIXED_1_4_8 = Signature(batch=BatchMode.FIXED, batch_sizes=(1, 4, 8), max_batch=8)
NO_BATCH = Signature(batch=BatchMode.NONE)


def _toml(**values) -> ModelConfig:
    """A config as if every given key came from onebox.toml."""
    return ModelConfig(**values, explicit=frozenset(values))


def _write(tmp_path, text: str):
    (tmp_path / CONFIG_FILE).write_text(text)
    return tmp_path


# -- load_model_config ---------------------------------------------------------------------


def test_without_a_config_file_the_defaults_are_returned_unchanged(tmp_path):
    defaults = ModelConfig(max_batch_size=8, max_queue=10)
    assert load_model_config(tmp_path, defaults) is defaults


def test_config_file_values_override_the_defaults_and_keep_the_rest(tmp_path):
    _write(tmp_path, "max_batch_size = 32\nmax_delay_ms = 2\nbatch_sizes = [1, 8, 32]\nbatch = true\n")
    config = load_model_config(tmp_path, ModelConfig(max_queue=77, timeout_s=5.0))
    assert config.max_batch_size == 32
    assert config.max_delay_ms == 2
    assert config.batch_sizes == (1, 8, 32)
    assert config.batch is True
    assert (config.max_queue, config.timeout_s) == (77, 5.0)


def test_unknown_keys_and_tables_go_to_extra_merged_over_the_defaults_extra(tmp_path):
    _write(
        tmp_path, 'default_accept = "text/csv"\n[[inputs]]\nname = "x"\ndtype = "float32"\nshape = [-1, 4]\n'
    )
    config = load_model_config(tmp_path, ModelConfig(extra={"kept": 1, "default_accept": "x"}))
    assert config.extra == {
        "kept": 1,
        "default_accept": "text/csv",
        "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
    }


@pytest.mark.parametrize(
    "line",
    [
        'max_batch_size = "8"',
        "max_batch_size = 8.0",
        "max_batch_size = true",
        "max_queue = false",
        'max_delay_ms = "2"',
        "batch_sizes = 4",
        'batch = "yes"',
        "warmup = 1",
        "threads = 2.5",
        "timeout_s = [1]",
    ],
)
def test_a_known_key_of_the_wrong_type_is_a_config_error_naming_it(tmp_path, line):
    _write(tmp_path, line + "\n")
    with pytest.raises(ConfigError, match=line.split(" ")[0]):
        load_model_config(tmp_path, ModelConfig())


def test_numbers_of_either_kind_are_accepted_for_delay_and_timeout(tmp_path):
    _write(tmp_path, "max_delay_ms = 1\ntimeout_s = 2.5\n")
    config = load_model_config(tmp_path, ModelConfig())
    assert (config.max_delay_ms, config.timeout_s) == (1, 2.5)


def test_invalid_toml_is_a_config_error_naming_the_file(tmp_path):
    _write(tmp_path, "max_batch_size = = 3\n")
    with pytest.raises(ConfigError, match=r"onebox\.toml: not valid TOML"):
        load_model_config(tmp_path, ModelConfig())


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path):
    (tmp_path / CONFIG_FILE).write_bytes(b"max_batch_size = 3 # \xff\xfe\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_model_config(tmp_path, ModelConfig())


def test_an_unknown_precision_is_a_config_error(tmp_path):
    _write(tmp_path, 'precision = "fp8"\n')
    with pytest.raises(ConfigError, match="precision must be fp32, fp16 or bf16"):
        load_model_config(tmp_path, ModelConfig())


def test_cuda_sync_is_read_and_an_unknown_one_is_a_config_error(tmp_path):
    _write(tmp_path, 'cuda_sync = "block"\n')
    assert load_model_config(tmp_path, ModelConfig()).cuda_sync == "block"
    _write(tmp_path, 'cuda_sync = "yield"\n')
    with pytest.raises(ConfigError, match="cuda_sync must be one of auto, spin, block"):
        load_model_config(tmp_path, ModelConfig())


# -- batch_policy: DYNAMIC -------------------------------------------------------------------


def test_pipeline_depth_is_read_and_only_one_or_two_is_accepted(tmp_path):
    assert load_model_config(tmp_path, ModelConfig()).pipeline_depth == 1
    _write(tmp_path, "pipeline_depth = 2\n")
    assert load_model_config(tmp_path, ModelConfig()).pipeline_depth == 2
    _write(tmp_path, "pipeline_depth = 3\n")
    with pytest.raises(ConfigError, match="pipeline_depth must be 1 or 2"):
        load_model_config(tmp_path, ModelConfig())


def test_dynamic_artifact_batches_up_to_max_batch_size():
    policy = batch_policy(_toml(max_batch_size=16, max_delay_ms=3, max_queue=100), DYNAMIC_64)
    assert policy == BatchPolicy(max_batch_size=16, max_delay_ms=3, batch_sizes=(), max_queue=100)


def test_dynamic_artifact_with_batching_left_off_runs_one_row_per_batch():
    assert batch_policy(_toml(), DYNAMIC).max_batch_size == 1


def test_max_batch_size_above_the_artifacts_range_is_an_error_not_a_silent_cap():
    with pytest.raises(ConfigError, match=r"max_batch_size = 128 is larger than the artifact accepts \(64\)"):
        batch_policy(_toml(max_batch_size=128), DYNAMIC_64)


def test_max_batch_size_equal_to_the_artifacts_maximum_is_accepted():
    assert batch_policy(_toml(max_batch_size=64), DYNAMIC_64).max_batch_size == 64


def test_batch_sizes_on_a_dynamic_artifact_raise_the_default_batch_to_the_largest_size():
    policy = batch_policy(_toml(batch_sizes=(2, 4)), DYNAMIC_64)
    assert (policy.max_batch_size, policy.batch_sizes) == (4, (2, 4))


def test_batch_sizes_above_max_batch_size_are_dropped_from_the_policy():
    policy = batch_policy(_toml(max_batch_size=4, batch_sizes=(2, 4, 8)), DYNAMIC)
    assert (policy.max_batch_size, policy.batch_sizes) == (4, (2, 4))


def test_max_batch_size_above_the_largest_batch_size_is_an_error():
    with pytest.raises(ConfigError, match="larger than the largest of batch_sizes"):
        batch_policy(_toml(max_batch_size=8, batch_sizes=(2, 4)), DYNAMIC)


def test_a_queue_shorter_than_one_batch_is_raised_to_one_batch():
    assert batch_policy(_toml(max_batch_size=16, max_queue=2), DYNAMIC).max_queue == 16


def test_unsorted_batch_sizes_are_a_config_error():
    with pytest.raises(ConfigError, match="sorted ascending"):
        batch_policy(_toml(batch_sizes=(4, 2)), DYNAMIC)


# -- batch_policy: FIXED ---------------------------------------------------------------------


def test_fixed_artifact_pads_to_its_compiled_sizes_by_default():
    policy = batch_policy(_toml(), FIXED_4)
    assert (policy.max_batch_size, policy.batch_sizes, policy.splittable) == (4, (4,), True)


def test_fixed_artifact_may_be_limited_to_some_of_its_sizes():
    policy = batch_policy(_toml(batch_sizes=(1, 4)), FIXED_1_4_8)
    assert (policy.max_batch_size, policy.batch_sizes) == (4, (1, 4))


def test_fixed_artifact_limited_by_max_batch_size_keeps_only_the_sizes_below_it():
    policy = batch_policy(_toml(max_batch_size=4), FIXED_1_4_8)
    assert (policy.max_batch_size, policy.batch_sizes) == (4, (1, 4))


def test_batch_sizes_the_fixed_artifact_was_not_compiled_for_are_an_error():
    with pytest.raises(
        ConfigError, match=r"batch_sizes \[2\] are not among the sizes the artifact accepts \[4\]"
    ):
        batch_policy(_toml(batch_sizes=(2, 4)), FIXED_4)


def test_max_batch_size_above_the_fixed_size_is_an_error():
    with pytest.raises(ConfigError, match=r"max_batch_size = 8 is larger than the artifact accepts \(4\)"):
        batch_policy(_toml(max_batch_size=8), FIXED_4)


# -- batch_policy: NONE and user scripts -----------------------------------------------------


def test_artifact_without_batch_dimension_runs_each_request_alone():
    policy = batch_policy(_toml(max_queue=9), NO_BATCH)
    assert (policy.max_batch_size, policy.splittable, policy.max_queue) == (1, False, 9)


def test_max_batch_size_on_an_artifact_without_batch_dimension_is_an_error():
    with pytest.raises(ConfigError, match="no batch dimension"):
        batch_policy(_toml(max_batch_size=8), NO_BATCH)


def test_user_script_without_batch_opt_in_runs_one_request_at_a_time_whatever_the_knobs():
    policy = batch_policy(_toml(max_batch_size=8, max_queue=5), DYNAMIC, raw=True)
    assert (policy.max_batch_size, policy.splittable, policy.max_queue) == (1, False, 5)


def test_user_script_that_opted_in_batches_like_a_dynamic_artifact():
    signature = Signature(batch=BatchMode.DYNAMIC, max_batch=8)
    policy = batch_policy(_toml(batch=True, max_batch_size=8), signature, raw=True)
    assert (policy.max_batch_size, policy.splittable) == (8, True)


# -- warmup_sizes ----------------------------------------------------------------------------


def test_warmup_covers_every_fixed_size():
    assert warmup_sizes(BatchPolicy(max_batch_size=8, batch_sizes=(1, 4, 8))) == [1, 4, 8]


def test_warmup_covers_every_size_up_to_the_maximum_without_fixed_sizes():
    assert warmup_sizes(BatchPolicy(max_batch_size=4)) == [1, 2, 3, 4]


def test_warmup_of_an_unbatched_model_is_one_row():
    assert warmup_sizes(BatchPolicy(max_batch_size=1, splittable=False)) == [1]


@pytest.mark.parametrize("value", ["0", "-1.5"])
def test_a_timeout_that_is_not_positive_is_a_config_error(tmp_path, value):
    _write(tmp_path, f"timeout_s = {value}\n")
    with pytest.raises(ConfigError, match="timeout_s must be a positive number"):
        load_model_config(tmp_path, ModelConfig())


def test_batch_sizes_on_an_artifact_without_batch_dimension_are_an_error_not_ignored():
    with pytest.raises(ConfigError, match=r"batch_sizes \[2, 4\] need a batch dimension"):
        batch_policy(_toml(batch_sizes=(2, 4)), NO_BATCH)


def test_batch_sizes_on_a_user_script_batching_one_row_at_a_time_are_an_error_with_a_hint():
    # the handler reports no batch dimension when batch = true but max_batch_size is left at 1
    with pytest.raises(ConfigError, match="max_batch_size > 1"):
        batch_policy(_toml(batch=True, batch_sizes=(2, 4)), NO_BATCH, raw=True)


def test_batch_sizes_of_one_are_harmless_without_a_batch_dimension():
    assert batch_policy(_toml(batch_sizes=(1,)), NO_BATCH).splittable is False


def test_server_wide_defaults_adapt_to_each_artifact():
    # ONEBOX_MAX_BATCH_SIZE applies to every model: a model without a batch dimension still loads,
    # and one with a smaller range is capped to it; only onebox.toml values are hard requirements
    assert batch_policy(ModelConfig(max_batch_size=32), NO_BATCH).splittable is False
    assert batch_policy(ModelConfig(max_batch_size=128), DYNAMIC_64).max_batch_size == 64


def test_load_model_config_records_which_keys_the_file_set(tmp_path):
    (tmp_path / "onebox.toml").write_text("max_batch_size = 4\nmax_delay_ms = 1\n")
    config = load_model_config(tmp_path, ModelConfig(max_queue=9))
    assert config.explicit == {"max_batch_size", "max_delay_ms"}


def test_concurrent_batches_come_from_the_handler_unless_onebox_toml_says():
    assert batch_policy(ModelConfig(max_batch_size=8), DYNAMIC, concurrency=2).concurrent_batches == 2
    assert (
        batch_policy(_toml(max_batch_size=8, concurrent_batches=1), DYNAMIC, concurrency=2).concurrent_batches
        == 1
    )
    # a user script that did not opt in to batching runs one request at a time, always
    assert batch_policy(ModelConfig(), DYNAMIC, raw=True, concurrency=2).concurrent_batches == 1


def test_copy_threads_are_read_and_must_be_positive(tmp_path):
    assert load_model_config(tmp_path, ModelConfig()).copy_threads is None
    _write(tmp_path, "copy_threads = 6\n")
    assert load_model_config(tmp_path, ModelConfig()).copy_threads == 6
    _write(tmp_path, "copy_threads = 0\n")
    with pytest.raises(ConfigError, match="copy_threads"):
        load_model_config(tmp_path, ModelConfig())
