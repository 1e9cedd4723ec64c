"""Training: the recipe and the components it calls (checkpoints, guards, metrics, eval)."""
