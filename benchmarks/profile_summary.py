"""Sum a py-spy profile (``record -f raw --threads``) by thread, and under named functions.

``gpu_resnet50.py --profile DIR`` writes such profiles of a model host and a frontend over the
measured window: all threads, idle ones included (where each thread's wall time goes), and
``-gil`` (only the thread holding the GIL). This prints each thread's samples and, for each
function named, the share of the samples under it that each of its callees took:

    python3 benchmarks/profile_summary.py DIR/profile-...-host.txt --under _launch_cuda,_collect
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path


def frame_name(frame: str) -> str:
    """``Class.method (file.py:12)`` -> ``method``."""
    return re.sub(r" \(.*", "", frame).rsplit(".", 1)[-1]


def summarise(lines, under: list[str], thread: str | None = None) -> dict:
    """``{"threads": Counter, "under": {name: Counter(callee frame -> samples)}}``.

    A stack with ``name`` on it counts for the frame called from its innermost ``name`` (or
    ``<self>`` when the sample was in ``name`` itself); ``thread``: only threads whose name
    holds it.
    """
    threads: collections.Counter = collections.Counter()
    below = {name: collections.Counter() for name in under}
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if thread is not None and thread not in frames[0]:
            continue
        threads[frames[0]] += int(count)
        names = [frame_name(f) for f in frames]
        for name in under:
            if name in names:
                at = len(names) - 1 - names[::-1].index(name)
                callee = frames[at + 1] if at + 1 < len(frames) else f"<self> {frames[at]}"
                below[name][callee] += int(count)
    return {"threads": threads, "under": below}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("profile", type=Path)
    parser.add_argument("--under", default="_launch_cuda,_collect", help="function names, comma-separated")
    parser.add_argument("--thread", default=None, help="only threads whose name holds this")
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args(argv)
    with args.profile.open() as lines:
        result = summarise(lines, args.under.split(","), args.thread)
    total = sum(result["threads"].values())
    print(f"{args.profile.name}: {total} samples")
    for name, samples in result["threads"].most_common(args.top):
        print(f"{samples:7d}  {name}")
    for name, callees in result["under"].items():
        samples = sum(callees.values())
        print(f"-- under {name}: {samples} samples")
        for callee, n in callees.most_common(args.top):
            print(f"{n:7d} {n / samples:6.1%}  {callee}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
