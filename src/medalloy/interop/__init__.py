"""Other tools' formats: ONNX Runtime graphs and their sidecars, trained nnU-Net v2 model folders."""
