"""Drivers: the SFT and RL training loops, data, validation samples, tracking, checkpoints."""
