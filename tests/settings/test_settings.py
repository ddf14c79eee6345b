from pathlib import Path

import pytest

from serving.errors import ConfigError
from serving.settings import MB, Settings


def test_defaults_follow_the_sagemaker_contract():
    s = Settings.from_env({})
    assert s.port == 8080
    assert s.max_payload_bytes == 6 * MB == 6_291_456
    assert s.default_accept == "application/json"
    assert s.timeout_s == 60.0
    assert str(s.model_dir) == "/opt/ml/model"
    assert s.program == "inference.py"


def test_sagemaker_variables_are_read():
    s = Settings.from_env(
        {
            "SAGEMAKER_BIND_TO_PORT": "8000",
            "SAGEMAKER_SAFE_PORT_RANGE": "8081-9000",
            "SAGEMAKER_MODEL_SERVER_WORKERS": "3",
            "SAGEMAKER_MODEL_SERVER_TIMEOUT": "120",
            "SAGEMAKER_MAX_PAYLOAD_IN_MB": "20",
            "SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT": "text/csv",
            "SAGEMAKER_PROGRAM": "custom",
            "SAGEMAKER_BASE_DIR": "/tmp/ml",
            "SAGEMAKER_CONTAINER_LOG_LEVEL": "10",
            "SAGEMAKER_BATCH": "True",
            "SAGEMAKER_BATCH_STRATEGY": "SingleRecord",
            "SAGEMAKER_MAX_CONCURRENT_TRANSFORMS": "4",
        }
    )
    assert (s.port, s.safe_port_range, s.workers, s.timeout_s) == (8000, (8081, 9000), 3, 120.0)
    assert s.max_payload_bytes == 20 * MB
    assert s.default_accept == "text/csv"
    assert s.program == "custom.py"
    assert str(s.model_dir) == "/tmp/ml/model"
    assert (s.log_level, s.batch_transform, s.batch_strategy) == (10, True, "SINGLE_RECORD")
    assert s.max_concurrent_transforms == 4


def test_timeout_seconds_variable_wins_over_the_old_one():
    s = Settings.from_env(
        {"SAGEMAKER_MODEL_SERVER_TIMEOUT": "120", "SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": "7"}
    )
    assert s.timeout_s == 7.0
    assert s.model_defaults.timeout_s == 7.0


def test_zero_payload_means_no_limit_for_chunked_batch_transform():
    assert Settings.from_env({"SAGEMAKER_MAX_PAYLOAD_IN_MB": "0"}).max_payload_bytes is None


def test_onebox_batching_defaults_are_read():
    s = Settings.from_env(
        {"ONEBOX_MAX_BATCH_SIZE": "16", "ONEBOX_MAX_DELAY_MS": "2.5", "ONEBOX_BATCH_SIZES": "1,8,16"}
    )
    assert s.model_defaults.max_batch_size == 16
    assert s.model_defaults.max_delay_ms == 2.5
    assert s.model_defaults.batch_sizes == (1, 8, 16)


@pytest.mark.parametrize(
    "name,value",
    [
        ("SAGEMAKER_BIND_TO_PORT", "http"),
        ("SAGEMAKER_BIND_TO_PORT", "70000"),
        ("SAGEMAKER_SAFE_PORT_RANGE", "8081"),
        ("SAGEMAKER_SAFE_PORT_RANGE", "9000-8081"),
        ("SAGEMAKER_MODEL_SERVER_WORKERS", "0"),
        ("SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS", "-1"),
        ("SAGEMAKER_MAX_PAYLOAD_IN_MB", "lots"),
        ("SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT", "json"),
        ("SAGEMAKER_BATCH", "maybe"),
        ("SAGEMAKER_BATCH_STRATEGY", "ALL"),
        ("ONEBOX_DEVICE", "tpu"),
        ("ONEBOX_BATCH_SIZES", "1,x"),
        ("ONEBOX_IPC_SHM_MIN_BYTES", "-1"),
        ("ONEBOX_FRONTEND_WORKER_CLASS", "uvicorn"),
        ("ONEBOX_FRONTEND_GATHER", "sometimes"),
        ("ONEBOX_FRONTEND_MAX_CALLS", "-2"),
        ("ONEBOX_CUDA_COPY", "cupy"),
        ("ONEBOX_MODEL_MEMORY_MB", "-5"),
        ("ONEBOX_MODEL_LOAD_TIMEOUT", "0"),
    ],
)
def test_a_bad_value_names_the_variable_and_the_value(name, value):
    with pytest.raises(ConfigError) as info:
        Settings.from_env({name: value})
    assert name in str(info.value)
    assert repr(value) in str(info.value)


def test_cuda_copies_go_through_the_driver_unless_told_torch():
    assert Settings.from_env({}).cuda_copy == "driver"
    assert Settings.from_env({"ONEBOX_CUDA_COPY": "torch"}).cuda_copy == "torch"


def test_batch_transform_payload_over_100_mb_is_refused():
    with pytest.raises(ConfigError, match="100"):
        Settings.from_env({"SAGEMAKER_BATCH": "true", "SAGEMAKER_MAX_PAYLOAD_IN_MB": "101"})


def test_the_gevent_worker_class_needs_gevent_installed(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gevent" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"pip install 'onebox\[gevent\]'"):
        Settings.from_env({"ONEBOX_FRONTEND_WORKER_CLASS": "gevent"})
    assert Settings.from_env({}).worker_class == "loop"


def test_gathering_is_on_without_a_limit_by_default_and_both_can_be_set():
    s = Settings.from_env({})
    assert (s.frontend_gather, s.frontend_max_calls) == (True, 0)
    s = Settings.from_env({"ONEBOX_FRONTEND_GATHER": "false", "ONEBOX_FRONTEND_MAX_CALLS": "3"})
    assert (s.frontend_gather, s.frontend_max_calls) == (False, 3)


def test_frontend_timings_are_off_unless_given_a_directory():
    assert Settings.from_env({}).frontend_timings is None
    assert Settings.from_env({"ONEBOX_FRONTEND_TIMINGS": "/tmp/t"}).frontend_timings == Path("/tmp/t")


def test_a_multi_model_endpoint_has_no_memory_cap_unless_given_one():
    settings = Settings.from_env({"SAGEMAKER_MULTI_MODEL": "true", "SAGEMAKER_BASE_DIR": "/srv/ml"})
    assert settings.multi_model and settings.models_dir == Path("/srv/ml/models")
    assert settings.model_memory_bytes is None and settings.model_load_timeout_s == 350.0
    capped = Settings.from_env({"ONEBOX_MODEL_MEMORY_MB": "512", "ONEBOX_MODEL_LOAD_TIMEOUT": "30"})
    assert (capped.model_memory_bytes, capped.model_load_timeout_s) == (512 * 1024 * 1024, 30.0)


def test_metrics_settings_are_read_and_checked():
    s = Settings.from_env({})
    assert (s.cloudwatch_emf, s.cloudwatch_emf_interval_s, s.metrics_dir) == (False, 60.0, None)
    s = Settings.from_env({"ONEBOX_CLOUDWATCH_EMF": "true", "ONEBOX_CLOUDWATCH_EMF_INTERVAL": "0",
                           "ONEBOX_CLOUDWATCH_NAMESPACE": "my/ns", "PROMETHEUS_MULTIPROC_DIR": "/tmp/m"})  # fmt: skip
    assert (s.cloudwatch_emf, s.cloudwatch_emf_interval_s, s.cloudwatch_emf_namespace) == (True, 0.0, "my/ns")
    assert s.metrics_dir == Path("/tmp/m")
    for bad in ({"ONEBOX_CLOUDWATCH_EMF_INTERVAL": "-1"}, {"ONEBOX_CLOUDWATCH_NAMESPACE": ":x"},
                {"ONEBOX_CLOUDWATCH_NAMESPACE": "x" * 256}, {"ONEBOX_CLOUDWATCH_EMF": "maybe"}):  # fmt: skip
        with pytest.raises(ConfigError):
            Settings.from_env(bad)
