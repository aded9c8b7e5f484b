"""Hessian-vector products, Lanczos, trace, spectral density, stability thresholds (plain torch)."""
