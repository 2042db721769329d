"""MSM, mutual scoring of patches across images, in one package (docs/design.md, step 3).

`plan` sizes the work to a memory budget, `bands` walks the query images band by band,
`finish` turns best similarities into patch scores, and `backends` selects the kernel that
fills the tables (`torch_blocks`, `tiles`, `triton_kernel`, the `op` that dispatches between
them) or the `original` yardstick.
"""

from musc_edge.msm.backends import BACKENDS, DEFAULT_BACKEND, mutual_scores, register_backend
from musc_edge.msm.plan import neighbour_count

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "mutual_scores", "neighbour_count", "register_backend"]
