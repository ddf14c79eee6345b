"""BatchPolicy.validate: contradictory knobs stop start-up with a ConfigError that names them."""

import pytest

from serving.batching import BatchPolicy
from serving.errors import ConfigError


@pytest.mark.parametrize(
    "policy",
    [
        BatchPolicy(),
        BatchPolicy(max_batch_size=8, max_delay_ms=2.5, batch_sizes=(1, 2, 4, 8), max_queue=64),
        BatchPolicy(max_batch_size=5, batch_sizes=(2, 8)),
        BatchPolicy(splittable=False, max_batch_size=8),
    ],
)
def test_consistent_policies_validate(policy):
    policy.validate()


@pytest.mark.parametrize(
    ("policy", "words"),
    [
        (BatchPolicy(max_batch_size=0), "max_batch_size"),
        (BatchPolicy(max_batch_size=2.0), "max_batch_size"),
        (BatchPolicy(max_delay_ms=-1), "max_delay_ms"),
        (BatchPolicy(max_delay_ms=float("nan")), "max_delay_ms"),
        (BatchPolicy(max_queue=0), "max_queue"),
        (BatchPolicy(max_batch_size=16, batch_sizes=(4, 8)), "largest of batch_sizes"),
        (BatchPolicy(max_batch_size=4, batch_sizes=(4, 2)), "sorted"),
        (BatchPolicy(max_batch_size=4, batch_sizes=(2, 2, 4)), "duplicates"),
        (BatchPolicy(max_batch_size=4, batch_sizes=(0, 4)), ">= 1"),
        (BatchPolicy(max_batch_size=32, max_queue=16), "max_queue"),
        (BatchPolicy(splittable=False, batch_sizes=(1, 2)), "batch dimension"),
    ],
)
def test_inconsistent_policy_raises_config_error_naming_the_knob(policy, words):
    with pytest.raises(ConfigError, match=words):
        policy.validate()
