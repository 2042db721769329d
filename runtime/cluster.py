"""Joining a Ray cluster, and running inside it: one way for the plant's service and the
archive re-score."""

from __future__ import annotations

import logging


def join_ray(address: str | None) -> None:
    """Connect to the cluster at `address` (`auto`, `HOST:PORT`, `ray://...`), or start a
    local instance when None; Ray's own logging kept to warnings, its workers' output off the
    terminal (the commands show their own progress)."""
    import ray

    ray.init(
        address=address,
        ignore_reinit_error=True,
        log_to_driver=False,
        logging_level=logging.WARNING,
        configure_logging=True,
    )


def use_assigned_cpus() -> None:
    """Score with as many threads as the CPUs Ray gave this actor (`--cpus-per-worker`,
    `cpus_per_replica`), not with every core of its node."""
    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
