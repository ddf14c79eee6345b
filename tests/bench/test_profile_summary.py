"""benchmarks/profile_summary.py on a small hand-written py-spy raw profile."""

from __future__ import annotations

from benchmarks.profile_summary import main, summarise

PROFILE = """\
thread (1): batcher;run (a.py:1);TorchRunner._launch_cuda (t.py:10);device_inputs (c.py:5) 6
thread (1): batcher;run (a.py:1);TorchRunner._launch_cuda (t.py:10);CudaDriver.launch_graph (c.py:9) 2
thread (1): batcher;run (a.py:1);TorchRunner._launch_cuda (t.py:12) 1
thread (1): batcher;run (a.py:1);TorchRunner._collect (t.py:20);TorchRunner._wait (t.py:22) 9
thread (2): answers;_answer (p.py:44) 5

"""


def test_samples_are_summed_by_thread_and_by_callee_of_each_named_function():
    result = summarise(PROFILE.splitlines(), ["_launch_cuda", "_collect", "absent"])
    assert result["threads"] == {"thread (1): batcher": 18, "thread (2): answers": 5}
    assert result["under"]["_launch_cuda"] == {
        "device_inputs (c.py:5)": 6,
        "CudaDriver.launch_graph (c.py:9)": 2,
        "<self> TorchRunner._launch_cuda (t.py:12)": 1,
    }
    assert result["under"]["_collect"] == {"TorchRunner._wait (t.py:22)": 9}
    assert not result["under"]["absent"]


def test_the_command_prints_shares(tmp_path, capsys):
    path = tmp_path / "profile-host.txt"
    path.write_text(PROFILE)
    assert main([str(path), "--under", "_launch_cuda", "--thread", "batcher"]) == 0
    out = capsys.readouterr().out
    assert "18 samples" in out and "answers" not in out
    assert " 66.7%  device_inputs (c.py:5)" in out
