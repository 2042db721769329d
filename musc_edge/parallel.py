"""How many cores this process has, and decoding and encoding images on all of them: OpenCV
releases the GIL while it works, so a thread per core turns a one-core stage (PNG decode, PNG
encode) into an all-core one."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def scoring_device() -> str:
    """Where MuSc scores: the GPU when there is one (features and known-good parts go there)."""
    import torch  # the decoding helpers here need no torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def usable_cores() -> int:
    """Cores this process may run on (a container's CPU set, not the host's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def physical_cores() -> int:
    """Physical cores this process may run on: taskset or a container's CPU set narrow it,
    and SMT siblings count once, as in ONNX Runtime's own default."""
    if not hasattr(os, "sched_getaffinity"):
        return os.cpu_count() or 1
    cores = set()
    for cpu in os.sched_getaffinity(0):
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topology / "physical_package_id").read_text().strip()
            cores.add((package, (topology / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return len(cores) or 1


@cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(usable_cores(), "musc-io")


def thread_map(function: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """`[function(item) for item in items]` on one thread per core, in order; the first
    exception is raised here, as in the plain loop."""
    items = list(items)
    if len(items) < 2 or usable_cores() < 2:
        return [function(item) for item in items]
    return list(_pool().map(function, items))
