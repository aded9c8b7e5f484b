"""Empirical neural tangent kernel (NTK) of a batch of inputs: exact in memory-bounded chunks, or sketched.

For a model ``f(x; theta)`` with ``C`` outputs per example (its output flattened per example) and inputs
``x_1 .. x_n``, the Jacobian rows ``J_ia = d f_a(x_i) / d theta`` (``theta``: the chosen parameters, flattened
and concatenated) give, by ``output`` convention:

- ``"sum"`` (default): ``K_ij = sum_a <J_ia, J_ja>`` (n x n; the PyTorch NTK tutorial's ``"trace"``);
- ``"mean"``: the sum divided by ``C`` (neural-tangents' default ``trace_axes=(-1,)``);
- ``"index"``: ``K_ij = <J_ik, J_jk>`` for the single output ``k = output_index``;
- ``"projection"``: the kernel of the scalar output ``v^T f(x)``, ``v ~ N(0, I_C)`` drawn once from ``seed``
  (on the CPU, so the same on every device); ``E_v[K] = `` the ``"sum"`` kernel; one backward per example
  instead of ``C``;
- ``"full"``: the (nC) x (nC) kernel ``K[i*C + a, j*C + b] = <J_ia, J_jb>`` (``K.view(n, C, n, C)``);
- ``"auto"`` (the monitor's default): ``"sum"`` when ``C <= AUTO_MAX_OUTPUTS`` (16), else ``"projection"``. The
  exact sum costs C Jacobian rows per example (C backward passes, and C times the Gram product), the projection one.
  As an estimate of the ``"sum"`` kernel the projection has ``Var_v(K_ij) = ||G_ij||_F^2 + <G_ij, G_ij^T>_F`` with
  ``G_ij = J_i J_j^T`` (C x C): on the diagonal a relative error ``sqrt(2) ||G_ii||_F / tr(G_ii)``, small when the
  outputs' Jacobians spread over many directions (many positions of a sequence), large for a few dominant outputs.
  ``v`` is fixed by ``seed``, so the kernels of one run are comparable with each other.

With one output per example (``C = 1``) all agree. A linear model ``f(x) = W x + b`` has
``K = C (X X^T + 1)`` under ``"sum"`` (``X X^T + 1`` under ``"mean"``; ``X X^T`` without bias).

Sequence outputs. An output of shape (n, T, V) (a causal language model's logits: T positions, V vocabulary
entries; any (n, d_1, ..., d_k) alike) is flattened per example, ``a = t*V + v`` and ``C = T*V``: ``"sum"``
sums over positions *and* vocabulary, ``K_ij = sum_t sum_v <J_itv, J_jtv>`` (the positions of x_i are paired
with the same positions of x_j); ``"mean"`` divides by ``T*V``; ``"projection"`` draws one Gaussian ``v`` of T*V
entries (the kernel of ``sum_t sum_v v_tv f_tv(x)``, unbiased for the sum over positions and vocabulary);
``"index"`` picks position ``a // V`` and token ``a % V``; ``"full"`` is (nTV) x (nTV). Hugging Face outputs
(``ModelOutput``, dicts) use their ``logits``. The exact sum over a vocabulary is rarely affordable: a 2-layer
GPT-2 with V = 256, T = 32 has C = 8192 rows per example: for n = 64 about 950 s of backward passes and
``n^2 C P`` = 4e12 multiply-adds (P = 120,576 parameters), before the recomputation of chunk pairs; ``"auto"``
projects such outputs before differentiating (one backward per example: 0.26 s for that model, n = 64, one CPU
thread; ``benchmarks/results/ntk_gpt2_cpu.md``).

Computation. Per-example Jacobian rows come from ``torch.func`` (``vmap`` over examples of ``jacrev`` of a
one-example ``functional_call``), ``chunk_size`` rows (example-output pairs) at a time. Where ``vmap`` fails through
the model (an op without a batching rule such as ``nn.GRU``, data-dependent control flow such as Hugging Face's
attention-mask utilities), the rows come one example at a time (a forward and a pullback each: the same values,
slower). The kernel is assembled
block by block from pairs of chunks, the second chunk of a pair being recomputed, so memory is about
``2 x chunk_size x P`` Jacobian entries (P parameters) plus the activations of ``chunk_size`` backward passes,
whatever ``n``; with ``m`` chunks the Jacobian is evaluated ``m (m + 1) / 2`` chunk-times. Products are taken in
fp64 (``product_dtype=torch.float32`` for speed) and summed and returned in fp64. A bf16/fp16 model is evaluated in
fp32: its parameters, floating buffers and floating inputs are upcast copies (the module is not touched).

Batch coupling. The model is evaluated as given: modes are not changed (hildtools' probe puts the model in eval
mode, so by default BatchNorm uses its running statistics and the kernel is the eval-mode NTK). A BatchNorm in
train mode (or without running statistics) couples the examples through the batch statistics; the kernel is then
that of the batched function ``x -> f(x)`` with the statistics of the whole ``x``, computed from one forward of the
whole batch and vector-Jacobian products for chunks of rows (each row a backward pass through the whole batch, so
this costs about n times more). The module's buffers (running statistics, ``num_batches_tracked``) are never
written: the forward runs on copies. Dropout active in train mode is refused: a random function has no tangent
kernel.

Sketch (``method="sketch"``, ``sketch_dim=k``, default 256): ``K~ = (J S)(J S)^T`` with a seeded Gaussian ``S``
(P x k, ``E[S S^T] = I``), ``J S`` from central finite differences of the outputs: ``2 k`` forward passes of the
batch, no backward pass, no ``vmap`` through the model. Unbiased; ``Var(K~_ij) = (K_ii K_jj + K_ij^2) / k`` for
one output per example (the general formula, the step and the accuracy in :mod:`hildtools.metrics.ntk_sketch`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vjp, vmap

from hildtools._checks import check_choice, check_int
from hildtools.batches import batch_size, map_tensors
from hildtools.distributed import all_reduce_mean, is_distributed
from hildtools.metrics.ntk_sketch import SKETCH_DIM, sketched_jacobian
from hildtools.norm_layers import BATCH_NORMS

OUTPUTS = ("sum", "mean", "index", "projection", "full", "auto")
METHODS = ("exact", "sketch")
AUTO_MAX_OUTPUTS = 16  # "auto": the exact sum up to this many outputs per example, the projection beyond
PRODUCT_DTYPES = (torch.float64, torch.float32)
CHUNK_BYTES = 2**30  # default chunk: the Jacobian rows fitting 1 GiB
_BLOCK_ELEMENTS = 2**22  # converted copies and sketch matrices are made in blocks of at most this many entries


def check_ntk_args(
    output: Any, output_index: Any, chunk_size: Any, sketch_dim: Any, seed: Any, method: Any = "exact"
) -> None:
    """Raise ValueError for an argument of :func:`empirical_ntk` outside its accepted range."""
    check_choice("method", method, METHODS)
    if method == "sketch" and chunk_size is not None:
        raise ValueError(f"chunk_size is only used with method='exact', got {chunk_size!r} with method='sketch'")
    if method == "exact" and sketch_dim is not None:
        raise ValueError(f"sketch_dim is only used with method='sketch', got {sketch_dim!r} with method='exact'")
    check_choice("output", output, OUTPUTS)
    if output == "index":
        check_int("output_index", output_index, 0)
    elif output_index is not None:
        raise ValueError(f"output_index is only used with output='index', got {output_index!r} with {output!r}")
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, 1)
    if sketch_dim is not None:
        check_int("sketch_dim", sketch_dim, 1)
    check_int("seed", seed, 0)


def _check_inputs(x: Any) -> int:
    tensors = list(x.values()) if isinstance(x, Mapping) else list(x) if isinstance(x, (tuple, list)) else [x]
    if not tensors or not all(isinstance(t, Tensor) and t.dim() >= 1 for t in tensors):
        raise TypeError("x must be a tensor, or a tuple/list/dict of tensors, each with a leading example dimension")
    n = batch_size(x)
    if n < 1 or any(t.shape[0] != n for t in tensors):
        raise ValueError(f"x: every tensor needs the same number of examples >= 1, got {[t.shape for t in tensors]}")
    return n


def as_outputs(out: Any, n: int) -> Tensor:
    """The model's output as an (n, C) tensor (a ``logits`` field of a dict/dataclass output is used)."""
    if isinstance(out, Mapping) and "logits" in out:
        out = out["logits"]
    out = getattr(out, "logits", out)
    if not isinstance(out, Tensor):
        raise TypeError(f"model must return a tensor (or an output with `logits`), got {type(out).__name__}")
    return out.reshape(n, -1)


def resolve_output(output: str, output_index: int | None, num_outputs: int) -> str:
    """The convention in force for C = ``num_outputs`` (``"auto"`` resolved); checks ``output_index`` < C."""
    if output == "index" and output_index >= num_outputs:
        raise ValueError(f"output_index must be in [0, {num_outputs}) for this model, got {output_index}")
    if output == "auto":
        return "sum" if num_outputs <= AUTO_MAX_OUTPUTS else "projection"
    return output


def selection_matrix(output: str, output_index: int | None, seed: int, outputs: Tensor) -> Tensor | None:
    """``S`` (C x 1) for ``"index"`` (a basis vector) and ``"projection"`` (``v ~ N(0, I_C)`` from a CPU generator
    seeded with ``seed``), in the dtype and on the device of the (n, C) ``outputs``; ``None`` (identity) otherwise."""
    num_outputs = outputs.shape[-1]
    if output == "index":
        selection = torch.zeros(num_outputs, 1, dtype=outputs.dtype)
        selection[output_index] = 1
    elif output == "projection":
        generator = torch.Generator().manual_seed(seed)
        selection = torch.randn(num_outputs, 1, generator=generator, dtype=torch.float64).to(outputs.dtype)
    else:
        return None
    return selection.to(outputs.device)


def kernel_from_sketch(sketched: Tensor, output: str, num_outputs: int) -> Tensor:
    """``K~`` from the (n, C', k) sketch ``J S``: summed over outputs (``/C`` for ``"mean"``), or (nC', nC')."""
    n, selected, k = sketched.shape
    if output == "full":
        flat = sketched.reshape(n * selected, k)
        return flat @ flat.T
    flat = sketched.reshape(n, -1)
    return flat @ flat.T / (num_outputs if output == "mean" else 1)


def couples_examples(model: nn.Module) -> bool:
    """True when a BatchNorm normalises with batch statistics (train mode or no running statistics)."""
    return any(isinstance(m, BATCH_NORMS) and (m.training or m.running_mean is None) for m in model.modules())


def upcast(tensor: Tensor) -> Tensor:
    """An fp32 copy of a bf16/fp16 tensor; any other tensor as it is."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def resolve_params(model: nn.Module, params: Iterable[str | Tensor] | None) -> dict[str, Tensor]:
    """``{name: detached tensor}`` of the parameters to differentiate (default: those with ``requires_grad``)."""
    named = dict(model.named_parameters())
    if params is None:
        chosen = [name for name, p in named.items() if p.requires_grad]
    else:
        by_id = {id(p): name for name, p in named.items()}
        chosen = []
        for p in params:
            name = p if isinstance(p, str) else by_id.get(id(p))
            if name not in named:
                raise ValueError(f"params: {p if isinstance(p, str) else 'a tensor'} is not a parameter of the model")
            chosen.append(name)
    if not chosen:
        raise ValueError("params: no parameters to differentiate (none given, or none requires grad)")
    return {name: named[name].detach() for name in chosen}


class TangentModel:
    """A model as a function of its parameters on the batch ``x``: selected outputs and their Jacobian rows.

    The selected outputs are ``f(x_i) @ S`` with the selection matrix ``S`` (C x C'): the identity (``"sum"``,
    ``"mean"``, ``"full"``), a basis vector (``"index"``) or the seeded Gaussian vector ``v`` (``"projection"``).
    See the module docstring for the conventions, batch coupling and what is never modified.
    """

    def __init__(
        self,
        model: nn.Module,
        x: Any,
        *,
        output: str = "sum",
        output_index: int | None = None,
        seed: int = 0,
        params: Iterable[str | Tensor] | None = None,
    ) -> None:
        self.n = _check_inputs(x)
        active_dropout = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.training]
        if any(m.p > 0 for m in active_dropout):
            raise ValueError("model: dropout is active (train mode); call model.eval() (BatchNorm may stay in train)")
        self.model, self.x = model, map_tensors(upcast, x)
        self.params = {name: upcast(p) for name, p in resolve_params(model, params).items()}
        self.frozen = {  # parameters not differentiated, upcast like the others so the forward runs in one dtype
            name: upcast(p.detach()) for name, p in model.named_parameters() if name not in self.params
        }
        self.coupled = couples_examples(model)
        self.looped = False  # set when vmap fails through the model (an op without a batching rule, data-dependent
        # control flow such as Hugging Face's mask utilities, .item()): rows then come one example at a time
        self._vjp: Callable | None = None
        with torch.inference_mode(False), torch.no_grad():  # the output size, from a plain forward (no vmap)
            first = self.n if self.coupled else 1  # a coupled batch runs whole (batch statistics need > 1 example)
            outputs = self._call(self.params, map_tensors(lambda t: t[:first], self.x), first)
        self.num_outputs = outputs.shape[-1]
        self.dtype = outputs.dtype
        self.device = outputs.device
        self.output = resolve_output(output, output_index, self.num_outputs)  # "auto" resolved
        self.selection = selection_matrix(self.output, output_index, seed, outputs)

    # -- the function ---------------------------------------------------------------------------------------------
    def _call(self, params: dict[str, Tensor], x: Any, n: int) -> Tensor:
        # Copies of the buffers: a train-mode BatchNorm updates the copies, never the module's running statistics.
        buffers = {name: upcast(b.detach()).clone() for name, b in self.model.named_buffers()}
        args, kwargs = ((), x) if isinstance(x, Mapping) else (tuple(x) if isinstance(x, (tuple, list)) else (x,), {})
        return as_outputs(functional_call(self.model, ({**self.frozen, **params}, buffers), args, kwargs), n)

    def _batch_outputs(self, params: dict[str, Tensor]) -> Tensor:
        return self._call(params, self.x, self.n)

    def selected_outputs(self, params: dict[str, Tensor]) -> Tensor:
        """The (n, C') selected outputs of the whole batch, ``f(x) @ S`` (one batched forward)."""
        out = self._batch_outputs(params)
        return out if self.selection is None else out @ self.selection

    def _example_outputs(self, params: dict[str, Tensor], x_one: Any) -> Tensor:
        return self._call(params, map_tensors(lambda t: t.unsqueeze(0), x_one), 1)[0]

    @property
    def num_selected(self) -> int:
        """C': the number of selected outputs per example."""
        return self.num_outputs if self.selection is None else 1

    def selection_columns(self, outputs: range) -> Tensor:
        """The columns ``S[:, outputs]`` of the selection matrix (C x len(outputs))."""
        if self.selection is not None:
            return self.selection[:, outputs.start : outputs.stop]
        eye = torch.eye(self.num_outputs, dtype=self.dtype, device=self.device)
        return eye[:, outputs.start : outputs.stop]

    # -- Jacobian rows --------------------------------------------------------------------------------------------
    def rows(self, examples: range, outputs: range) -> list[Tensor]:
        """``d (f(x_i) @ S)_a / d theta`` for i in ``examples``, a in ``outputs``: one (b, a, P_p) tensor per
        parameter."""
        b, a = len(examples), len(outputs)
        with torch.inference_mode(False), torch.enable_grad():
            if self.coupled:
                columns = self.selection_columns(outputs)
                cotangents = torch.zeros(b, a, self.n, self.num_outputs, dtype=self.dtype, device=self.device)
                cotangents[torch.arange(b), :, torch.tensor(examples)] = columns.T
                (grads,) = vmap(self.vjp_fn)(cotangents.reshape(b * a, self.n, self.num_outputs))
            else:
                x = map_tensors(lambda t: t[examples.start : examples.stop], self.x)

                def selected(params: dict[str, Tensor], x_one: Any) -> Tensor:
                    out = self._example_outputs(params, x_one)
                    if self.selection is None:  # identity: slice, never an identity matrix of C x C entries
                        return out[outputs.start : outputs.stop]
                    return out @ self.selection[:, outputs.start : outputs.stop]

                grads = None
                if not self.looped:
                    try:
                        grads = vmap(jacrev(selected), (None, 0), randomness="error")(self.params, x)
                    except RuntimeError:  # vmap cannot batch the model; a model's own error recurs in the loop
                        self.looped = True
                if grads is None:
                    grads = self._looped_jacobian(selected, x, b, a)
        return [grads[name].reshape(b, a, -1) for name in self.params]

    def _looped_jacobian(self, selected: Callable, x: Any, b: int, a: int) -> dict[str, Tensor]:
        """The Jacobian rows one example at a time (no vmap through the model): one forward per example, its
        pullback applied to the ``a`` unit cotangents (vmapped over the backward graph, or looped if that fails)."""
        rows = {name: [] for name in self.params}
        units = torch.eye(a, dtype=self.dtype, device=self.device)
        for i in range(b):
            x_one = map_tensors(lambda t, i=i: t[i], x)
            _, pullback = vjp(lambda params, x_one=x_one: selected(params, x_one), self.params)
            try:
                (grads,) = vmap(pullback)(units)
            except RuntimeError:  # no batching rule in the backward graph either
                parts = [pullback(unit)[0] for unit in units]
                grads = {name: torch.stack([part[name] for part in parts]) for name in self.params}
            for name in self.params:
                rows[name].append(grads[name])
        return {name: torch.stack(parts) for name, parts in rows.items()}

    @property
    def vjp_fn(self) -> Callable:
        """Vector-Jacobian product of the batched outputs (n x C cotangent -> parameter gradients), one forward."""
        if self._vjp is None:
            with torch.inference_mode(False), torch.enable_grad():
                _, self._vjp = vjp(self._batch_outputs, self.params)
        return self._vjp

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def default_chunk_size(self, whole_batch: bool | None = None) -> int:
        """Rows whose Jacobian fits :data:`CHUNK_BYTES`, divided by n when every row is a backward pass through the
        whole batch (``whole_batch``, default: a coupled batch), so activations stay those of as many examples."""
        itemsize = next(iter(self.params.values())).element_size()
        rows = max(1, CHUNK_BYTES // (self.num_params * itemsize))
        return max(1, rows // self.n) if (self.coupled if whole_batch is None else whole_batch) else rows


def row_chunks(n: int, num_outputs: int, chunk_size: int) -> list[tuple[range, range]]:
    """(examples, outputs) ranges covering the n x C' Jacobian rows, ``chunk_size`` rows at most per chunk.

    Whole examples are kept together when ``chunk_size >= C'``; otherwise one example and ``chunk_size`` outputs.
    Ordered output-chunk-major.
    """
    if chunk_size >= num_outputs:
        per = chunk_size // num_outputs
        return [(range(i, min(i + per, n)), range(num_outputs)) for i in range(0, n, per)]
    return [
        (range(i, i + 1), range(a, min(a + chunk_size, num_outputs)))
        for a in range(0, num_outputs, chunk_size)
        for i in range(n)
    ]


def _gram_block(first: list[Tensor], second: list[Tensor], full: bool, product_dtype: torch.dtype) -> Tensor:
    """``sum_p first_p second_p^T``: (b, b') summed over outputs, or (b, a, b', a') when ``full``.

    Products of column blocks in ``product_dtype``, summed in fp64; ``second is first`` converts each block once.
    """
    b, a, _ = first[0].shape
    b2, a2, _ = second[0].shape
    rows, columns = (b * a, b2 * a2) if full else (b, b2)
    block = torch.zeros(rows, columns, dtype=torch.float64, device=first[0].device)
    for u, v in zip(first, second):
        u, v = u.reshape(rows, -1), v.reshape(columns, -1)
        step = max(1, _BLOCK_ELEMENTS // max(rows, columns))
        for start in range(0, u.shape[1], step):
            left = u[:, start : start + step].to(product_dtype)
            right = left if second is first else v[:, start : start + step].to(product_dtype)
            block += left @ right.T
    return block.view(b, a, b2, a2) if full else block


def _exact_kernel(
    tangent: TangentModel, chunks: list[tuple[range, range]], full: bool, owned: Callable, product_dtype: torch.dtype
) -> Tensor:
    n, c = tangent.n, tangent.num_selected
    kernel = torch.zeros((n, c, n, c) if full else (n, n), dtype=torch.float64, device=tangent.device)
    for u, (examples_u, outputs_u) in enumerate(chunks):
        if not owned(u):
            continue
        rows_u = tangent.rows(examples_u, outputs_u)
        for examples_v, outputs_v in chunks[u:]:
            if not full and outputs_v != outputs_u:
                continue
            same = (examples_v, outputs_v) == (examples_u, outputs_u)
            rows_v = rows_u if same else tangent.rows(examples_v, outputs_v)
            block = _gram_block(rows_u, rows_v, full, product_dtype)
            eu, ev = slice(examples_u.start, examples_u.stop), slice(examples_v.start, examples_v.stop)
            if full:
                ou, ov = slice(outputs_u.start, outputs_u.stop), slice(outputs_v.start, outputs_v.stop)
                kernel[eu, ou, ev, ov] = block
                kernel[ev, ov, eu, ou] = block.permute(2, 3, 0, 1)
            else:
                kernel[eu, ev] += block
                if not same:
                    kernel[ev, eu] += block.T
    return kernel


def empirical_ntk(
    model: nn.Module,
    x: Any,
    *,
    output: str = "sum",
    output_index: int | None = None,
    method: str = "exact",
    chunk_size: int | None = None,
    sketch_dim: int | None = None,
    seed: int = 0,
    params: Iterable[str | Tensor] | None = None,
    distributed: bool = False,
    product_dtype: torch.dtype = torch.float64,
) -> Tensor:
    """The empirical NTK of ``model`` on the inputs ``x`` (conventions in the module docstring).

    Args:
        model: any ``nn.Module``; evaluated as given (put it in eval mode for the eval-mode NTK).
        x: the inputs: a tensor (``model(x)``), a tuple/list (``model(*x)``) or a dict (``model(**x)``) of tensors
            with a leading example dimension n.
        output: ``"sum"`` (default), ``"mean"``, ``"index"``, ``"projection"``, ``"full"`` or ``"auto"`` (``"sum"``
            up to 16 outputs per example, else ``"projection"``); sequence outputs in the module docstring.
        output_index: the output used by ``output="index"``, in [0, C).
        method: ``"exact"`` (default: per-example Jacobians by ``torch.func``) or ``"sketch"`` (unbiased, from
            forward passes only: for models or strategies where backward-mode Jacobians are unavailable or too big).
        chunk_size: (exact) Jacobian rows (example-output pairs) computed at once, >= 1; peak memory is about
            ``2 x chunk_size x P`` entries. Default: the rows fitting 1 GiB (at least one).
        sketch_dim: (sketch) the number k of random directions, >= 1 (default 256; 2k forward passes); each entry's
            error relative to ``sqrt(K_ii K_jj)`` has standard deviation at most ``sqrt(2/k)`` (one output).
        seed: seeds the ``"projection"`` vector and the sketch (a private generator; the global RNG is not used).
        params: parameter names or parameter tensors to differentiate; default: all with ``requires_grad``.
        distributed: split the chunks (the sketch's directions) over the ranks of the initialised process group
            and all-reduce, so every rank returns the whole kernel; every rank must call it with the same model and
            ``x``.
        product_dtype: dtype of the Jacobian-block products (sums are in fp64 either way): ``torch.float64``
            (default, exact to rounding) or ``torch.float32`` (several times faster on CPUs and on GPUs without fast
            fp64; 1e-7 to 1e-5 relative error measured, about 1e-3 if TF32 matmuls are enabled, e.g. by
            ``torch.set_float32_matmul_precision("high")``).

    Returns:
        The fp64 kernel: (n, n), or (nC, nC) for ``output="full"``.

    Raises:
        ValueError: an argument out of range, a parameter not in the model, active dropout, an unsupported
            ``product_dtype``.
        TypeError: ``x`` or the model's output of an unsupported type.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> x = torch.eye(3)
        >>> empirical_ntk(model, x)  # X X^T + 1: the bias adds 1 to every entry
        tensor([[2., 1., 1.],
                [1., 2., 1.],
                [1., 1., 2.]], dtype=torch.float64)
    """
    check_ntk_args(output, output_index, chunk_size, sketch_dim, seed, method)
    check_choice("product_dtype", product_dtype, PRODUCT_DTYPES)
    tangent = TangentModel(model, x, output=output, output_index=output_index, seed=seed, params=params)
    shared = distributed and is_distributed()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if shared else (0, 1)

    def owned(chunk_index: int) -> bool:
        return chunk_index % world == rank

    def reduce_sum(tensor: Tensor) -> Tensor:
        return all_reduce_mean(tensor) * world if shared else tensor

    if method == "sketch":
        shape = (tangent.n, tangent.num_selected)
        sketched = sketched_jacobian(tangent.selected_outputs, tangent.params, shape, sketch_dim or SKETCH_DIM,
                                     seed, owned)  # fmt: skip
        return kernel_from_sketch(reduce_sum(sketched), tangent.output, tangent.num_outputs)
    full = tangent.output == "full"
    chunks = row_chunks(tangent.n, tangent.num_selected, chunk_size or tangent.default_chunk_size())
    kernel = reduce_sum(_exact_kernel(tangent, chunks, full, owned, product_dtype))
    if tangent.output == "mean":
        kernel = kernel / tangent.num_outputs
    if full:
        size = tangent.n * tangent.num_outputs
        kernel = kernel.reshape(size, size)
    return kernel
