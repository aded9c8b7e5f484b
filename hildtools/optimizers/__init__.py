"""Drop-in torch.optim optimizers (plain torch, no Lightning): SAM, NGN, Lion, Signum, momentum scaling.

Momentum scaling comes in two forms: :class:`MomentumScaling` attaches ``1 - beta = C lr^(2/3)``
to any optimizer with ``momentum`` or ``betas``; :class:`ScaledMomentumSGD` is heavy-ball SGD with
the rule built in (an optimizer class, for LightningCLI ``class_path``).
"""

from hildtools.optimizers.lion import Lion
from hildtools.optimizers.momentum_scaling import MomentumScaling, ScaledMomentumSGD
from hildtools.optimizers.ngn import NGN
from hildtools.optimizers.sam import SAM
from hildtools.optimizers.signum import Signum

__all__ = ["NGN", "SAM", "Lion", "MomentumScaling", "ScaledMomentumSGD", "Signum"]
