"""What a run leaves behind: evaluation, the model card, the plot series, the ONNX export and its encoder."""
