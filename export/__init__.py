"""Workstation side: backbone -> ONNX graph -> TensorRT engine, as a verified model package."""
