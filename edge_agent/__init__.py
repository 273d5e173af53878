"""Line-side agent: MQTT in, few-shot adaptation on the CPU, quality predictions out. Never imports torch."""

import os as _os

# onnxruntime (1.32) resolves and posts to a Microsoft telemetry host unless this is in the process
# environment before it is imported (disable_telemetry_events() afterwards is not enough). Set here,
# the first thing any agent process (daemon, `edge-agent verify`, the signature-check child, the
# exporter's parity check through edge_agent.model) runs, and inherited by every child. Forced, not
# defaulted: an OT network must never see that traffic because of a stray variable.
_os.environ["ORT_DISABLE_TELEMETRY"] = "1"

__version__ = "0.1.0"
