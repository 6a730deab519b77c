"""Training under DeepSpeed: engine set-up, LR schedule, loop, metrics, checkpoints."""
