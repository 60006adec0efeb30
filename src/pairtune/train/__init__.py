"""The training loop and what surrounds it: checkpoints, best-weights selection, the guard, stop signals, progress, memory."""
