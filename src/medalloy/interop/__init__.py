"""Other tools' formats: ONNX Runtime graphs (and, later, nnU-Net model folders)."""
