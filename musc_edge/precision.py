"""Numeric precision of the similarity products, a user choice reported with every result."""

from __future__ import annotations

import enum

import torch

from musc_edge.errors import UsageError


class Precision(str, enum.Enum):
    """fp32 is exact; bf16 and fp16 feed the matrix products in half width (fp32 accumulate)."""

    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.value]


def parse_precision(value: Precision | str) -> Precision:
    """Precision from its name, with the valid names in the error."""
    try:
        return Precision(value)
    except ValueError:
        names = ", ".join(p.value for p in Precision)
        raise UsageError(f"unknown precision {value!r}; choose one of {names}") from None


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (x86 AVX512-BF16 or AMX, Arm BF16): without
    it bf16 is emulated and slower than fp32, so asking for it is refused, not granted."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = {
                flag
                for line in info
                if line.startswith(("flags", "Features"))
                for flag in line.split()
            }
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
