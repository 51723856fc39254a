"""A run directory: its paths and config, Orbax checkpoints, restoring a trained model."""
