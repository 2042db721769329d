"""musc-edge: MuSc zero-shot anomaly detection for production lines."""

from musc_edge.errors import MuscEdgeError
from musc_edge.musc import MuSc, MuScInputError, MuScResult, References
from musc_edge.precision import Precision

__all__ = ["MuSc", "MuScInputError", "MuScResult", "MuscEdgeError", "Precision", "References"]
__version__ = "0.1.0"
