"""Side-effect-free evaluation of the user's model on fixed probe data.

Every diagnostic runs its extra forward/backward passes inside :meth:`Probe.session`, which leaves training
exactly as it was: parameters and ``.grad`` (only ``torch.autograd.grad`` is used, never ``.backward()``),
per-submodule train/eval modes, BatchNorm running statistics and ``num_batches_tracked``, the global CPU and
CUDA RNG streams, autocast and grad mode. It works from training hooks, from validation inside ``fit``
(``no_grad``) and from ``trainer.validate`` (``inference_mode``).

BatchNorm mode (``bn_mode``) decides which loss is probed:

* ``"eval"``: every module in eval mode; BatchNorm uses its running statistics (a deterministic landscape,
  PyHessian's choice).
* ``"train"``: BatchNorm uses the statistics of the probe batch (the loss the optimizer sees); its running
  statistics are restored afterwards. Dropout is off in both modes, so the probed loss is deterministic.

The two can differ several-fold in sharpness on BatchNorm networks; the choice is logged nowhere implicitly,
so set it explicitly when it matters.

Loss, inputs and targets. The default loss is the module's own ``training_step`` on the whole probe batch, exactly as
training computes it: a Hugging Face model that computes its loss from the batch's ``labels`` gets them. The
monitors that only run the model forward (features, NTK) call the module on ``unpack(batch)``'s inputs and use its
targets as labels (:func:`hildtools.batches.default_unpack`): a dict batch reaches the module whole, every entry but
the targets as a keyword argument (``module(**inputs)``: ``input_ids``, ``attention_mask``, ``token_type_ids``,
``pixel_values``, ...), so the module's ``forward`` must accept them and return the outputs (logits); without
``labels`` a Hugging Face model returns logits and no loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from hildtools._checks import check_choice, check_int
from hildtools.batches import (
    batch_size,
    concat_batches,
    default_unpack,
    map_tensors,
    slice_batch,
)
from hildtools.distributed import is_distributed, unwrap
from hildtools.norm_layers import BATCH_NORMS, RUNNING_STAT_NORMS

BN_MODES = ("eval", "train")

LossFn = Callable[[nn.Module, Any], Tensor]
Unpack = Callable[[Any], tuple]


@contextlib.contextmanager
def preserved_rng(device: torch.device | None = None, generators: Iterable[torch.Generator] = ()) -> Iterator[None]:
    """Restore the global CPU RNG, the CUDA RNG of ``device`` and the given generators on exit."""
    cuda = device is not None and device.type == "cuda"
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if cuda else None
    saved = [(g, g.get_state()) for g in generators]
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda:
            torch.cuda.set_rng_state(cuda_state, device)
        for g, state in saved:
            g.set_state(state)


def dataloader_generators(loader: Any) -> list[torch.Generator]:
    """The private generators a DataLoader (its sampler, its batch sampler's sampler) draws shuffles from."""
    owners = [
        loader,
        getattr(loader, "sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
    ]
    found = []
    for owner in owners:
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not f for f in found):
            found.append(g)
    return found


def draw_examples(batches: Iterable, n: int) -> Any:
    """The first ``n`` examples of an iterable of batches, concatenated, as CPU/device tensors as they come.

    The global RNG and the loader's own generators are restored afterwards: starting a shuffling DataLoader's
    iterator draws from them, and training must see the same order as without the probe.
    """
    taken, count = [], 0
    with preserved_rng(generators=dataloader_generators(batches)):
        for batch in batches:
            taken.append(batch)
            count += batch_size(batch)
            if count >= n:
                break
    if not taken:
        raise ValueError("probe_data: the dataloader yielded no batches")
    return slice_batch(concat_batches(taken), n)


def module_device(module: nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def training_step_loss(module: nn.Module, batch: Any) -> Tensor:
    """The module's own ``training_step(batch, 0)`` loss, with ``self.log``/``self.log_dict`` silenced."""
    if not hasattr(module, "training_step"):
        raise TypeError(
            "loss_fn: the model has no `training_step`; pass `loss_fn=lambda model, batch: ...` returning a scalar"
        )
    silence = ("log", "log_dict")
    for name in silence:
        setattr(module, name, lambda *args, **kwargs: None)
    try:
        out = module.training_step(batch, 0)
    finally:
        for name in silence:
            delattr(module, name)
    if isinstance(out, Mapping):
        out = out["loss"]
    if not isinstance(out, Tensor):
        raise TypeError(
            "loss_fn: `training_step` returned no loss tensor; pass `loss_fn=lambda model, batch: ...` instead"
        )
    return out


class Probe:
    """Fixed probe data and a side-effect-free session on the user's model.

    Args:
        data: ``None`` (draw ``probe_size`` examples once from the train dataloader at fit start), a batch
            (tensor, or tuple/list/dict of tensors), or an iterable of batches such as a ``DataLoader``.
        probe_size: number of examples drawn when ``data`` is ``None`` or an iterable (>= 1).
        loss_fn: ``loss_fn(module, batch) -> scalar``; default: the module's ``training_step`` with logging
            suppressed.
        unpack: ``unpack(batch) -> (inputs, targets)`` for the forward-only monitors; default
            :func:`hildtools.batches.default_unpack` (a dict batch: every entry but the targets, as keyword arguments).
        bn_mode: ``"eval"`` or ``"train"`` (see the module docstring).

    Raises:
        ValueError: ``probe_size < 1`` or an unknown ``bn_mode``.
        TypeError: ``loss_fn``/``unpack`` not callable.
    """

    def __init__(
        self,
        data: Any = None,
        probe_size: int = 256,
        loss_fn: LossFn | None = None,
        unpack: Unpack | None = None,
        bn_mode: str = "eval",
    ) -> None:
        check_int("probe_size", probe_size, 1)
        check_choice("bn_mode", bn_mode, BN_MODES)
        for name, fn in (("loss_fn", loss_fn), ("unpack", unpack)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
        self.data = data
        self.probe_size = probe_size
        self.loss_fn = loss_fn
        self._unpack = unpack or default_unpack
        self.bn_mode = bn_mode
        self.batch: Any = None
        self.rank_weight: float | None = None
        self.math_attention = True  # see session(); False for gradient-only diagnostics (finite differences)

    def prepare(self, trainer: Any = None, module: nn.Module | None = None) -> Any:
        """Fix the probe batch (once) and move it to the module's device. Returns it.

        Under torch.distributed, call it on every rank: the first call agrees on the ranks' probe sizes.
        """
        if self.batch is None:
            self.batch = self._draw(trainer)
        device = module_device(module) if module is not None else torch.device("cpu")
        if module is not None:
            self.batch = map_tensors(lambda t: t.to(device), self.batch)
        if self.rank_weight is None:
            self.rank_weight = self._rank_weight(device)
        return self.batch

    def _rank_weight(self, device: torch.device) -> float:
        """``W n_r / sum_s n_s``: scaling rank r's mean loss by it makes the mean over the W ranks of the scaled
        losses (what all-reduced diagnostics compute) the mean loss over the union of the probe sets."""
        if not is_distributed():
            return 1.0
        count = torch.tensor([float(batch_size(self.batch))], device=device)  # on the device NCCL needs
        total = count.clone()
        torch.distributed.all_reduce(total)
        return float(torch.distributed.get_world_size() * count / total)

    def _draw(self, trainer: Any) -> Any:
        data = self.data
        if data is None:
            data = getattr(trainer, "train_dataloader", None) if trainer is not None else None
            if data is None:
                raise ValueError(
                    "probe_data: no probe data given and no train dataloader to draw from; pass `probe_data=`"
                )
        if isinstance(data, (Tensor, Mapping)) or (
            isinstance(data, (tuple, list)) and data and isinstance(data[0], Tensor)
        ):
            return data
        return draw_examples(data, self.probe_size)

    def unpack(self, batch: Any) -> tuple:
        return self._unpack(batch)

    def loss(self, module: nn.Module, batch: Any) -> Tensor:
        """The probe loss as an fp32 (or fp64) scalar; under DDP weighted by this rank's share of the probe
        examples (see :meth:`_rank_weight`), so rank averages equal the union's mean loss."""
        loss = self.loss_fn(module, batch) if self.loss_fn is not None else training_step_loss(module, batch)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
        loss = loss.reshape(()) if loss.dtype == torch.float64 else loss.reshape(()).float()
        return loss if self.rank_weight in (None, 1.0) else loss * self.rank_weight

    @contextlib.contextmanager
    def session(self, module: nn.Module) -> Iterator[nn.Module]:
        """Probe mode on the unwrapped ``module``; everything training depends on is restored on exit.

        Inside: grad enabled (even under ``inference_mode``), autocast off, dropout off, BatchNorm per ``bn_mode``,
        and, while ``math_attention`` is True (the default), ``scaled_dot_product_attention`` on its math kernel (the
        fused kernels have no double backward and no vmap rule; the math kernel computes the same function).
        Diagnostics that need only gradients set ``math_attention = False`` and keep the fused kernels training
        uses (O(T) instead of O(T^2) memory per head).
        Inference-mode tensors in the probe batch are cloned into normal ones by :meth:`prepare_batch`.
        """
        module = unwrap(module)
        device = module_device(module)
        modes = [(m, m.training) for m in module.modules()]
        norms = [m for m in module.modules() if isinstance(m, RUNNING_STAT_NORMS)]
        saved_buffers = [
            (buf, buf.detach().clone()) for m in norms for buf in m.buffers(recurse=False) if buf is not None
        ]
        grads = [(p, p.grad) for p in module.parameters()]
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(torch.autocast(device_type=device.type, enabled=False))
            stack.enter_context(preserved_rng(device))
            if self.math_attention:
                stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
            try:
                module.eval()
                if self.bn_mode == "train":
                    for m in norms:
                        if isinstance(m, BATCH_NORMS):
                            m.train()
                yield module
            finally:
                for m, training in modes:
                    m.training = training
                with torch.no_grad():
                    for buf, saved in saved_buffers:
                        buf.copy_(saved)
                for p, grad in grads:
                    p.grad = grad

    def prepare_batch(self, batch: Any | None = None) -> Any:
        """The probe batch as normal (non-inference) tensors; call inside :meth:`session`."""
        batch = self.batch if batch is None else batch
        return map_tensors(lambda t: t.clone() if t.is_inference() else t, batch)

    def state_dict(self) -> dict:
        """The drawn probe batch (tensors only, on CPU) so a resumed run probes the same examples."""
        if self.batch is None or self.data is not None:
            return {}
        return {"batch": map_tensors(lambda t: t.detach().cpu(), self.batch)}

    def load_state_dict(self, state: dict) -> None:
        if "batch" in state:
            self.batch = state["batch"]
