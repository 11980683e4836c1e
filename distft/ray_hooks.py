"""Ray `worker_process_setup_hook`s of a distft job. Ray runs the hook in every worker process of the job (Ray Train's
controller and helper actors, distft's stop flag, the training workers), so this module imports only what the hooks
need: importing `distft.launch` there loaded torch into each of those processes (1.5-3 core-seconds and ~190 MiB
apiece before the first step: bench/results/launcher_cpu_light_hooks.json)."""

import logging

from distft import console, preemption


def setup_cluster_workers() -> None:
    """The hook of a run on a cluster: SIGTERM handling (distft.preemption) and the console filters
    (distft.console)."""
    preemption.setup_worker_process()
    console.quiet_ray_processes()


def quiet_local_workers() -> None:
    """The hook of a local cluster. It runs without the dashboard, so Ray Train's placement-group cleaner cannot
    reach the state API and warns every few seconds; the warning is noise there (the driver cleans up on exit)."""
    setup_cluster_workers()
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
