"""How gpu_resnet50.py --host-cpus splits a machine's CPUs (benchmarks/harness.py split_cpus)."""

from __future__ import annotations

import os

import pytest

from benchmarks.harness import split_cpus


def test_hosts_get_whole_cores_from_the_end_and_the_rest_go_to_the_others():
    # 8 CPUs, hyperthread pairs (0,4) (1,5) (2,6) (3,7), as Linux numbers them on many VMs
    siblings = {c: (c % 4, c % 4 + 4) for c in range(8)}
    assert split_cpus(2, list(range(8)), siblings) == ([3, 7], [0, 1, 2, 4, 5, 6])
    assert split_cpus(3, list(range(8)), siblings) == ([2, 3, 6, 7], [0, 1, 4, 5])  # whole cores


def test_without_hyperthreads_each_cpu_is_a_core():
    siblings = {c: (c,) for c in range(4)}
    assert split_cpus(1, list(range(4)), siblings) == ([3], [0, 1, 2])


def test_the_machines_own_topology_leaves_someone_a_cpu():
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:  # one CPU cannot be split: said so, never an empty set for the frontends
        with pytest.raises(ValueError, match="leave none"):
            split_cpus(1)
        return
    hosts, rest = split_cpus(1)
    assert hosts and set(hosts) | set(rest) == set(cpus) and not set(hosts) & set(rest)


def test_taking_every_cpu_for_the_hosts_is_refused():
    with pytest.raises(ValueError, match="leave none of 2"):
        split_cpus(2, [0, 1], {0: (0,), 1: (1,)})
