"""AOTInductor packages (``aoti_compile_and_package`` ``.pt2``): native code for one device type."""

from __future__ import annotations

import logging
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from handlers import aoti_nogil, elf
from handlers.base import Handler, batch_signature
from handlers.torch_common import PRECISIONS, TorchRunner, output_names, release_cuda_memory
from handlers.torch_signature import check_batch, declared_specs
from serving.errors import ConfigError, ServingError
from serving.types import Artifact, Device, ModelConfig, Signature, Tensors, TensorSpec

log = logging.getLogger(__name__)

_INPUT_NAME = re.compile(r'inputs_info_\[(\d+)\]\.name = "(\w+)";')
_OUTPUT_NAME = re.compile(r'outputs_info_\[(\d+)\]\.name = "(\w+)";')
_DTYPE = re.compile(r"(\w+)_expected_dtype = aoti_torch_dtype_(\w+)\(\);")
_SIZES = re.compile(r"assert_size_stride\((\w+), \{([^}]*)\}")
# the wrapper's input checks test each dimension: a literal one for equality, a free one's range
_SIZE_TEST = re.compile(r"if \((?:\d+ != )?(\w+)_size\[(\d+)\]")
_SIZE_CHECK = re.compile(r"if \((\d+) != (\w+)_size\[(\d+)\]\)")


# std::locale::classic(): defined only by libstdc++ itself, so a wrapper that defines it carries a copy
_OWN_LIBSTDCXX = "_ZNSt6locale7classicEv"


class WrongDevice(ServingError):
    """An AOTInductor package compiled for another device type."""


class IncompatibleBuild(ServingError):
    """An AOTInductor package whose native code cannot be loaded safely into this process."""


def check_runtime_linkage(path: Path) -> None:
    """Refuse a package whose compiled wrapper carries its own, static, copy of libstdc++.

    torch links libstdc++ dynamically; a wrapper linked with a static copy (what the lent H100s'
    ``CXX=/opt/gcc/bin/g++`` produced, with no static flag from torch on its command line) then
    mixes two C++ runtimes in one process, and the wrapper's first ``std::regex`` (device string
    parsing, at load) reads the other runtime's locale facets: a segfault on torch 2.11 there, a
    ``std::bad_cast`` abort with GCC 12 here. Either takes the whole host down, so this is read from
    the ELF headers before anything is loaded.
    """
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            if not (name.endswith(".so") and "data/aotinductor/" in name):
                continue
            with z.open(name) as member:  # seekable: only the headers and symbol tables are read
                so = elf.read(member, [_OWN_LIBSTDCXX])
            if _OWN_LIBSTDCXX in so.defines and not any(n.startswith("libstdc++") for n in so.needed):
                raise IncompatibleBuild(
                    f"{path.name}: {name.rsplit('/', 1)[-1]} carries its own copy of libstdc++ (linked "
                    "statically), which crashes the process that loads it next to torch's. Recompile "
                    "the package with a compiler that links libstdc++ dynamically, e.g. "
                    "CXX=/usr/bin/g++ (torch's inductor uses $CXX)"
                )


def read_wrapper_signature(path: Path, declared=None) -> tuple[Signature, list[str]]:
    """Input dtypes and shapes from the generated ``*.wrapper.cpp`` (nothing is executed), and the
    names of the inputs whose shape it does not give.

    A shape is read from the wrapper's ``assert_size_stride`` on the input, else from its input
    checks (``if (3 != arg0_1_size[1])``: literal dimensions; the highest index read: the rank).
    A literal leading dimension means the package was compiled for exactly that batch size.
    ``declared`` (onebox.toml's ``[[inputs]]``, in argument order) names the inputs and fills in
    what the wrapper leaves free; a dtype or rank that contradicts the wrapper is refused.
    """
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith(".wrapper.cpp"))
        text = z.read(name).decode("utf-8", "replace")
    args = [a for _, a in sorted((int(i), a) for i, a in _INPUT_NAME.findall(text))]
    dtypes = dict(_DTYPE.findall(text))
    asserted, checked = _wrapper_shapes(text)
    if declared is not None and len(declared) != len(args):
        raise ConfigError(
            f"onebox.toml declares {len(declared)} input(s); this AOTInductor package takes {len(args)}"
        )
    names = ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]
    inputs, unknown = [], []
    for i, arg in enumerate(args):
        shape = asserted.get(arg) or checked.get(arg)
        spec = TensorSpec(names[i], dtypes.get(arg, "float32"), shape or (-1,))
        if declared is not None:  # checked against the asserted shape only: the other is inferred
            spec = _with_declared(spec, declared[i], arg in asserted)
        elif shape is None:
            unknown.append(spec.name)
        inputs.append(spec)
    outputs = tuple(
        TensorSpec(n, "float32", (-1,)) for n in output_names(len(_OUTPUT_NAME.findall(text)) or 1)
    )
    return batch_signature(tuple(inputs), outputs), unknown


def _wrapper_shapes(text: str) -> tuple[dict, dict]:
    """Each input's dimensions as the wrapper states them (literal ones as ints, free ones as -1):
    from its ``assert_size_stride`` calls, and as its input checks imply them."""
    asserted: dict[str, tuple[int, ...]] = {}
    for arg, dims in _SIZES.findall(text):
        asserted.setdefault(
            arg,
            tuple(
                int(d[:-1]) if re.fullmatch(r"\d+L", d) else -1
                for d in (x.strip() for x in dims.split(","))
                if d
            ),
        )
    ranks: dict[str, int] = {}
    for arg, index in _SIZE_TEST.findall(text):
        ranks[arg] = max(ranks.get(arg, 0), int(index) + 1)
    literal = {(arg, int(index)): int(value) for value, arg, index in _SIZE_CHECK.findall(text)}
    checked = {arg: tuple(literal.get((arg, i), -1) for i in range(rank)) for arg, rank in ranks.items()}
    return asserted, checked


def _with_declared(spec: TensorSpec, declared: TensorSpec, known: bool) -> TensorSpec:
    """The wrapper's ``spec`` named and completed by onebox.toml's declaration of it."""
    if np.dtype(declared.dtype) != np.dtype(spec.dtype):
        raise ConfigError(
            f"onebox.toml declares input {declared.name!r} as {declared.dtype}; this AOTInductor "
            f"package was compiled for {spec.dtype}"
        )
    if not known:
        return TensorSpec(declared.name, spec.dtype, declared.shape)
    if len(declared.shape) != len(spec.shape) or any(
        -1 not in (d, w) and d != w for d, w in zip(declared.shape, spec.shape, strict=True)
    ):
        raise ConfigError(
            f"onebox.toml declares input {declared.name!r} with shape {list(declared.shape)}; this "
            f"AOTInductor package was compiled for {list(spec.shape)}"
        )
    shape = tuple(w if w != -1 else d for d, w in zip(declared.shape, spec.shape, strict=True))
    return TensorSpec(declared.name, spec.dtype, shape)


class AotiHandler(Handler):
    """Loads with ``torch._inductor.aoti_load_package`` on the device type it was compiled for."""

    name = "torch_aoti"

    def load(self, artifact: Artifact, device: Device, config: ModelConfig) -> None:
        """Refuse a device mismatch, then load; precision and batch sizes are fixed at compile time."""
        import torch

        compiled_for = (artifact.details.get("metadata") or {}).get("AOTI_DEVICE_KEY", "cpu")
        if compiled_for != device.kind:
            raise WrongDevice(
                f"{artifact.files[0]} is an AOTInductor package compiled for {compiled_for}; it "
                f"cannot run on {device.name}. Recompile it on a {device.kind} host, or serve it "
                f"on a {compiled_for} device"
            )
        self.signature, unknown = read_wrapper_signature(artifact.path, declared_specs(config))
        self._shapes_known = not unknown
        if unknown:
            log.warning(
                "the shapes of input(s) %s are not in this AOTInductor package's wrapper: no "
                "warm-up (declare them in onebox.toml's [[inputs]] to have every batch size "
                "warmed, and graphed, before /ping turns 200)",
                unknown,
            )
        floats = {s.dtype for s in self.signature.inputs if s.dtype.startswith(("float", "bfloat"))}
        if config.precision and {PRECISIONS.get(config.precision)} != floats:
            compiled = f"for {sorted(floats)} inputs" if floats else "with no floating-point inputs"
            raise ConfigError(
                f"precision {config.precision} requested, but this AOTInductor package was compiled "
                f"{compiled}; its precision is fixed at compile time: leave precision out of onebox.toml"
            )
        graphs = bool(config.cuda_graphs) and device.kind == "cuda"
        sizes = self.signature.batch_sizes or config.batch_sizes
        if graphs and not sizes:
            raise ConfigError(
                "cuda_graphs for an AOTInductor package compiled for a dynamic batch needs "
                "batch_sizes in onebox.toml: one graph is captured per size, and every batch is "
                "padded up to one of them"
            )
        check_runtime_linkage(artifact.path)
        index = (device.index or 0) if device.kind == "cuda" else -1
        # A capture needs the runtime without its thread synchronisation: by default each call
        # waits on and records CUDA events, which a capturing stream refuses ("operation not
        # permitted when stream is capturing", seen on an H100). Every batch is then a replay
        # (all sizes are graphed and captures take a lock), so no two calls share the runtime.
        self.model = torch._inductor.aoti_load_package(
            str(artifact.path), run_single_threaded=graphs, device_index=index
        )
        # torch's own call holds the GIL through every kernel launch: use the GIL-free one if it builds
        release_gil = config.extra.get("aoti_release_gil", True)
        if not isinstance(release_gil, bool):
            raise ConfigError(f"aoti_release_gil must be true or false, not {release_gil!r}")
        call = aoti_nogil.runner_for(self.model) if release_gil else None
        self.releases_gil = call is not None
        # Inputs keep the dtype the user sent; the compiled kernels check it against the wrapper.
        self.runner = TorchRunner(
            call or self.model,
            device,
            config,
            [s.name for s in self.signature.inputs],
            graph_sizes=sizes,
            cast_inputs=False,
        )
        self.concurrent_batches = self.runner.concurrency
        self.pipelined = self.runner.pipelined
        self.launch_depth = self.runner.depth
        self.takes_rows = self.runner.takes_rows

    def warmup(self, batch_sizes: list[int]) -> None:
        """Warm up only when every input's shape is known (random inputs of a guessed rank would
        run, wrongly, and graphs would be captured for shapes no request has)."""
        if self._shapes_known:
            super().warmup(batch_sizes)

    def predict(self, inputs: Tensors) -> Tensors:
        """Run one batch after checking it matches the compiled shapes."""
        return self.launch(inputs)()

    def launch(self, inputs: Tensors) -> Callable[[], Tensors]:
        """Start one batch (on CUDA without waiting for it) after checking its shapes."""
        check_batch(self.signature, inputs)
        converted = {
            s.name: inputs[s.name].astype(s.dtype, copy=False) if s.name in inputs else None
            for s in self.signature.inputs
        }
        return self.runner.launch({k: v for k, v in converted.items() if v is not None})

    def input_buffer(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
        """The runner's pinned staging buffer to assemble the next batch in (CUDA, one lane)."""
        return self.runner.input_buffer(name, shape, dtype)

    def unload(self) -> None:
        """Drop the compiled model and release cached device memory."""
        self.model = self.runner = None
        release_cuda_memory()
