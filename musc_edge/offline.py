"""Telemetry off, in code, for every library the line loads: nothing leaves the device.

An inspection device on a plant network must not phone home, and a run writes only under
--out. Seen with strace on `musc-edge run` (tests/test_no_phone_home.py checks it):

- OpenVINO: `import openvino` imports its model converter (openvino.tools.ovc), which sends
  a Google Analytics event through the openvino-telemetry package: it writes ~/intel/stats
  and ~/intel/openvino_ga_cid, then forks a child that resolves www.google-analytics.com to
  post the event, and waits up to 3 s for it. openvino-telemetry has no switch that writes
  nothing (its opt-out, `opt_in_out --opt_out`, writes ~/intel/openvino_telemetry and sends
  an opt-out event); but ovc falls back to its own no-op stub when the package cannot be
  imported, so it is made unimportable here.
- ONNX Runtime: loading its library starts its 1DS telemetry client, which creates
  ~/.cache/Microsoft/DeveloperTools/.onnxruntime/{deviceid,onnxruntime.db} to queue events
  for mobile.events.data.microsoft.com. ORT_DISABLE_TELEMETRY=1, read when the library
  loads, turns it off (`onnxruntime.disable_telemetry_events()` comes too late: the files
  exist by then).
- huggingface_hub (open_clip and timm fetch weights with it) reads HF_HUB_DISABLE_TELEMETRY
  and DO_NOT_TRACK at import; DO_NOT_TRACK is the common opt-out others honour too.

The variables go into os.environ, so child processes inherit them. `musc_edge/__init__.py`
calls `keep_offline()` before anything else, so every command and every module of the project
(the runners, export's parity check, the weight fetchers) runs with it; it is idempotent.
"""

from __future__ import annotations

import os
import sys

ENVIRONMENT = {
    "ORT_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
}
# Packages that only send telemetry, and whose users carry on without them.
BLOCKED_MODULES = ("openvino_telemetry",)


def keep_offline() -> None:
    """Set the opt-outs and block the telemetry-only packages (again: calls are cheap)."""
    os.environ.update(ENVIRONMENT)
    for name in BLOCKED_MODULES:
        sys.modules[name] = None  # `import name` raises ImportError from now on
