"""``backend="pyhessian"``: PyHessian's power iteration, for parity with published numbers, without its side effects.

PyHessian 0.1 puts the model in eval mode and leaves it there, accumulates into and then wipes ``.grad``, draws
from the global RNG and hard-codes ``"cuda"``. Here it runs on a wrapper whose forward is ``loss_fn(model,
batch)``, with ``cuda`` set from the model's device, and afterwards every module mode, every ``.grad`` tensor
and the global RNG streams are restored. Note its conventions: it always evaluates in eval mode, returns the
largest-MAGNITUDE eigenvalues (in the order found), its ``tol`` is a relative change between consecutive
power-iteration estimates, not an accuracy bound, and it fails on parameters that get no gradient.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
from torch import nn

from hildtools.curvature.hvp import LossFn
from hildtools.curvature.lanczos import Eigenpairs
from hildtools.distributed import unwrap


class _FixedBatchLoss(nn.Module):
    """``forward(anything) = loss_fn(model, batch)``: PyHessian calls ``model(inputs)`` then ``criterion``."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, batch: Any) -> None:
        super().__init__()
        self.model, self.loss_fn, self.batch = model, loss_fn, batch

    def forward(self, _: Any) -> torch.Tensor:
        return self.loss_fn(self.model, self.batch)


def _import_pyhessian() -> Any:
    try:
        from pyhessian import hessian
    except ImportError as error:
        raise ImportError(
            "backend='pyhessian' needs PyHessian: `pip install pyhessian` (or `pip install hildtools[pyhessian]`); "
            "the default backend='autograd' needs nothing extra"
        ) from error
    return hessian


def pyhessian_eigenpairs(
    model: nn.Module, loss_fn: LossFn, batch: Any, k: int, *, tol: float, max_iter: int
) -> Eigenpairs:
    """Top-k (largest magnitude) eigenpairs by ``pyhessian.hessian(...).eigenvalues(maxIter, tol, top_n=k)``.

    Returns:
        :class:`Eigenpairs` with PyHessian's eigenvalues and eigenvectors; ``residuals`` are NaN and
        ``converged`` is False (PyHessian reports neither); ``num_hvp`` counts its Hessian-vector products.

    Raises:
        ImportError: PyHessian is not installed.
    """
    hessian = _import_pyhessian()
    model = unwrap(model)
    device = next(model.parameters()).device
    wrapped = _FixedBatchLoss(model, loss_fn, batch)
    token = torch.zeros(1, device=device)  # PyHessian calls .cuda() on "inputs" and "targets"
    params = [p for p in model.parameters() if p.requires_grad]
    modes = [(module, module.training) for module in model.modules()]
    grads = [p.grad for p in params]
    counter = [0]
    handle = params[0].register_hook(lambda grad: counter.__setitem__(0, counter[0] + 1))
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        for p in params:
            p.grad = None
        current_cuda = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        with (
            torch.random.fork_rng(devices=rng_devices),
            torch.enable_grad(),
            current_cuda,
            torch.autocast(device.type, enabled=False),
            warnings.catch_warnings(),
        ):
            # its .backward(create_graph=True) warns of a grad <-> graph cycle; the .grad restore below breaks it
            warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
            computer = hessian(wrapped, lambda loss, _: loss, data=(token, token), cuda=device.type == "cuda")
            values, vectors = computer.eigenvalues(maxIter=max_iter, tol=tol, top_n=k)
            del computer
    finally:
        handle.remove()
        for p, grad in zip(params, grads):
            p.grad = grad
        for module, training in modes:
            module.train(training)
    columns = [torch.cat([part.detach().reshape(-1) for part in vector]) for vector in vectors]
    nan = torch.full((k,), float("nan"), dtype=torch.float64)
    return Eigenpairs(torch.tensor(values, dtype=torch.float64), torch.stack(columns, 1), nan, False, counter[0] - 1)
