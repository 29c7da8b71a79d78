"""Recovery after pruning: datasets (YOLO format, synthetic shapes), the detection losses and
distillation objectives, BatchNorm recalibration and the fine-tuning loop."""
