"""What several processes lose by sharing one GPU: the cost of running several model hosts on it.

P processes each capture a ResNet-50 (torchvision, random weights, fp16, channels-last) CUDA graph
of batch B, then replay it in a loop with one blocking synchronisation per batch, as a model host
does, all starting together. It prints the total images/s of the P processes for B in 32, 64, 128
and P in 1..4; without MPS the processes' kernels take turns on the GPU (time slices), so the
totals against P = 1 are what the time slicing costs (benchmarks/RESULTS.md).

    python3 benchmarks/gpu_sharing.py [--seconds 4] [--batches 32,64,128] [--processes 1,2,3,4]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time


def worker(batch: int, seconds: float, start, ready, results) -> None:
    import torch
    import torchvision

    torch.backends.cudnn.benchmark = True
    model = torchvision.models.resnet50().eval().half().cuda().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224, device="cuda").half().to(memory_format=torch.channels_last)
    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                model(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(x)
        done = torch.cuda.Event(blocking=True)
        for _ in range(10):
            graph.replay()
        torch.cuda.synchronize()
        ready.put(1)
        start.wait()
        count, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds:
            graph.replay()
            done.record()
            done.synchronize()
            count += 1
        results.put(count * batch / (time.perf_counter() - began))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--batches", default="32,64,128")
    parser.add_argument("--processes", default="1,2,3,4")
    args = parser.parse_args(argv)
    mp.set_start_method("spawn")
    for batch in (int(b) for b in args.batches.split(",")):
        for count in (int(p) for p in args.processes.split(",")):
            start, ready, results = mp.Event(), mp.Queue(), mp.Queue()
            procs = [
                mp.Process(target=worker, args=(batch, args.seconds, start, ready, results))
                for _ in range(count)
            ]
            for proc in procs:
                proc.start()
            for _ in procs:
                ready.get(timeout=300)
            start.set()
            rates = [results.get(timeout=300) for _ in procs]
            for proc in procs:
                proc.join()
            each = ", ".join(f"{rate:.0f}" for rate in rates)
            print(f"batch {batch:3d} processes {count}: {sum(rates):7.0f} img/s total ({each})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
