"""ResNet-50 on an NVIDIA GPU: the offline ceiling of an artifact next to what `onebox serve` delivers.

One run prints, for each artifact kind (TorchScript, AOTInductor) and input dtype (uint8, fp16):
  offline   images/s and latency of the loaded artifact at batch 1, 8, 32, 64, 128 (device tensors,
            CUDA events: the ceiling);
  served    images/s, p50/p99 latency and mean GPU utilisation through `onebox serve` with ONE image
            per request (1x3x224x224 as application/x-npy) at concurrency 1, 16, 64, 256;
and the two ratios the issue sets as targets: served/offline throughput at the same maximum batch
(128) and served minus offline latency at concurrency 1.

The model is torchvision's ResNet-50 with random weights (no download), fp16, channels-last, with
the input cast and scaled inside the model, so a uint8 image goes over the wire as uint8.

    python benchmarks/gpu_resnet50.py --kinds torchscript --out /tmp/gpu   # see benchmarks/README.md
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.harness import batch_totals, pin_cpus, server_roles  # noqa: E402
from handlers.cuda_graphs import capture_graph  # noqa: E402
from serving.bench.loadgen import run_load  # noqa: E402
from serving.host.devices import gpu_utilisation  # noqa: E402
from serving.http.timings import read_all as read_timings  # noqa: E402
from tests.support.server import Server  # noqa: E402

MAX_BATCH = 128
# the batch sizes a server with CUDA graphs captures and pads up to (--graphs on)
# every 4 rows up to 64 and 8 above: a batch is padded by at most 7 rows. Padding is device time
# spent on nothing: with 48, 64, 96 only, 2-host TorchScript batches of ~63 rows ran padded to ~80
# and served 8683 img/s against 9548; with every 8 to 64, 4-host AOTI batches of ~22 ran padded by
# 17% (15,369 and 12,006 img/s against 17,765 with these sizes, one call). Every size from 1 to 64
# did no better (13,590 against 15,394): more graphs, not less padding, then cost (RESULTS.md)
# py-spy with native (C/C++) frames as well, for a host whose time is inside a compiled runtime
NATIVE_PROFILES = os.environ.get("ONEBOX_BENCH_NATIVE_PROFILES") == "1"
GRAPH_SIZES = (1, 2, *range(4, 65, 4), *range(72, 129, 8))
WARMUP_S = 2.0  # the load's warm-up before its measured window
#: the loop workers write their timing sums once a second (serving.http.timings)
TIMINGS_TICK_S = 1.2


def config_toml(dtype: str, graphs: bool, lanes: int = 1, sync: str = "auto", pipeline: str = "on",
                sizes: tuple[int, ...] = GRAPH_SIZES, kind: str = "torchscript", copy_threads: int = 0) -> str:  # fmt: skip
    """The model's onebox.toml: fp16, batches up to MAX_BATCH formed at once, optionally CUDA graphs.

    ``lanes``: batches one host runs at once (``concurrent_batches``); ``sync``: ``cuda_sync``;
    ``pipeline``: ``on`` answers a batch while the next one runs, ``ahead`` also launches the
    next behind the running one (``pipeline_depth = 2``), ``off`` neither; ``copy_threads``: the
    threads assembling a batch (0: the server's default). An AOTInductor package's precision is
    fixed when it is compiled (the model casts to fp16 itself), so it gets no ``precision`` key.
    """
    precision = 'precision = "fp16"\n' if kind == "torchscript" else ""
    text = (
        f"max_batch_size = {MAX_BATCH}\nmax_delay_ms = 0\n{precision}concurrent_batches = {lanes}\n"
        f'cuda_sync = "{sync}"\npipeline = {str(pipeline != "off").lower()}\n'
        f"pipeline_depth = {2 if pipeline == 'ahead' else 1}\n"
    )
    if copy_threads:
        text += f"copy_threads = {copy_threads}\n"
    if graphs:
        text += f"cuda_graphs = true\nbatch_sizes = {list(sizes)}\n"
    return text + f'[[inputs]]\nname = "x"\ndtype = "{dtype}"\nshape = [-1, 3, 224, 224]\n'


def build_module(torch, torchvision):
    """ResNet-50 (random weights) in fp16/channels-last that takes uint8 or fp16 images."""

    class Served(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torchvision.models.resnet50(weights=None)

        def forward(self, x):
            x = x.to(torch.float16).mul(1.0 / 255.0).contiguous(memory_format=torch.channels_last)
            return self.net(x)

    return Served().eval().half().to(memory_format=torch.channels_last).cuda()


def make_artifacts(workdir: Path, kinds: list[str], dtypes: list[str], reuse: bool = False) -> dict:
    """Model directories keyed by (kind, dtype); ``served`` writes each one's onebox.toml.

    ``reuse``: keep an artifact an earlier run left in ``workdir`` (an A/B of two checkouts on
    one machine then compiles the AOTInductor package once).
    """
    import torch
    import torchvision

    module = build_module(torch, torchvision)
    out = {}
    for dtype in dtypes:
        example = torch.randint(0, 255, (8, 3, 224, 224), dtype=torch.uint8, device="cuda")
        if dtype == "float16":
            example = example.half()
        for kind in kinds:
            model_dir = workdir / f"{kind}-{dtype}"
            model_dir.mkdir(parents=True, exist_ok=True)
            out[(kind, dtype)] = model_dir
            if reuse and (model_dir / ("model.pt" if kind == "torchscript" else "model.pt2")).is_file():
                print(f"reusing {kind}/{dtype} from {model_dir}", flush=True)
                continue
            started = time.perf_counter()
            with torch.inference_mode():
                if kind == "torchscript":
                    traced = torch.jit.trace(module, example)
                    torch.jit.save(traced, str(model_dir / "model.pt"))
                else:
                    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
                    program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
                    torch._inductor.aoti_compile_and_package(
                        program, package_path=str(model_dir / "model.pt2")
                    )
            print(f"built {kind}/{dtype} in {time.perf_counter() - started:.1f}s", flush=True)
    return out


def load_offline(kind: str, model_dir: Path, graphs: bool = False):
    """The artifact as the server loads it (an AOTI runtime to be captured: without its thread sync)."""
    import torch

    if kind == "torchscript":
        return torch.jit.load(str(model_dir / "model.pt"), map_location="cuda").eval()
    return torch._inductor.aoti_load_package(str(model_dir / "model.pt2"), run_single_threaded=graphs)


def graphed(fn, example):
    """``fn`` as one CUDA graph for ``example``'s shape (the server's capture); calls copy in and replay."""
    static_in = example.clone()
    graph, static_out = capture_graph(fn, [static_in], example.device)

    def replay(x):
        static_in.copy_(x)
        graph.replay()
        return static_out

    return replay


def label_of(kind: str, graphs: bool) -> str:
    return f"{kind}+graphs" if graphs else kind


def offline(
    kind: str, model_dir: Path, dtype: str, batches: list[int], graphs: bool = False
) -> dict[int, dict]:
    """Images/s and per-batch latency of the artifact itself, inputs already on the device.

    With ``graphs`` each batch size runs as a captured CUDA graph, as the server runs it with
    ``cuda_graphs = true`` (the input is copied into the graph's buffer, as there).
    """
    import torch

    model = load_offline(kind, model_dir, graphs)
    results = {}
    label = label_of(kind, graphs)
    with torch.inference_mode():
        for batch in batches:
            inputs = [
                torch.randint(0, 255, (batch, 3, 224, 224), dtype=torch.uint8, device="cuda")
                for _ in range(4)
            ]
            if dtype == "float16":
                inputs = [x.half() for x in inputs]
            fn = graphed(model, inputs[0]) if graphs else model
            for i in range(10):
                fn(inputs[i % 4])
            torch.cuda.synchronize()
            times = []
            for _ in range(5):
                iters = max(5, 400 // batch)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for i in range(iters):
                    fn(inputs[i % 4])
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / iters)
            ms = statistics.median(times)
            results[batch] = {"ms": ms, "img_s": batch * 1000.0 / ms}
            call = ""
            if batch == 1:  # one call as a script would make it: from host memory, back, waited for
                results[batch]["call_ms"] = one_call_ms(fn, inputs[0].cpu())
                call = f"; one call from host memory {results[batch]['call_ms']:.2f} ms (p50)"
            if batch == max(batches) and batch > 1:  # what the served batch's copy-in costs the device
                fed = host_fed(fn, [x.cpu().pin_memory() for x in inputs])
                results[batch]["host_fed"] = fed
                call = (
                    f"; from pinned host memory: copy alone {fed['copy_ms']:.2f} ms "
                    f"({fed['copy_gb_s']:.1f} GB/s), copy then model on one stream {fed['serial_ms']:.2f} ms "
                    f"({batch * 1000.0 / fed['serial_ms']:.0f} img/s), copy on its own stream under the "
                    f"previous batch {fed['overlapped_ms']:.2f} ms ({batch * 1000.0 / fed['overlapped_ms']:.0f} img/s)"
                )
            print(
                f"offline {label:18s} {dtype:7s} batch {batch:3d}: {ms:7.2f} ms  {batch * 1000.0 / ms:9.0f} img/s{call}",
                flush=True,
            )
            del fn
    del model
    torch.cuda.empty_cache()
    return results


def host_fed(fn, host_inputs, rounds: int = 5, iters: int = 40) -> dict:
    """Device ms per batch when each batch starts in pinned host memory, as a served batch does.

    ``serial``: the host-to-device copy and then the model, on one stream (a host at depth 1 that
    copies a batch in while the device waits). ``overlapped``: batch i+1 copied on a stream of its
    own into the other of two device buffers while batch i computes. ``copy``: the copies alone.
    """
    import torch

    compute = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    buffers = [torch.empty_like(host_inputs[0], device="cuda") for _ in range(2)]
    n = len(host_inputs)

    def timed(body) -> float:
        body(5)
        torch.cuda.synchronize()
        times = []
        for _ in range(rounds):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(compute)
            body(iters)
            end.record(compute)
            end.synchronize()
            times.append(start.elapsed_time(end) / iters)
        return statistics.median(times)

    def copies(count):
        for i in range(count):
            buffers[i % 2].copy_(host_inputs[i % n], non_blocking=True)

    def serial(count):
        for i in range(count):
            buffers[0].copy_(host_inputs[i % n], non_blocking=True)
            fn(buffers[0])

    def overlapped(count):
        consumed = [torch.cuda.Event(), torch.cuda.Event()]
        for event in consumed:
            event.record(compute)
        for i in range(count):
            slot = i % 2
            side.wait_event(consumed[slot])  # the model is done reading this buffer
            with torch.cuda.stream(side):
                buffers[slot].copy_(host_inputs[i % n], non_blocking=True)
            arrived = torch.cuda.Event()
            arrived.record(side)
            compute.wait_event(arrived)
            fn(buffers[slot])
            consumed[slot].record(compute)
        torch.cuda.current_stream().wait_stream(side)

    copy_ms = timed(copies)
    nbytes = host_inputs[0].numel() * host_inputs[0].element_size()
    return {
        "copy_ms": copy_ms,
        "copy_gb_s": nbytes / copy_ms / 1e6,
        "serial_ms": timed(serial),
        "overlapped_ms": timed(overlapped),
    }


def one_call_ms(fn, host_input, calls: int = 300) -> float:
    """Median wall-clock ms of one synchronous call: the input copied from (pageable) host memory,
    the model, the output copied back. The batch-size rows above are device time per batch with
    batches queued back to back, which hides the launch, both copies and the wait."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        out = fn(host_input.to("cuda", non_blocking=False))
        for tensor in out if isinstance(out, (list, tuple)) else [out]:
            tensor.cpu()  # waits for the model
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times[calls // 10 :])


class GpuSampler:
    """Mean GPU utilisation (NVML) and CPU use of the server's roles while a run is in progress."""

    def __init__(self, server_pid: int | None = None):
        self.samples: list[int] = []
        self.cpu: dict[str, list[float]] = {"host": [], "frontend": [], "machine": []}
        self._roles = server_roles(server_pid) if server_pid else {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        for procs in self._roles.values():
            for proc in procs:
                proc.cpu_percent()
        psutil.cpu_percent()
        while not self._stop.wait(0.25):
            gpus = gpu_utilisation()
            if gpus:
                self.samples.append(gpus[0]["gpu_percent"])
            for role, procs in self._roles.items():
                total = 0.0
                for proc in procs:
                    try:
                        total += proc.cpu_percent()
                    except psutil.Error:
                        pass
                self.cpu[role].append(total / 100.0)  # cores busy
            self.cpu["machine"].append(psutil.cpu_percent() * (os.cpu_count() or 1) / 100.0)

    def cores(self, role: str) -> float:
        values = self.cpu.get(role) or []
        return statistics.mean(values[2:] or values) if values else float("nan")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float:
        return statistics.mean(self.samples) if self.samples else float("nan")


def profile(
    pid: int, seconds: float, out: Path, gil: bool = False, native: bool = False, delay: float = 0.0
) -> subprocess.Popen | None:
    """Sample a process with py-spy (collapsed stacks) in the background, if py-spy is installed.

    ``gil``: only the thread holding the GIL is sampled, so the stacks are where the process's one
    serial Python section goes (what caps a GIL-bound process), not where its threads wait.
    Otherwise every thread is sampled, idle ones too, so a thread's stacks are where its wall
    time goes, waits for the GIL or the device included. ``delay``: seconds before sampling
    starts (the load's warm-up), so the profile covers the measured window only.
    """
    import shutil

    exe = shutil.which("py-spy") or next(
        (p for p in map(Path, sys.path) if (p / "bin/py-spy").exists()), None
    )
    if exe is None:
        return None
    exe = exe if isinstance(exe, str) else str(exe / "bin/py-spy")
    cmd = [
        "sh",
        "-c",
        f'sleep {delay:.2f}; exec "$0" "$@"',
        exe,
        "record",
        "-f",
        "raw",
        "-r",
        "200",
        "-d",
        str(int(seconds)),
        # py-spy reads native stacks only while the process is stopped
        *([] if native else ["--nonblocking"]),
        "--threads",
        *(["--gil"] if gil else ["--idle"]),
        *(["--native"] if native else []),
        "-o",
        str(out),
        "--pid",
        str(pid),
    ]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def served(kind: str, model_dir: Path, dtype: str, concurrencies: list[int], duration: float, workers: int,
           profile_dir: Path | None = None, hosts: int = 1, threads: int = 64, graphs: bool = False,
           lanes: int = 1, worker_class: str = "loop", sync: str = "auto", pipeline: str = "on",
           sizes: tuple[int, ...] = GRAPH_SIZES, gather: str = "0", copy_threads: int = 0,
           pin: str = "on", h2d: str = "driver", host_cpus: int = 0, load_processes: int = 0) -> dict:  # fmt: skip
    """Throughput and latency through `onebox serve`, one image per request; ``host_cpus``: the
    hosts get that many CPUs of their own, the frontends and the load the others (0: no pinning);
    ``load_processes``: the load generator's processes at concurrency above 1 (0: one per 32
    clients, 2 to 6)."""
    (model_dir / "onebox.toml").write_text(
        config_toml(dtype, graphs, lanes, sync, pipeline, sizes, kind, copy_threads)
    )
    label = label_of(kind, graphs)
    image = np.random.default_rng(0).integers(0, 255, (1, 3, 224, 224), dtype=np.uint8)
    if dtype == "float16":
        image = image.astype(np.float16)
    buf = io.BytesIO()
    np.save(buf, image)
    body = buf.getvalue()
    headers = {"Content-Type": "application/x-npy", "Accept": "application/x-npy"}
    env = {
        "ONEBOX_FRONTEND_THREADS": str(threads),
        "SAGEMAKER_MODEL_SERVER_TIMEOUT_SECONDS": "30",
        "ONEBOX_HOSTS_PER_DEVICE": str(hosts),
        "ONEBOX_FRONTEND_WORKER_CLASS": worker_class,
        # off: each request its own host call; N: the loop worker gathers, N calls per host in flight
        "ONEBOX_FRONTEND_GATHER": "false" if gather == "off" else "true",
        "ONEBOX_FRONTEND_MAX_CALLS": "0" if gather == "off" else gather,
        "ONEBOX_RUN_DIR": tempfile.mkdtemp(prefix="onebox-run-"),
        "ONEBOX_FRONTEND_TIMINGS": tempfile.mkdtemp(prefix="onebox-timings-"),
        # on: the hosts register the frontends' shared regions with CUDA and copy from them
        "ONEBOX_IPC_PIN": "true" if pin == "on" else "false",
        # driver: the hosts queue copies, graph launches and events through the driver, GIL held
        "ONEBOX_CUDA_COPY": h2d,
    }  # ONEBOX_RUN_DIR: where the hosts list their sockets (batch_totals); timings: the frontends' sums
    results = {}

    def verify(status: int, payload: bytes):
        if status != 200:
            return f"status {status}: {payload[:200]!r}"
        out = np.load(io.BytesIO(payload))
        return None if out.shape == (1, 1000) else f"shape {out.shape}"

    started = time.perf_counter()
    with Server(model_dir, env=env, workers=workers, threads=threads, ready_timeout=600) as server:
        print(f"served {label}/{dtype}: ready in {time.perf_counter() - started:.1f}s", flush=True)
        if host_cpus:
            print(f"        {pin_cpus(server.proc.pid, host_cpus)}", flush=True)
        url = f"http://127.0.0.1:{server.port}/invocations"
        for i, conc in enumerate(concurrencies):
            processes = 1 if conc == 1 else load_processes or min(6, max(2, conc // 32))
            spies = []
            if profile_dir is not None and conc == max(concurrencies):
                roles = server_roles(server.proc.pid)
                workers_ = [p for p in roles["frontend"] if p.ppid() != server.proc.pid]
                targets = {"host": roles["host"][0]} | ({"frontend": workers_[0]} if workers_ else {})
                for (role, proc), gil in itertools.product(targets.items(), (False, True)):
                    name = f"profile-{label.replace('+', '-')}-{dtype}-hosts{hosts}-lanes{lanes}-{pipeline}-{h2d}-{role}{'-gil' if gil else ''}.txt"
                    # from the end of the load's warm-up to just before its end
                    spy = profile(proc.pid, max(1, duration - 1), profile_dir / name, gil,
                                  native=NATIVE_PROFILES, delay=TIMINGS_TICK_S + WARMUP_S + 0.5)  # fmt: skip
                    if spy:
                        spies.append(spy)
            timings_dir = Path(server.env["ONEBOX_FRONTEND_TIMINGS"])
            time.sleep(TIMINGS_TICK_S)  # the frontends' files are written once a second
            fronts_before = read_timings(timings_dir)
            before = batch_totals(Path(server.env["ONEBOX_RUN_DIR"]))
            window = time.perf_counter()
            with GpuSampler(server.proc.pid) as gpu:
                result = run_load(url, body=body, headers=headers, concurrency=conc, duration_s=duration,
                                  warmup_s=WARMUP_S, processes=processes, verify=verify, verify_every=50)  # fmt: skip
            ran = batch_totals(Path(server.env["ONEBOX_RUN_DIR"]))
            window = time.perf_counter() - window
            pinned, pin_failures = ran["pinned_regions"], ran["pin_failures"]
            ran.subtract(before)
            batches = ran["batches"] or 1
            timeline = host_timeline(ran, window, hosts)
            time.sleep(TIMINGS_TICK_S)
            fronts = read_timings(timings_dir)
            timeline |= frontend_timeline({key: fronts[key] - fronts_before[key] for key in fronts})
            mean_batch, mean_padded = ran["rows"] / batches, (ran["rows"] + ran["padding"]) / batches
            small = sum(count for size, count in ran.items() if isinstance(size, int) and size <= 8) / batches
            per_call = ran["rows"] / (ran["requests"] or 1)  # requests the frontends gathered into one call
            results[point_key(concurrencies, i)] = {
                "mean_batch": mean_batch,
                "mean_padded_batch": mean_padded,
                "small_batches": small,
                "rows_per_call": per_call,
                "batch_sizes": {
                    size: n for size, n in sorted(ran.items(), key=str) if isinstance(size, int) and n
                },
                "img_s": result.rps,
                "p50_ms": result.p50_ms,
                "p99_ms": result.p99_ms,
                "gpu_util": gpu.mean,
                "errors": result.errors,
                "verify_failures": result.verify_failures,
                "client_cpu_s": result.client_cpu_s,
                "host_cores": gpu.cores("host"),
                "frontend_cores": gpu.cores("frontend"),
                "machine_cores": gpu.cores("machine"),
                "host_timeline": timeline,
                "pinned_regions": pinned,
                "pin_failures": pin_failures,
                "host_gc": [ran[f"gc{g}"] for g in range(3)],
            }
            for spy in spies:
                spy.wait(60)
            print(
                f"served  {label:18s} {dtype:7s} conc {conc:3d}: {result.rps:9.0f} img/s  p50 {result.p50_ms:7.2f} ms"
                f"  p99 {result.p99_ms:7.2f} ms  GPU {gpu.mean:5.1f}%  errors {result.errors or 0}"
                f"  bad {result.verify_failures}  batch {mean_batch:.1f} (padded {mean_padded:.1f}, {small:.0%} of <=8, {per_call:.1f} rows/call)  cores: host {gpu.cores('host'):.1f} frontends "
                f"{gpu.cores('frontend'):.1f} machine {gpu.cores('machine'):.1f}/{os.cpu_count()}",
                flush=True,
            )
            print(
                "        host, per batch: build {build_ms:.2f} ms, launch {launch_ms:.2f} ms, compute {compute_ms:.2f}"
                " ms, answer {answer_ms:.2f} ms; per call: arriving {arrive_ms:.2f} ms, queued {queue_ms:.2f} ms; starved {starved:.0%} of"
                " the hosts' time\n        frontends, per request: wait {wait_ms:.2f} ms, at the host {host_ms:.2f} ms"
                " (back {back_ms:.2f} ms),"
                " answer {answer_ms_front:.2f} ms; client and transfer {turnaround_ms:.2f} ms;"
                " {pinned} regions registered ({failures} refused); host garbage collections {gcs}".format(
                    **timeline,
                    pinned=pinned,
                    failures=pin_failures,
                    gcs=" / ".join(str(ran[f"gc{g}"]) for g in range(3)),
                ),
                flush=True,
            )
    if host_cpus:  # this process's own CPUs back, for the next server it starts
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    return results


def point_key(concurrencies: list[int], i: int):
    """The report's key of point ``i``: its concurrency the first time, ``"256#2"`` and on when
    it is repeated (``--concurrency 1,256,256``), so that no point is dropped from the report or
    the best."""
    conc, seen = concurrencies[i], concurrencies[: i + 1].count(concurrencies[i])
    return conc if seen == 1 else f"{conc}#{seen}"


def host_timeline(ran, window_s: float, hosts: int) -> dict:
    """The hosts' time sums of one run (``batch_totals`` differences) as means: per batch (ms)
    building it, launching it, computing it (launch to outputs back) and answering it; per host
    call (ms) waiting in the queue; and the share of the hosts' wall time their batchers waited
    with nothing queued and nothing on the device (``starved``)."""
    batches, calls = ran["batches"] or 1, ran["requests"] or 1
    per_batch = {
        f"{key}_ms": 1000 * ran[f"{key}_s"] / batches for key in ("build", "launch", "compute", "answer")
    }
    return per_batch | {
        "queue_ms": 1000 * ran["queue_s"] / calls,
        "arrive_ms": 1000 * ran["arrive_s"] / (ran["arrivals"] or 1),
        "starved": ran["starved_s"] / (window_s * hosts) if window_s > 0 else 0.0,
    }


def frontend_timeline(sums: dict) -> dict:
    """The frontends' time sums of one run (serving.http.timings) as ms per request."""
    requests, turns = sums["requests"] or 1, sums["turns"] or 1
    return {
        "wait_ms": 1000 * sums["wait_s"] / requests,
        "host_ms": 1000 * sums["host_s"] / requests,
        "back_ms": 1000 * sums["back_s"] / requests,
        "answer_ms_front": 1000 * sums["answer_s"] / requests,
        "turnaround_ms": 1000 * sums["turnaround_s"] / turns,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kinds", default="torchscript,aoti")
    parser.add_argument("--dtypes", default="uint8,float16")
    parser.add_argument("--batches", default="1,8,32,64,128")
    parser.add_argument("--concurrency", default="1,16,64,256")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds measured per served point")
    parser.add_argument("--workers", type=lambda t: [int(w) for w in t.split(",")], default=[8],
                        help="frontend processes to serve with, e.g. 8,12")  # fmt: skip
    parser.add_argument("--load-processes", type=lambda t: [int(n) for n in t.split(",")], default=[0],
                        help="the load generator's processes above concurrency 1 (0: one per 32 clients, "
                             "2 to 6), e.g. 0,12")  # fmt: skip
    parser.add_argument("--threads", type=int, default=64,
                        help="threads per frontend process (the loop worker's pool for other routes)")  # fmt: skip
    parser.add_argument("--worker-class", choices=("loop", "gthread", "gevent"), default="loop",
                        help="the frontends' gunicorn worker class (ONEBOX_FRONTEND_WORKER_CLASS)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("/tmp/onebox-gpu"))
    parser.add_argument("--hosts", type=lambda t: [int(h) for h in t.split(",")], default=[1],
                        help="ONEBOX_HOSTS_PER_DEVICE values to serve with, e.g. 1,2,4")  # fmt: skip
    parser.add_argument(
        "--graphs",
        type=lambda t: [g == "on" for g in t.split(",")],
        default=[False, True],
        help="serve without and/or with CUDA graphs: off, on or off,on (the default)",
    )
    parser.add_argument("--lanes", type=lambda t: [int(n) for n in t.split(",")], default=[1],
                        help="concurrent_batches values to serve with (batches in flight per host), e.g. 1,2")  # fmt: skip
    parser.add_argument("--pipeline", type=lambda t: t.split(","), default=["on"],
                        help="off, on (answer a batch while the next runs: the default), ahead (and launch the "
                             "next behind the running one: pipeline_depth 2), e.g. on,ahead")  # fmt: skip
    parser.add_argument("--graph-sizes", type=lambda t: tuple(int(n) for n in t.split(",")), default=GRAPH_SIZES,
                        help=f"batch_sizes captured with --graphs on (default {','.join(map(str, GRAPH_SIZES))})")  # fmt: skip
    parser.add_argument("--sync", type=lambda t: t.split(","), default=["auto"],
                        help="cuda_sync values to serve with (spin, block, auto), e.g. spin,auto")  # fmt: skip
    parser.add_argument("--gather", type=lambda t: t.split(","), default=["0"],
                        help="the loop worker's gathering: off, or N calls in flight per host before requests "
                             "wait to go together (ONEBOX_FRONTEND_MAX_CALLS; 0: no limit), e.g. off,2")  # fmt: skip
    parser.add_argument("--copy-threads", type=lambda t: [int(c) for c in t.split(",")], default=[0],
                        help="threads assembling a batch (onebox.toml copy_threads; 0: the server's default), "
                             "e.g. 1,4")  # fmt: skip
    parser.add_argument("--pin", type=lambda t: t.split(","), default=["on"],
                        help="on: hosts register the frontends' shared regions with CUDA and copy "
                             "requests from them (ONEBOX_IPC_PIN); off: joined on the host, e.g. on,off")  # fmt: skip
    parser.add_argument("--h2d", type=lambda t: t.split(","), default=["driver"],
                        help="how hosts queue a batch's CUDA work (ONEBOX_CUDA_COPY): driver (copies, graph "
                             "launch, copies out and events through the driver, GIL held) or torch, e.g. driver,torch")  # fmt: skip
    parser.add_argument("--host-cpus", type=lambda t: [int(x) for x in t.split(",")], default=[0],
                        help="CPUs (whole cores) the model hosts get to themselves, the frontends and the load "
                             "the rest; 0: no pinning, e.g. 0,2")  # fmt: skip
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep artifacts an earlier run left in --out instead of building them",
    )
    parser.add_argument(
        "--profile", type=Path, default=None, help="write py-spy profiles of the host and a frontend here"
    )
    args = parser.parse_args(argv)
    kinds, dtypes = args.kinds.split(","), args.dtypes.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)

    import torch

    print(
        f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CPUs {os.cpu_count()}",
        flush=True,
    )
    artifacts = make_artifacts(args.out, kinds, dtypes, args.reuse)
    report = {}
    for (kind, dtype), model_dir in artifacts.items():
        for graphs in args.graphs:
            label = label_of(kind, graphs)
            off = offline(kind, model_dir, dtype, batches, graphs)
            ceiling = off[max(batches)]["img_s"]
            for (
                workers,
                load,
                hosts,
                lanes,
                sync,
                pipeline,
                gather,
                copy,
                pin,
                h2d,
                host_cpus,
            ) in itertools.product(
                args.workers,
                args.load_processes,
                args.hosts,
                args.lanes,
                args.sync,
                args.pipeline,
                args.gather,
                args.copy_threads,
                args.pin,
                args.h2d,
                args.host_cpus,
            ):
                piped = {"off": "serial", "on": "pipelined", "ahead": "ahead"}[pipeline]
                print(
                    f"-- {label}/{dtype} with {hosts} model host(s) on the GPU, {lanes} lane(s) each, "
                    f"cuda_sync {sync}, {piped}, gather {gather}, copy threads {copy or 'default'}, pin {pin}, h2d {h2d}, "
                    f"host cpus {host_cpus or 'any'}, {workers} frontends, load processes {load or 'default'}",
                    flush=True,
                )
                srv = served(kind, model_dir, dtype, concurrencies, args.duration, workers, args.profile,
                             hosts, args.threads, graphs, lanes, args.worker_class, sync, pipeline,
                             args.graph_sizes, gather, copy, pin, h2d, host_cpus, load)  # fmt: skip
                best = max(r["img_s"] for r in srv.values())
                report[
                    f"{label}/{dtype}/hosts{hosts}/lanes{lanes}/{sync}/{piped}/gather{gather}/copy{copy}/pin{pin}/{h2d}"
                    + (f"/cpus{host_cpus}" if host_cpus else "")
                    + (f"/workers{workers}" if workers != 8 else "")
                    + (f"/load{load}" if load else "")
                ] = {
                    "offline": off,
                    "served": srv,
                }
                first = srv[concurrencies[0]]["p50_ms"]
                print(
                    f"== {label}/{dtype}, {hosts} host(s) x {lanes} lane(s), {sync}, {piped}, gather {gather}, copy {copy}, pin {pin}, h2d {h2d}, host cpus {host_cpus or 'any'}, {workers} frontends, load {load or 'default'}: served {best:.0f} img/s = "
                    f"{best / ceiling:.0%} of the "
                    f"offline ceiling {ceiling:.0f} img/s (batch {max(batches)}); conc-{concurrencies[0]} "
                    f"latency {first:.2f} ms vs offline batch-{batches[0]} {off[batches[0]]['ms']:.2f} ms "
                    f"(+{first - off[batches[0]]['ms']:.2f} ms)"
                    + (
                        f", vs one offline call from host memory {off[batches[0]]['call_ms']:.2f} ms "
                        f"(+{first - off[batches[0]]['call_ms']:.2f} ms)"
                        if "call_ms" in off[batches[0]]
                        else ""
                    ),
                    flush=True,
                )
    (args.out / f"gpu_resnet50-{args.kinds.replace(',', '-')}.json").write_text(
        json.dumps(report, indent=1, default=str)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
