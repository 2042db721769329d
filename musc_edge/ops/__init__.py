"""Custom torch ops (musc_edge namespace) for LNAMD pooling and MSM.

Importing this package registers `torch.ops.musc_edge.lnamd` and `torch.ops.musc_edge.msm`;
`lnamd` and `msm_scores` below are the entry points the core calls, drop-ins for the plain
torch reference in `musc_edge.lnamd` and `musc_edge.msm`. Design and numbers: docs/ops.md.
"""

from musc_edge.ops.lnamd_op import lnamd
from musc_edge.ops.msm_op import msm_scores

__all__ = ["lnamd", "msm_scores"]
