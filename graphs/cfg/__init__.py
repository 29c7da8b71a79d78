"""The model YAMLs shipped with yoloprune (YOLOv5 n/s/m/l/x and P6)."""
