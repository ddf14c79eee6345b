"""Run an AOTInductor package without holding the GIL (a small C++ extension, built once).

torch's Python binding of the package loader (``AOTIModelPackageLoader.boxed_run``) keeps the
GIL for the whole call. On CUDA that call is the CPU side of every kernel launch, ~2.7 ms per
ResNet-50 batch on an H100 host, and py-spy ``--gil`` put half of a serving host's GIL there:
its request reader and reply sender stood still meanwhile (benchmarks/RESULTS.md). The
extension calls the same C++ ``AOTIModelPackageLoader::run`` with the GIL released.

The build needs a C++ compiler and torch's headers; it is cached under ``TORCH_EXTENSIONS_DIR``
(torch's default: ``~/.cache/torch_extensions``). Where it cannot be built, :func:`runner_for`
returns None and the handler keeps torch's own call.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

_NAME = "onebox_aoti_nogil"
#: a build takes about a minute; torch's build lock older than this was left by a killed build,
#: and every later load would wait on it forever
STALE_LOCK_S = 300.0

_SOURCE = r"""
#include <torch/extension.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

// `loader` is a torch._C._aoti.AOTIModelPackageLoader (checked by the caller); its pybind class
// derives from AOTIModelPackageLoader by single inheritance, so its value pointer is one.
std::vector<at::Tensor> run(pybind11::handle loader, const std::vector<at::Tensor>& inputs) {
  auto* instance = reinterpret_cast<pybind11::detail::instance*>(loader.ptr());
  auto held = pybind11::detail::values_and_holders(instance).begin();
  auto* package = static_cast<torch::inductor::AOTIModelPackageLoader*>(held->value_ptr());
  pybind11::gil_scoped_release no_gil;
  return package->run(inputs, nullptr);  // nullptr: the calling thread's current CUDA stream
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("run", &run, "AOTIModelPackageLoader::run without the GIL");
}
"""


@functools.cache
def _extension():
    """The compiled extension module, or None when it cannot be built here (logged once)."""
    from torch.utils import cpp_extension

    try:
        clear_stale_lock(cpp_extension._get_build_directory(_NAME, False))
        return cpp_extension.load_inline(
            name=_NAME, cpp_sources=[_SOURCE], extra_cflags=["-O2"], verbose=False
        )
    except Exception as exc:  # no compiler, no headers: serve with torch's own call instead
        log.warning(
            "could not build the GIL-free AOTInductor call (%s: %s); AOTInductor packages run "
            "holding the GIL, which limits a busy host",
            type(exc).__name__,
            str(exc).splitlines()[0][:300],
        )
        return None


def runner_for(compiled) -> Callable | None:
    """A function ``(*tensors) -> outputs`` like ``compiled(*tensors)``, but GIL-free; None without the extension.

    ``compiled`` is what ``torch._inductor.aoti_load_package`` returned; outputs keep the
    structure the package was exported with (its call spec).
    """
    import torch
    from torch.utils import _pytree as pytree

    loader = getattr(compiled, "loader", None)
    if not isinstance(loader, torch._C._aoti.AOTIModelPackageLoader):
        return None
    extension = _extension()
    if extension is None:
        return None
    out_spec = pytree.treespec_loads(loader.get_call_spec()[1])
    run = extension.run

    def call(*tensors):
        return pytree.tree_unflatten(run(loader, list(tensors)), out_spec)

    return call


def clear_stale_lock(build_directory: str) -> bool:
    """Remove torch's build lock in ``build_directory`` if a killed build left it; whether it did.

    torch's ``FileBaton`` waits for the lock file to go away, so a build killed halfway (a
    timeout, a crashed host) would make every later AOTInductor load hang at this step.
    """
    lock = os.path.join(build_directory, "lock")
    try:
        age = time.time() - os.stat(lock).st_mtime
    except OSError:
        return False
    if age < STALE_LOCK_S:
        return False  # another process is building it now
    log.warning(
        "removing %s, %.0f s old: an earlier build of the GIL-free AOTInductor call was interrupted",
        lock,
        age,
    )
    with contextlib.suppress(OSError):
        os.remove(lock)
    return True
