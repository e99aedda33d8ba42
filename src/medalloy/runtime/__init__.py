"""Deployment without the training stack: an exported ONNX graph predicts with numpy, ONNX Runtime
and the image readers only (``pip install medalloy``; no torch, no MONAI). Nothing here imports
torch: ``tests/runtime`` checks it in a process where torch cannot be imported."""

from medalloy.runtime.predictor import OnnxPredictor, predict_folder

__all__ = ["OnnxPredictor", "predict_folder"]
