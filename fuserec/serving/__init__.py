"""Serving: the exported ONNX model behind an HTTP API, with an event store for real-time histories."""
