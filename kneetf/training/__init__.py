"""Training: callbacks, the run folder and the `train` entry point."""
