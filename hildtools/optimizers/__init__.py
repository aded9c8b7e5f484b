"""Drop-in torch.optim optimizers (plain torch, no Lightning)."""
