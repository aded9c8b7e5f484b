"""Hessian-vector products of a loss on one batch: ``v -> H v`` over the concatenated trainable parameters.

Conventions: ``H`` is the Hessian of ``loss_fn(model, batch)`` (a scalar, normally a mean over examples) with
respect to ``params`` (default: every parameter with ``requires_grad``), flattened and concatenated in that
order; vectors have ``size = sum(p.numel())`` entries. With a diagonal preconditioner ``s`` the operator is the
symmetric ``v -> s * H(s * v)``, i.e. ``S H S`` with ``S = diag(s)``.

Products come from double backward (``hvp="autograd"``, exact) or from gradients alone (``hvp="finite_difference"``,
:mod:`hildtools.curvature.finite_difference`); ``hvp="auto"`` picks (see :class:`HessianOperator`).

The model is evaluated as it is (train/eval modes are the caller's business) but nothing about it changes:
``.grad`` is never touched (``torch.autograd.grad`` only), buffers such as BatchNorm running statistics are
read from copies, and the global RNG streams are restored (a train-mode dropout mask is drawn once and reused).
Sharded models (FSDP1 wrappers, FSDP2 ``fully_shard``) are the exception: their forward needs their own parameter
tensors, so finite differences shift the local shards in place and restore them, and every ``.grad``, bitwise.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from hildtools._checks import check_choice
from hildtools.batches import map_tensors
from hildtools.curvature._random import gaussian_vector
from hildtools.curvature.finite_difference import (
    InPlaceGradient,
    central_differences,
    extrapolated,
    finite_difference_step,
)
from hildtools.curvature.lanczos import local_inner
from hildtools.distributed import all_finite, all_reduce_mean, sharded_inner, unwrap
from hildtools.sharding import local_tensor, model_sharding, reshard

HVP_BACKENDS = ("autograd", "func")
HVP_METHODS = ("auto", "autograd", "finite_difference")

AGREEMENT = 1e-2
"""``hvp="auto"`` keeps double backward when its product on a random direction is within ``AGREEMENT`` (relative)
of the finite-difference one, or within ten times the finite differences' own error estimate (then the loss is
not smooth enough for finite differences to judge, e.g. ReLU kinks, and double backward is kept)."""

MAX_BLOCK = 16
"""Most columns per batched double backward in :meth:`HessianOperator.matmat`."""

DOUBLE_BACKWARD_ERRORS = ("derivative for", "differentiate twice", "double backward", "not implemented")

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


def has_custom_function(root: Any) -> bool:
    """Whether the autograd graph below the node ``root`` holds a custom (Python) ``autograd.Function``."""
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            return True
        seen.add(node)
        stack.extend(child for child, _ in node.next_functions)
    return False


def _timed(function: Callable[[Tensor], Tensor], argument: Tensor) -> tuple[Tensor, float]:
    """``(function(argument), seconds)``, waiting for queued CUDA work before and after."""
    if argument.is_cuda:
        torch.cuda.synchronize(argument.device)
    start = time.perf_counter()
    result = function(argument)
    if result.is_cuda:
        torch.cuda.synchronize(result.device)
    return result, time.perf_counter() - start


class HessianOperator:
    """The Hessian of ``loss_fn(model, batch)`` as a matrix-free symmetric operator on flat parameter vectors.

    How products are computed (``hvp``):

    * ``"autograd"``: double backward. With ``backend="autograd"`` the gradient graph ``g = dL/dtheta`` is built
      once, with ``create_graph=True``, and every product is one extra backward ``d<g, v>/dtheta`` through it (the
      cheapest way to do many products on one batch); with ``backend="func"`` every product is a fresh
      forward-over-reverse ``torch.func.jvp(torch.func.grad(L), theta, v)`` (less memory held, more compute).
    * ``"finite_difference"``: gradients only, four per product (central differences with Richardson
      extrapolation, :mod:`hildtools.curvature.finite_difference`); works for sharded models, fused kernels and
      ``once_differentiable`` functions, assumes a smooth loss. ``last_error`` holds the relative error estimate of
      the last product, ``product_error`` the largest so far (0 for double backward, exact up to rounding; NaN
      for plain central differences, which have no estimate); Lanczos adds it to its error bounds.
    * ``"auto"`` (default): finite differences for sharded (FSDP) models; otherwise one double-backward product on
      a random direction at construction, compared with a finite-difference one where the loss's graph holds a
      custom ``autograd.Function`` (built-in operations' double backward is exact or raises): double backward is
      kept when it runs and agrees (see :data:`AGREEMENT`), else finite differences are used, with a one-line
      warning (double backward missing, e.g. fused attention, or wrong, e.g. a ``once_differentiable`` function
      dropping second-order terms). ``hvp`` then holds the method chosen.

    Computation runs in ``dtype`` (default: the parameters' dtype, fp32 for bf16/fp16 models, whose weights,
    buffers and floating inputs are then upcast), with autocast disabled. Under ``torch.distributed`` every
    product is averaged over ranks, so each rank holds the Hessian of the mean of the per-rank losses (the
    global mean loss when ranks hold equally many examples); call :meth:`matvec` on every rank. For a sharded
    model vectors are the concatenated local shards of the parameters (``size`` entries on this rank,
    ``dimension`` in all), :attr:`inner` is the all-reduced inner product and products are in the parameters'
    own dtype.

    Args:
        model: the module; DistributedDataParallel/DataParallel wrappers are removed (under FSDP1 pass the root
            wrapper, whose forward gathers the root's parameters).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        batch: whatever ``loss_fn`` takes, on the model's device.
        params: parameters to differentiate (default: all with ``requires_grad``); order defines the layout.
        backend: ``"autograd"`` or ``"func"``: how double backward is done.
        hvp: ``"auto"``, ``"autograd"`` or ``"finite_difference"`` (see above).
        preconditioner: diagonal ``s`` (flat, ``size`` entries, or one tensor per parameter): the operator
            becomes ``v -> s * H(s * v)``.
        dtype: dtype of the products (see above).
        extrapolate: Richardson extrapolation of the finite differences (4 gradients per product, error
            ``O(h^4)``) or plain central differences (2 gradients, ``O(h^2)``).

    Raises:
        ValueError: unknown ``backend``/``hvp``, ``hvp="autograd"`` for a sharded model, no trainable parameters,
            ``params`` not in the model, a preconditioner of the wrong size, a non-scalar loss.
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
        hvp: str = "auto",
        preconditioner: Tensor | Sequence[Tensor] | None = None,
        dtype: torch.dtype | None = None,
        extrapolate: bool = True,
    ) -> None:
        check_choice("backend", backend, HVP_BACKENDS)
        check_choice("hvp", hvp, HVP_METHODS)
        self.model = unwrap(model)
        self.sharded = model_sharding(self.model)
        if self.sharded is not None and hvp == "autograd":
            raise ValueError(
                f"hvp='autograd' is impossible for a sharded ({self.sharded}) model: double backward "
                "cannot run through sharded parameters; use hvp='finite_difference' or 'auto'"
            )
        if self.sharded:
            reshard(self.model)  # so that the registered parameters are the shards
        self.params = trainable_params(self.model, params)
        self.backend = backend
        self.extrapolate = bool(extrapolate)
        self.device = self.params[0].device
        self.local = [local_tensor(p) for p in self.params] if self.sharded else self.params
        self.dtype = self.local[0].dtype if self.sharded else compute_dtype(self.params, dtype)
        self.inner = sharded_inner if self.sharded else local_inner
        self.shapes = [p.shape for p in self.local]
        self.sizes = [p.numel() for p in self.local]
        self.size = sum(self.sizes)
        self.dimension = (
            round(self.inner(*[torch.ones(self.size, dtype=torch.float64, device=self.device)] * 2).item())
            if self.sharded
            else self.size
        )
        self.num_matvecs = 0
        self.block_size: int | None = None  # columns per batched double backward in matmat; None: not measured
        self.last_error: float = math.nan
        self.product_error: float = 0.0
        names = {id(p): name for name, p in self.model.named_parameters(remove_duplicate=False)}
        if any(id(p) not in names for p in self.params):
            raise ValueError("params must be parameters of model")
        self.names = ["model." + names[id(p)] for p in self.params]
        self.scale = None if preconditioner is None else self._flat_preconditioner(preconditioner)
        self.wrapped = _LossOf(self.model, loss_fn)
        self.loss_fn = loss_fn
        self.batch = batch
        self.rng_devices = [self.device.index or 0] if self.device.type == "cuda" else []
        self.rng_state = (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in self.rng_devices])
        self.grads: list | None = None
        self.custom_functions = True  # whether the loss's graph may hold a custom autograd.Function (unknown yet)
        if self.sharded:  # the loss is checked by a first gradient (a forward alone would leave the root gathered)
            self.gradient_at = InPlaceGradient(self.model, self.loss_fn, self.batch, self.params)
            with self._evaluation():
                self.gradient_at([torch.zeros(shape, device=self.device) for shape in self.shapes], 0.0)
            self._check(self.gradient_at.loss.reshape(()))
            self.hvp = "finite_difference"
        elif hvp == "finite_difference" or backend == "func":
            with self._evaluation(), torch.no_grad():
                self._check(self._loss([p.detach().to(self.dtype) for p in self.params]))
            self.hvp = hvp
        else:
            self._build_graph()
            self.hvp = hvp
        if self.hvp == "finite_difference":
            self._prepare_finite_differences()
        elif self.hvp == "auto":
            self.hvp = self._choose()

    def _build_graph(self) -> None:
        leaves = [p if p.dtype == self.dtype else p.detach().to(self.dtype).requires_grad_() for p in self.params]
        with self._evaluation():
            loss = self._loss(leaves)
            self._check(loss)
            grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        self.leaves = leaves
        self.grads = [(i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self.custom_functions = has_custom_function(loss.grad_fn)

    def _prepare_finite_differences(self) -> None:
        """The unperturbed parameters (detached, in the compute dtype: copied only where it differs) and their norm,
        which scales the step; prepared only where finite differences are used or compared."""
        if self.sharded:
            theta = torch.cat([t.reshape(-1) for t in self.gradient_at.saved])
        else:
            self.theta = [p.detach().to(self.dtype) for p in self.params]
            theta = torch.cat([t.reshape(-1) for t in self.theta])
        self.theta_norm = self._norm(theta.double())

    def _norm(self, vector: Tensor) -> float:
        return math.sqrt(max(self.inner(vector, vector).item(), 0.0))

    def _choose(self) -> str:
        """``"autograd"`` or ``"finite_difference"`` from one product both ways on a random unit direction. Where
        the loss's graph holds no custom ``autograd.Function`` only one double-backward product runs (on a zero
        vector, no random direction to draw): built-in operations' double backward is exact or raises (caught
        here); only a hand-written backward (e.g. ``once_differentiable``) can be silently wrong."""
        try:
            if self.backend == "autograd" and self.grads is None:
                self._build_graph()
            if self.custom_functions:
                vector = gaussian_vector(self.size, torch.Generator().manual_seed(0), self.device, self.dtype)
                vector = vector / self._norm(vector)
            else:  # the product only has to run (a missing double backward raises whatever the vector)
                vector = torch.zeros(self.size, device=self.device, dtype=self.dtype)
            exact = all_reduce_mean(self._exact(vector))
        except (RuntimeError, NotImplementedError) as failure:
            message = str(failure).split("\n")[0]
            if not any(text in message for text in DOUBLE_BACKWARD_ERRORS):
                raise
            warnings.warn(f"hvp='auto': double backward fails ({message}); using finite differences", stacklevel=3)
            self.grads = None
            self._prepare_finite_differences()
            return "finite_difference"
        if not self.custom_functions:
            return "autograd"
        self._prepare_finite_differences()
        product, error = extrapolated(*all_reduce_mean(torch.stack(self._differences(vector, extrapolate=True))))
        gap, scale, noise = self._norm(exact - product), self._norm(product), self._norm(error)
        if gap <= max(AGREEMENT * scale, 10 * noise):
            return "autograd"
        warnings.warn(
            f"hvp='auto': double backward disagrees with finite differences (relative difference "
            f"{gap / max(scale, torch.finfo(torch.float64).tiny):.2g}; e.g. a once_differentiable function "
            "drops second-order terms); using finite differences",
            stacklevel=3,
        )
        self.grads = None
        return "finite_difference"

    def _flat_preconditioner(self, preconditioner: Tensor | Sequence[Tensor]) -> Tensor:
        if not isinstance(preconditioner, Tensor):
            preconditioner = torch.cat([local_tensor(s).reshape(-1) for s in preconditioner])
        if preconditioner.numel() != self.size:
            raise ValueError(
                f"preconditioner must have {self.size} entries (one per parameter), got {preconditioner.numel()}"
            )
        return preconditioner.detach().reshape(-1).to(self.device, self.dtype)

    @contextlib.contextmanager
    def _evaluation(self) -> Iterator[None]:
        """Grad on (even under inference mode), autocast off, the global RNG forked at its state at construction."""
        with (
            torch.random.fork_rng(devices=self.rng_devices),
            torch.inference_mode(False),
            torch.enable_grad(),
            torch.autocast(self.device.type, enabled=False),
        ):
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
            raise ValueError(
                f"loss_fn must return a scalar tensor, got {type(loss).__name__} "
                f"of shape {getattr(loss, 'shape', None)}"
            )
        return loss.reshape(()).to(self.dtype)

    @staticmethod
    def _check(loss: Tensor) -> None:
        if not all_finite(loss):
            raise NonFiniteLossError(f"the loss is not finite ({loss.item()}); its Hessian is undefined")

    def split(self, vector: Tensor) -> list[Tensor]:
        """A flat vector as one view per parameter (per local shard when sharded), shaped like it."""
        return [part.view(shape) for part, shape in zip(vector.split(self.sizes), self.shapes)]

    def matvec(self, vector: Tensor) -> Tensor:
        """``H v`` (or ``s * H(s * v)``) for a flat vector ``v`` of ``size`` entries, in ``self.dtype``."""
        vector = vector.to(self.device, self.dtype).reshape(-1)
        if vector.numel() != self.size:
            raise ValueError(f"vector must have {self.size} entries, got {vector.numel()}")
        if self.scale is not None:
            vector = vector * self.scale
        if self.hvp == "finite_difference":
            product = self._hvp_finite_difference(vector)
        else:
            product = all_reduce_mean(self._exact(vector))
        if self.scale is not None:
            product = product * self.scale
        self.num_matvecs += 1
        return product

    __matmul__ = matvec

    def matmat(self, vectors: Tensor) -> Tensor:
        """``H V`` for the columns of ``V`` (``size x b``), counted as ``b`` products; the result's columns are
        contiguous.

        With the autograd backend, blocks of up to ``MAX_BLOCK`` columns can go through one batched double backward
        (``torch.autograd.grad(..., is_grads_batched=True)``, a ``vmap`` over the grad outputs). Whether that is
        faster per vector than separate products depends on the model and the device (on one CPU thread: 15% faster
        at 6k parameters, 11-33% slower at 1M), so the first call with at least three columns times one single
        product against one batched block of the next ``min(b - 1, MAX_BLOCK)`` (timings averaged over ranks, so
        every rank decides alike) and keeps the faster (``self.block_size``: 1 or ``MAX_BLOCK``; set it to skip the
        measurement). If an operation has no batching rule, products are single. The func backend and finite
        differences multiply one column at a time.
        """
        rows = vectors.to(self.device, self.dtype).reshape(self.size, -1).T
        if self.hvp != "autograd" or self.backend != "autograd" or not self.grads:
            self.block_size = 1
        if self.block_size is None and len(rows) >= 3:  # a batched block of at least two to time
            return self._measure_block_size(rows).T
        return torch.cat([self._block(block) for block in rows.split(self.block_size or 1)]).T

    def _block(self, rows: Tensor) -> Tensor:
        """``H v`` for each row ``v``: in one batched double backward, or one product per row when ``block_size`` is
        1 (or batching is refused)."""
        if self.block_size == 1 or len(rows) == 1:
            return torch.stack([self.matvec(row) for row in rows])
        try:
            products = self._hvp_autograd_batched(rows if self.scale is None else rows * self.scale)
        except RuntimeError:  # an operation without a vmap rule: one product per row from now on
            self.block_size = 1
            return self._block(rows)
        if self.scale is not None:
            products = products * self.scale
        self.num_matvecs += len(rows)
        return all_reduce_mean(products)

    def _measure_block_size(self, rows: Tensor) -> Tensor:
        """``H v`` for each row, timing the first alone against a batched block of the next ones to set
        ``block_size``."""
        width = min(len(rows) - 1, MAX_BLOCK)
        self.block_size = width
        single, single_seconds = _timed(self._block, rows[:1])
        batched, batched_seconds = _timed(self._block, rows[1 : 1 + width])
        seconds = all_reduce_mean(torch.tensor([single_seconds, batched_seconds / width], device=self.device))
        self.block_size = 1 if self.block_size == 1 or seconds[1] >= seconds[0] else MAX_BLOCK
        rest = rows[1 + width :]
        return torch.cat([single, batched, *([self.matmat(rest.T).T] if len(rest) else [])])

    def _hvp_autograd_batched(self, rows: Tensor) -> Tensor:
        count = rows.shape[0]
        pieces = [part.reshape(count, *shape) for part, shape in zip(rows.split(self.sizes, 1), self.shapes)]
        return self._flat(self._double_backward(pieces, batched=True), count)

    def _double_backward(self, pieces: Sequence[Tensor], batched: bool = False) -> tuple[Tensor | None, ...]:
        """``d<g, v>/dtheta`` per parameter through the saved gradient graph (``v`` given per parameter; with
        ``batched`` every piece has a leading dimension of vectors, multiplied in one vmapped backward)."""
        with torch.inference_mode(False), torch.enable_grad():
            return torch.autograd.grad(
                [g for _, g in self.grads],
                self.leaves,
                grad_outputs=[pieces[i] for i, _ in self.grads],
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=batched,
            )

    def _flat(self, tensors: Sequence[Tensor | None], count: int | None = None) -> Tensor:
        """Per-parameter tensors (None: zeros) as one flat vector, or ``count`` flat rows."""
        leading = () if count is None else (count,)
        return torch.cat(
            [
                torch.zeros(*leading, n, device=self.device, dtype=self.dtype) if t is None else t.reshape(*leading, n)
                for t, n in zip(tensors, self.sizes)
            ],
            -1,
        )

    def _exact(self, vector: Tensor) -> Tensor:
        return self._hvp_autograd(vector) if self.backend == "autograd" else self._hvp_func(vector)

    def _hvp_finite_difference(self, vector: Tensor) -> Tensor:
        differences = self._differences(vector)
        if self.sharded is None:  # FSDP's backward already averages over ranks
            differences = tuple(all_reduce_mean(torch.stack(differences)))
        product, error = extrapolated(*differences)
        if error is None:
            self.product_error = math.nan
        else:
            self.last_error = self._norm(error) / max(self._norm(product), torch.finfo(torch.float64).tiny)
            self.product_error = max(self.product_error, self.last_error)  # stays NaN once NaN
        return product

    def _differences(self, vector: Tensor, extrapolate: bool | None = None) -> tuple[Tensor, ...]:
        """``(D(h), D(h/2))`` (extrapolated, default ``self.extrapolate``) or ``(D(h),)`` on this rank (before any
        reduction); zeros for ``v = 0``."""
        extrapolate = self.extrapolate if extrapolate is None else extrapolate
        norm = self._norm(vector)
        if norm == 0:
            return (torch.zeros_like(vector),) * (2 if extrapolate else 1)
        pieces = self.split(vector)
        step = finite_difference_step(self.dtype, self.theta_norm, norm, extrapolate)
        gradient = self.gradient_at if self.sharded else self._gradient_at

        def at(t: float) -> Tensor:
            with self._evaluation():
                return gradient(pieces, t).to(self.dtype)

        coarse, fine = central_differences(at, step, extrapolate)
        return (coarse,) if fine is None else (coarse, fine)

    def _gradient_at(self, pieces: Sequence[Tensor], t: float) -> Tensor:
        """``g(theta + t v)`` on perturbed copies of the parameters (the model's own tensors are not touched)."""
        leaves = [(theta + t * piece).requires_grad_() for theta, piece in zip(self.theta, pieces)]
        grads = torch.autograd.grad(self._loss(leaves), leaves, allow_unused=True)
        return self._flat(grads)

    def _hvp_autograd(self, vector: Tensor) -> Tensor:
        if not self.grads:  # the loss is at most linear in the parameters
            return torch.zeros_like(vector)
        return self._flat(self._double_backward(self.split(vector)))

    def _hvp_func(self, vector: Tensor) -> Tensor:
        theta = torch.cat([p.detach().reshape(-1).to(self.dtype) for p in self.params])

        def loss_of(flat: Tensor) -> Tensor:
            return self._loss(self.split(flat))

        with self._evaluation():
            _, product = torch.func.jvp(torch.func.grad(loss_of), (theta,), (vector,))
        return product.detach()
