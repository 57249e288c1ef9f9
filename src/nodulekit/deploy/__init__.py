"""Export formats, runtimes and benchmarks of the deployed models."""

# runtimes a model can run in: PyTorch, ONNX Runtime (CPU), OpenVINO (CPU), RKNN (RK3588 NPU, on the board)
BACKENDS = ("torch", "onnx", "openvino", "rknn")
