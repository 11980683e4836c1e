"""CPU used by idle Ray actors on this machine: a local Ray instance with 4 actors that do nothing, sampled over 20 s.
It backs the "Ray's own processes" reading in docs/benchmarks.md (Ray launcher overhead): what an idle actor costs
whatever distft does, and whether a Ray setting changes it.

    python bench/ray_idle_cpu.py                                   # ~40 s
    RAY_enable_metrics_collection=0 python bench/ray_idle_cpu.py   # the same with a Ray setting (env var)
"""

import os
import time
from pathlib import Path

import ray

ACTORS, SECONDS = 4, 20


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def main() -> None:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    @ray.remote(num_cpus=0)
    class Idle:
        def pid(self) -> int:
            return os.getpid()

    actors = [Idle.remote() for _ in range(ACTORS)]
    pids = ray.get([a.pid.remote() for a in actors])
    time.sleep(5)  # past start-up
    before = {pid: cpu_seconds(pid) for pid in pids}
    time.sleep(SECONDS)
    shares = [(cpu_seconds(pid) - before[pid]) / SECONDS for pid in pids]
    print(f"{ACTORS} idle Ray actors over {SECONDS} s: " + ", ".join(f"{s:.3f}" for s in shares)
          + f" cores each (mean {sum(shares) / len(shares):.4f})")
    ray.shutdown()


if __name__ == "__main__":
    main()
