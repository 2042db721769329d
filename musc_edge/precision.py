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
