"""The ELF reader that vets native code before it is loaded, on real shared objects built by g++."""

from __future__ import annotations

import subprocess
import sys

import pytest

from handlers import elf

CLASSIC = "_ZNSt6locale7classicEv"  # std::locale::classic(), libstdc++'s own


def test_a_dynamically_linked_library_names_libstdcxx_and_does_not_define_it(shared_objects):
    so = elf.read(shared_objects["dynamic"].read_bytes(), [CLASSIC, "parse_device", "absent"])
    assert "libstdc++.so.6" in so.needed
    assert so.defines == {"parse_device"}


def test_a_statically_linked_library_carries_libstdcxx_itself(shared_objects):
    so = elf.read(shared_objects["static"].read_bytes(), [CLASSIC, "parse_device"])
    assert not any(n.startswith("libstdc++") for n in so.needed)
    assert so.defines == {CLASSIC, "parse_device"}


def test_without_symbols_asked_only_the_needed_list_is_read(shared_objects):
    so = elf.read(shared_objects["dynamic"].read_bytes())
    assert so.defines == frozenset() and so.needed[0].startswith("lib")


@pytest.mark.parametrize("cut", [b"", b"not an elf file at all", None])
def test_anything_else_is_a_value_error(shared_objects, cut):
    data = cut if cut is not None else shared_objects["dynamic"].read_bytes()[:0x50]  # headers cut off
    with pytest.raises(ValueError):
        elf.read(data, [CLASSIC])


def test_why_it_matters_the_static_copy_kills_a_process_that_has_torch_loaded(shared_objects):
    """The hazard the AOTI check guards against: a second C++ runtime next to torch's."""
    pytest.importorskip("torch")
    code = "import ctypes, sys, torch\nprint(ctypes.CDLL(sys.argv[1]).parse_device(b'cuda:0'), flush=True)\n"
    run = [sys.executable, "-c", code]
    dynamic = subprocess.run(
        [*run, str(shared_objects["dynamic"])], capture_output=True, text=True, timeout=120
    )
    assert (dynamic.returncode, dynamic.stdout.strip()) == (0, "1")
    static = subprocess.run(
        [*run, str(shared_objects["static"])], capture_output=True, text=True, timeout=120
    )
    assert static.returncode != 0, "the static libstdc++ copy ran cleanly next to torch's"
