"""Hessian-vector products of a loss on one batch: ``v -> H v`` over the concatenated trainable parameters.

Conventions: ``H`` is the Hessian of ``loss_fn(model, batch)`` (a scalar, normally a mean over examples) with
respect to ``params`` (default: every parameter with ``requires_grad``), flattened and concatenated in that
order; vectors have ``size = sum(p.numel())`` entries. With a diagonal preconditioner ``s`` the operator is the
symmetric ``v -> s * H(s * v)``, i.e. ``S H S`` with ``S = diag(s)``.

The model is evaluated as it is (train/eval modes are the caller's business) but nothing about it changes:
``.grad`` is never touched (``torch.autograd.grad`` only), buffers such as BatchNorm running statistics are
read from copies, and the global RNG streams are restored (a train-mode dropout mask is drawn once and reused).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from hildtools._checks import check_choice
from hildtools.batches import map_tensors
from hildtools.distributed import all_finite, all_reduce_mean, unwrap

HVP_BACKENDS = ("autograd", "func")

LossFn = Callable[[nn.Module, Any], Tensor]


class NonFiniteLossError(ArithmeticError):
    """The loss on the probe batch is NaN or infinite, so its Hessian is undefined (callers may skip)."""


class _LossOf(nn.Module):
    """``forward(batch) = loss_fn(model, batch)``, so ``functional_call`` can substitute the model's tensors."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


def compute_dtype(params: Sequence[Tensor], dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of Hessian-vector products: ``dtype`` if given, else the parameters' (fp32 for bf16/fp16)."""
    if dtype is not None:
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        return dtype
    param_dtype = params[0].dtype
    return param_dtype if param_dtype in (torch.float32, torch.float64) else torch.float32


def trainable_params(model: nn.Module, params: Iterable[Tensor] | None) -> list[Tensor]:
    """``params`` as a list (default: the model's parameters with ``requires_grad``), checked to be non-empty."""
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    if not params:
        raise ValueError("params: the model has no trainable parameters (none with requires_grad)")
    return params


class HessianOperator:
    """The Hessian of ``loss_fn(model, batch)`` as a matrix-free symmetric operator on flat parameter vectors.

    With ``backend="autograd"`` (default) the gradient graph ``g = dL/dtheta`` is built once, with
    ``create_graph=True``, and every product is one extra backward ``d<g, v>/dtheta`` through it (the cheapest
    way to do many products on one batch). With ``backend="func"`` every product is a fresh forward-over-reverse
    ``torch.func.jvp(torch.func.grad(L), theta, v)`` (less memory held between products, more compute).

    Computation runs in ``dtype`` (default: the parameters' dtype, fp32 for bf16/fp16 models, whose weights,
    buffers and floating inputs are then upcast), with autocast disabled. Under ``torch.distributed`` every
    product is averaged over ranks, so each rank holds the Hessian of the mean of the per-rank losses (the
    global mean loss when ranks hold equally many examples); call :meth:`matvec` on every rank.

    Args:
        model: the module; DistributedDataParallel/DataParallel wrappers are removed.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        batch: whatever ``loss_fn`` takes, on the model's device.
        params: parameters to differentiate (default: all with ``requires_grad``); order defines the layout.
        backend: ``"autograd"`` or ``"func"``.
        preconditioner: diagonal ``s`` (flat, ``size`` entries, or one tensor per parameter): the operator
            becomes ``v -> s * H(s * v)``.
        dtype: dtype of the products (see above).

    Raises:
        ValueError: unknown ``backend``, no trainable parameters, ``params`` not in the model, a preconditioner
            of the wrong size, a non-scalar loss.
        NonFiniteLossError: the loss is NaN or infinite.

    Example:
        >>> model = nn.Linear(3, 1)
        >>> batch = (torch.randn(8, 3), torch.randn(8, 1))
        >>> op = HessianOperator(model, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), batch)
        >>> op.matvec(torch.ones(op.size)).shape
        torch.Size([4])
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Any,
        *,
        params: Iterable[Tensor] | None = None,
        backend: str = "autograd",
        preconditioner: Tensor | Sequence[Tensor] | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_choice("backend", backend, HVP_BACKENDS)
        self.model = unwrap(model)
        self.params = trainable_params(self.model, params)
        self.backend = backend
        self.device = self.params[0].device
        self.dtype = compute_dtype(self.params, dtype)
        self.shapes = [p.shape for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        self.size = sum(self.sizes)
        self.num_matvecs = 0
        names = {id(p): name for name, p in self.model.named_parameters(remove_duplicate=False)}
        if any(id(p) not in names for p in self.params):
            raise ValueError("params must be parameters of model")
        self.names = ["model." + names[id(p)] for p in self.params]
        self.scale = None if preconditioner is None else self._flat_preconditioner(preconditioner)
        self.wrapped = _LossOf(self.model, loss_fn)
        self.batch = batch
        self.rng_devices = [self.device.index or 0] if self.device.type == "cuda" else []
        self.rng_state = (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in self.rng_devices])
        if backend == "autograd":
            leaves = [p if p.dtype == self.dtype else p.detach().to(self.dtype).requires_grad_() for p in self.params]
            with self._evaluation():
                loss = self._loss(leaves)
                self._check(loss)
                grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
            self.leaves = leaves
            self.grads = [(i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad]
        else:
            with self._evaluation(), torch.no_grad():
                self._check(self._loss([p.detach().to(self.dtype) for p in self.params]))

    def _flat_preconditioner(self, preconditioner: Tensor | Sequence[Tensor]) -> Tensor:
        if not isinstance(preconditioner, Tensor):
            preconditioner = torch.cat([s.reshape(-1) for s in preconditioner])
        if preconditioner.numel() != self.size:
            raise ValueError(f"preconditioner must have {self.size} entries (one per parameter), "
                             f"got {preconditioner.numel()}")
        return preconditioner.detach().reshape(-1).to(self.device, self.dtype)

    @contextlib.contextmanager
    def _evaluation(self) -> Iterator[None]:
        """Grad on (even under inference mode), autocast off, the global RNG forked at its state at construction."""
        with torch.random.fork_rng(devices=self.rng_devices), torch.inference_mode(False), torch.enable_grad(), \
                torch.autocast(self.device.type, enabled=False):
            torch.set_rng_state(self.rng_state[0])
            for device, state in zip(self.rng_devices, self.rng_state[1]):
                torch.cuda.set_rng_state(state, device)
            yield

    def _loss(self, leaves: Sequence[Tensor]) -> Tensor:
        """The loss with the parameters replaced by ``leaves`` and buffers by fresh copies (in ``self.dtype``)."""
        tensors = dict(zip(self.names, leaves))
        for name, buffer in self.model.named_buffers():
            cast = buffer.is_floating_point() and buffer.dtype != self.dtype
            tensors["model." + name] = buffer.detach().to(self.dtype) if cast else buffer.detach().clone()
        batch = self.batch
        if self.dtype != self.params[0].dtype:
            batch = map_tensors(lambda t: t.to(self.dtype) if t.is_floating_point() else t, batch)
        loss = functional_call(self.wrapped, tensors, (batch,), strict=False)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} "
                             f"of shape {getattr(loss, 'shape', None)}")
        return loss.reshape(()).to(self.dtype)

    @staticmethod
    def _check(loss: Tensor) -> None:
        if not all_finite(loss):
            raise NonFiniteLossError(f"the loss is not finite ({loss.item()}); its Hessian is undefined")

    def split(self, vector: Tensor) -> list[Tensor]:
        """A flat vector as one view per parameter, shaped like it."""
        return [part.view(shape) for part, shape in zip(vector.split(self.sizes), self.shapes)]

    def matvec(self, vector: Tensor) -> Tensor:
        """``H v`` (or ``s * H(s * v)``) for a flat vector ``v`` of ``size`` entries, in ``self.dtype``."""
        vector = vector.to(self.device, self.dtype).reshape(-1)
        if vector.numel() != self.size:
            raise ValueError(f"vector must have {self.size} entries, got {vector.numel()}")
        if self.scale is not None:
            vector = vector * self.scale
        product = self._hvp_autograd(vector) if self.backend == "autograd" else self._hvp_func(vector)
        if self.scale is not None:
            product = product * self.scale
        self.num_matvecs += 1
        return all_reduce_mean(product)

    __matmul__ = matvec

    def _hvp_autograd(self, vector: Tensor) -> Tensor:
        pieces = self.split(vector)
        if not self.grads:  # the loss is at most linear in the parameters
            return torch.zeros_like(vector)
        with torch.inference_mode(False), torch.enable_grad():
            products = torch.autograd.grad(
                [g for _, g in self.grads], self.leaves, grad_outputs=[pieces[i] for i, _ in self.grads],
                retain_graph=True, allow_unused=True,
            )
        return torch.cat([
            (torch.zeros(n, device=self.device, dtype=self.dtype) if h is None else h.reshape(-1))
            for h, n in zip(products, self.sizes)
        ])

    def _hvp_func(self, vector: Tensor) -> Tensor:
        theta = torch.cat([p.detach().reshape(-1).to(self.dtype) for p in self.params])

        def loss_of(flat: Tensor) -> Tensor:
            return self._loss(self.split(flat))

        with self._evaluation():
            _, product = torch.func.jvp(torch.func.grad(loss_of), (theta,), (vector,))
        return product.detach()
