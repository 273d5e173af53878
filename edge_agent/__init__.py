"""Line-side agent: MQTT in, few-shot adaptation on the CPU, quality predictions out. Never imports torch."""

__version__ = "0.1.0"
