"""The trainer: config schemas, the training loop, the loss, checkpoints and tracking."""
