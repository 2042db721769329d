"""musc-edge: MuSc zero-shot anomaly detection for production lines."""

from musc_edge.errors import MuscEdgeError
from musc_edge.musc import MuSc, MuScInputError, MuScResult, References
from musc_edge.offline import keep_offline
from musc_edge.precision import Precision

# before any module of the project imports ONNX Runtime, OpenVINO or huggingface_hub (none of
# the imports above does): nothing leaves the device (musc_edge/offline.py)
keep_offline()

__all__ = ["MuSc", "MuScInputError", "MuScResult", "MuscEdgeError", "Precision", "References"]
__version__ = "0.1.0"
