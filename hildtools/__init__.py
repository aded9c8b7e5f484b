"""hildtools: training-dynamics diagnostics and optimizers for PyTorch and Lightning."""

__version__ = "0.1.0"
