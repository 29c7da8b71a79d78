"""Trained weights shipped with yoloprune (the embedded default model)."""
