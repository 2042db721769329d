"""musc-edge: MuSc zero-shot anomaly detection for production lines."""

from musc_edge.musc import MuSc, MuScInputError, MuScResult
from musc_edge.precision import Precision

__all__ = ["MuSc", "MuScInputError", "MuScResult", "Precision"]
__version__ = "0.1.0"
