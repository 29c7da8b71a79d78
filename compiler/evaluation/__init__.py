"""Accuracy measurement: NMS and mAP (pycocotools, val.py's conventions) on PyTorch models and
on exported ONNX files."""
