"""Fine-tuning: the per-worker recipe, the launch on the driver, checkpoints, the exported model."""
