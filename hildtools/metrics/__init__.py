"""Representation and kernel metrics: functional forms and torchmetrics Metrics."""
