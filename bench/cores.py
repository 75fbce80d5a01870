"""What two busy cores deliver on this machine, with nothing of scillm in it: the same CPU-bound Python work (JSON
round trips of a ~30 MB structure, about 5 s of CPU) run alone, then as two processes at once, alternately.

    .venv/bin/python bench/cores.py [--rounds 6]

It prints the two-core factor: CPU seconds per process with both cores busy ÷ alone. A factor above 1 is what the
machine takes from scale-out before any load generator, upstream, load balancer or coordination: with two processes
no setup can serve more than 2 ÷ factor times what one serves (bench/scale.py's ratios are read against it).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

WORK = """
import json, time
started = time.process_time()
data = [{f"k{j}": [str(i), i, {"x": i}] for j in range(20)} for i in range(20000)]
for _ in range(6):
    data = json.loads(json.dumps(data))
print(time.process_time() - started)
"""


def run(processes: int) -> list[float]:
    """CPU seconds each of ``processes`` simultaneous runs of the work took."""
    started = [subprocess.Popen([sys.executable, "-c", WORK], stdout=subprocess.PIPE, text=True)
               for _ in range(processes)]
    return [float(p.communicate()[0]) for p in started]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    alone: list[float] = []
    both: list[float] = []
    for _ in range(args.rounds):
        alone += run(1)
        both += run(2)
    factor = statistics.median(both) / statistics.median(alone)
    print(f"alone {statistics.median(alone):.2f} s of CPU (runs {min(alone):.2f}-{max(alone):.2f}), two at once "
          f"{statistics.median(both):.2f} s each ({min(both):.2f}-{max(both):.2f}): two-core factor {factor:.3f}, "
          f"so at most {2 / factor:.2f}x of one process on two cores")


if __name__ == "__main__":
    main()
