"""Multi-task learning: task sampling, loss weighting and parameter sharing."""
