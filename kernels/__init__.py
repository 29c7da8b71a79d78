"""Runtimes (ONNX Runtime, PyTorch CUDA, TensorRT), the timing primitive and latency tables."""
