"""The CLI's training loop: workloads, data, checkpoints, metrics."""
