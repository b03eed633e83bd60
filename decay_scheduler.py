"""Staircase exponential learning-rate decay over one global step shared by all training phases.

Mirrors tf.train.exponential_decay(lr, global_step, decay_steps, decay_factor, staircase=True) of the
reference. Its config says decay_steps=5000 but never passes it on, so the effective value is 1000.
"""
import torch


def decayed_lr(base_lr: float, global_step: int, decay_factor: float = 0.99, decay_steps: int = 1000) -> float:
    """lr = base_lr * decay_factor ** floor(global_step / decay_steps)."""
    return base_lr * decay_factor ** (global_step // decay_steps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write the learning rate of the coming step into every parameter group (no host sync)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
