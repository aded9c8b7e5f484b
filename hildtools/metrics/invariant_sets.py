"""Invariant-set ("stochastic") collapse of neurons (Chen, Kunin, Yamamura & Ganguli 2023).

A neuron of a Linear layer (an output unit) or of a convolution (an output channel) is described by
one vector: its incoming weights and bias, with a directly following BatchNorm folded in (running
statistics: ``w' = w * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``),
concatenated with its outgoing weights in the layer that consumes it (the consumer's weight column,
the kernel slice of its input channel, or, through a flatten, the block of columns fed by the
channel). With ``w_i`` these vectors:

- neuron i is *vanishing* if ``||w_i|| / max_j ||w_j|| < vanish_threshold`` (sign-invariant set);
- non-vanishing neurons i, j are *identical* if
  ``2 ||w_i - w_j||^2 / (||w_i||^2 + ||w_j||^2) < identical_threshold`` (permutation-invariant set);
- identical pairs are grouped into connected components (union-find); ``num_independent`` counts
  the components among non-vanishing neurons and ``independent_fraction = num_independent / n``.

Transformer MLPs: ``transformers``' ``Conv1D`` (GPT-2; a Linear whose weight is stored transposed, (in, out)) counts
as a Linear layer, and Hugging Face activation modules (``GELUActivation``, ``NewGELUActivation``, ...) as
elementwise activations. In a gated MLP ``down(act(gate(x)) * up(x))`` (Llama, Mistral, T5 v1.1) a neuron is the
triple (gate row and bias, up row and bias, down column); it is reported under the gate's name.

The consumer is found with ``torch.fx`` (FSDP wrappers seen through: :class:`hildtools.sharding.UnwrappingTracer`;
Linear, Conv1D and activation modules are leaves) through elementwise activations, dropout, pooling (after
convolutions), BatchNorm and flatten. The whole model is traced if it can be; otherwise (e.g. a Hugging Face model,
whose attention masks and caches defeat tracing) each child module is tried, recursively, so every traceable block
(an MLP module, a convolutional stage) is analysed on its own graph. A layer whose path ends, through an activation,
at the output of its block (BERT's ``intermediate.dense`` -> GELU) is paired with the first layer of the block's
next sibling (BERT's ``output.dense``), provided that sibling's first input goes straight into a Linear/Conv1D of
matching width: the Hugging Face convention ``output(intermediate(h), h)``. Layers whose output is used elsewhere
(residual adds, concatenations, several consumers), the network output, shared modules and layers in no
traceable block are skipped, with the reason. Distances come from fp64 Gram blocks of ``chunk_size`` x
``chunk_size`` neurons (no TF32, memory O(chunk_size x vector length)).
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from hildtools._checks import check_int, check_positive
from hildtools.sharding import UnwrappingTracer, clean_name

_PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_PER_NEURON_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Mish, nn.ELU, nn.CELU, nn.SELU, nn.Tanh,
    nn.Sigmoid, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.LogSigmoid,
)  # fmt: skip
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
_IDENTITY_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout}
_PER_NEURON_FUNCTIONS = {
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.gelu, F.silu, F.mish, F.elu, F.celu, F.selu, F.tanh,
    F.sigmoid, F.softplus, F.hardtanh, F.hardswish, F.hardsigmoid, F.logsigmoid,
    torch.relu, torch.relu_, torch.tanh, torch.sigmoid,
}  # fmt: skip
_POOL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
}  # fmt: skip
_IDENTITY_METHODS = {"contiguous", "clone"}
_PER_NEURON_METHODS = {"relu", "relu_", "tanh", "tanh_", "sigmoid", "sigmoid_"}
_SHAPE_METHODS = {"size", "dim"}
_SHAPE_ATTRIBUTES = {"shape", "dtype", "device", "ndim"}
_MERGES = (operator.add, operator.iadd, torch.add, torch.cat, "add", "add_")
_PRODUCTS = (operator.mul, torch.mul, "mul")


def _is_conv1d(module: nn.Module) -> bool:
    """``transformers.pytorch_utils.Conv1D`` (recognised without importing transformers): weight (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _is_producer(module: nn.Module) -> bool:
    return isinstance(module, _PRODUCERS) or _is_conv1d(module)


def _is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _weight(module: nn.Module) -> Tensor:
    """The weight in PyTorch's (out, in, *kernel) layout, detached (a transposed view for Conv1D)."""
    return module.weight.detach().T if _is_conv1d(module) else module.weight.detach()


def _is_per_neuron_module(module: nn.Module) -> bool:
    hugging_face_activation = type(module).__module__ == "transformers.activations"
    return isinstance(module, _PER_NEURON_MODULES) or hugging_face_activation


class _Tracer(UnwrappingTracer):
    """Keeps Conv1D and Hugging Face activations as leaf modules (call_module nodes)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _is_conv1d(m) or _is_per_neuron_module(m) or super().is_leaf_module(m, module_qualified_name)


@dataclass
class LayerInvariantSets:
    """Collapse of one layer's neurons.

    Attributes:
        name: the layer's module name.
        consumer: module name of the layer that consumes its output.
        num_neurons: output units (Linear) or output channels (conv).
        num_vanishing: neurons with ``||w_i|| / max ||w|| < vanish_threshold``.
        group_sizes: sizes of the groups of identical neurons (size >= 2), largest first.
        num_independent: groups plus singletons among the non-vanishing neurons.
        nearest_distance: (num_neurons,) fp64 ``min_j 2||w_i - w_j||^2 / (||w_i||^2 + ||w_j||^2)``
            over non-vanishing j != i; ``inf`` for vanishing neurons.
        up_projection: for a gated MLP (the layer is the gate), the up projection whose rows join each neuron.
    """

    name: str
    consumer: str
    num_neurons: int
    num_vanishing: int
    group_sizes: list[int]
    num_independent: int
    nearest_distance: Tensor = field(repr=False)
    up_projection: str | None = None

    @property
    def independent_fraction(self) -> float:
        """``num_independent / num_neurons`` (vanishing neurons count in the denominator only)."""
        return self.num_independent / self.num_neurons

    @property
    def num_identical_groups(self) -> int:
        """Number of groups of >= 2 identical neurons."""
        return len(self.group_sizes)


@dataclass
class InvariantSetReport:
    """Result of :func:`invariant_sets`: analysed layers and skipped layers with the reason."""

    layers: dict[str, LayerInvariantSets]
    skipped: dict[str, str]


@dataclass
class _Link:
    consumer: str | None  # None: the block's output, consumed by the next sibling block (resolved later)
    batchnorm: nn.Module | None
    flattened: bool
    up: str | None = None  # the up projection of a gated MLP neuron


def _is_shape_query(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    return node.op == "call_function" and node.target is getattr and node.args[1] in _SHAPE_ATTRIBUTES


def _flatten_dims(node: fx.Node) -> tuple[Any, Any]:
    """(start_dim, end_dim) of a torch.flatten / Tensor.flatten call."""
    args = node.args[1:]
    start = args[0] if args else node.kwargs.get("start_dim", 0)
    end = args[1] if len(args) > 1 else node.kwargs.get("end_dim", -1)
    return start, end


def _step_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """How a node treats each neuron: identity, per_neuron, pool, batchnorm, flatten, producer or other."""
    if node.op == "call_module":
        module = modules[node.target]
        if _is_producer(module):
            return "producer"
        if isinstance(module, _BATCHNORMS):
            return "batchnorm"
        if isinstance(module, nn.Flatten):
            return "flatten" if (module.start_dim, module.end_dim) == (1, -1) else "other"
        if isinstance(module, _IDENTITY_MODULES):
            return "identity"
        if isinstance(module, _POOL_MODULES):
            return "pool"
        return "per_neuron" if _is_per_neuron_module(module) else "other"
    if node.op == "call_function":
        if node.target is torch.flatten:
            return "flatten" if _flatten_dims(node) == (1, -1) else "other"
        if node.target in _IDENTITY_FUNCTIONS:
            return "identity"
        if node.target in _POOL_FUNCTIONS:
            return "pool"
        return "per_neuron" if node.target in _PER_NEURON_FUNCTIONS else "other"
    if node.op == "call_method":
        if node.target == "flatten":
            return "flatten" if _flatten_dims(node) == (1, -1) else "other"
        if node.target in ("view", "reshape"):
            shape = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
            return "flatten" if len(shape) == 2 else "other"
        if node.target in _IDENTITY_METHODS:
            return "identity"
        return "per_neuron" if node.target in _PER_NEURON_METHODS else "other"
    return "other"


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} '{node.target}'"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target}"


def _up_projection(mul: fx.Node, current: fx.Node, producer: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The up projection of a gated MLP: the other factor of ``mul``, a Linear/Conv1D of the same input as the
    producer, used only here; else None."""
    if len(mul.args) != 2 or mul.kwargs or current not in mul.args:
        return None
    other = mul.args[1] if mul.args[0] is current else mul.args[0]
    if not isinstance(other, fx.Node) or other.op != "call_module" or not _is_producer(modules[other.target]):
        return None
    if len(other.users) != 1 or other.args[:1] != producer.args[:1] or other is producer:
        return None
    return other.target


def _follow(node: fx.Node, modules: dict[str, nn.Module], is_root: bool) -> _Link | str:
    """The layer consuming ``node``'s neurons, or the reason there is no unambiguous one."""
    batchnorm, flattened, untouched, activated, up, current = None, False, True, False, None, node
    while True:
        users = [user for user in current.users if not _is_shape_query(user)]
        if not users:
            return "output unused"
        if len(users) > 1:
            names = ", ".join(_describe(user, modules) for user in users)
            return f"output feeds several nodes ({names}), e.g. a residual branch"
        user = users[0]
        if user.op == "output":
            if is_root:
                return "no consumer: its output is the network output"
            if not activated or flattened or up is not None:
                return "no consumer in its block: it is the block's output (e.g. before a residual add)"
            return _Link(None, batchnorm, flattened)
        if user.op in ("call_function", "call_method") and user.target in _PRODUCTS and up is None:
            up = _up_projection(user, current, node, modules)
            if up is not None:
                untouched, current = False, user
                continue
        kind = _step_kind(user, modules)
        if kind == "other" or not user.args or user.args[0] is not current:
            suffix = " (e.g. a residual add or a concatenation)" if user.target in _MERGES else ""
            return f"output reaches {_describe(user, modules)}{suffix}"
        if kind == "producer":
            return _Link(user.target, batchnorm, flattened, up)
        if kind == "pool" and _is_linear_like(modules[node.target]):
            return f"{_describe(user, modules)} after a Linear layer pools over its neurons"
        if kind == "batchnorm":
            if not untouched:
                return f"{_describe(user, modules)} follows a nonlinearity, pooling or flatten: cannot be folded"
            if modules[user.target].running_var is None:
                return f"{_describe(user, modules)} has no running statistics: cannot be folded"
            batchnorm = modules[user.target]
        flattened = flattened or kind == "flatten"
        activated = activated or kind == "per_neuron"
        untouched = untouched and kind == "identity"
        current = user


def batchnorm_affine(batchnorm: nn.Module) -> tuple[Tensor, Tensor]:
    """Per-channel (scale, shift) of a BatchNorm in eval mode: ``bn(y) = scale * y + shift``.

    Folding it into the preceding layer: ``w' = w * scale``, ``b' = b * scale + shift``.
    """
    scale = torch.rsqrt(batchnorm.running_var.detach().double() + batchnorm.eps)
    shift = -batchnorm.running_mean.detach().double() * scale
    if batchnorm.affine:
        gamma, beta = batchnorm.weight.detach().double(), batchnorm.bias.detach().double()
        scale, shift = scale * gamma, shift * gamma + beta
    return scale, shift


class _NeuronVectors:
    """Neuron vectors ``[w_in (BN folded), b (, w_up, b_up) | w_out]`` of a layer, copied a chunk at a time into
    fp64 buffers.

    A chunk is two matrices: incoming rows (b, sum of fan_in + 1 over the producer and a gated MLP's up projection)
    and outgoing columns (out * block, b), both read in the weights' own memory order; the Gram block of chunks
    i, j is ``in_i @ in_j.T + out_i.T @ out_j``. Reusing two preallocated buffers keeps the memory at 2 chunks
    whatever the number of blocks.
    """

    def __init__(self, producers: list[nn.Module], consumer: nn.Module, batchnorm: nn.Module | None, chunk_size: int):
        self.num = _weight(producers[0]).shape[0]
        self.incoming = [(_weight(p).flatten(1), p.bias.detach() if p.bias is not None else None) for p in producers]
        self.affine = batchnorm_affine(batchnorm) if batchnorm is not None else None
        weight = _weight(consumer)
        self.outgoing = weight.reshape(weight.shape[0], self.num, -1)  # (out, n, block)
        rows, (out, _, block) = min(chunk_size, self.num), self.outgoing.shape
        width = sum(w.shape[1] + 1 for w, _ in self.incoming)
        new = self.outgoing.new_empty
        self.buffers = [
            (new(rows, width, dtype=torch.float64), new(out, block, rows, dtype=torch.float64)) for _ in range(2)
        ]

    def chunk(self, start: int, stop: int, buffer: int) -> tuple[Tensor, Tensor]:
        """Chunk ``start:stop`` written into buffer 0 or 1: (incoming rows, outgoing columns)."""
        incoming, outgoing = self.buffers[buffer]
        incoming, outgoing = incoming[: stop - start], outgoing[..., : stop - start]
        column = 0
        for index, (weight, bias) in enumerate(self.incoming):
            fan_in = weight.shape[1]
            part = incoming[:, column : column + fan_in + 1]
            part[:, :fan_in] = weight[start:stop]
            part[:, fan_in] = bias[start:stop] if bias is not None else 0
            if index == 0 and self.affine is not None:
                scale, shift = (t[start:stop] for t in self.affine)
                part *= scale[:, None]
                part[:, fan_in] += shift
            column += fan_in + 1
        outgoing.copy_(self.outgoing[:, start:stop].transpose(1, 2))
        return incoming, outgoing.flatten(0, 1)


def _check_link(producer: nn.Module, consumer: nn.Module, link: _Link, up: nn.Module | None) -> str | None:
    """Reason the producer/consumer pair cannot be analysed, or None."""
    n = _weight(producer).shape[0]
    if up is not None and _weight(up).shape != _weight(producer).shape:
        return f"the up projection '{link.up}' of the gated MLP has another shape"
    if _is_linear_like(consumer):
        in_features = _weight(consumer).shape[1]
        if _is_linear_like(producer):
            if link.flattened:
                return "flatten after a Linear layer: neuron layout unknown"
            return None if in_features == n else f"consumer '{link.consumer}' does not read {n} features"
        if not link.flattened:
            return f"consumer '{link.consumer}' is a Linear applied to conv maps without a flatten"
        return None if in_features % n == 0 else f"consumer '{link.consumer}' in_features not a multiple of {n}"
    if _is_linear_like(producer) or link.flattened:
        return f"consumer '{link.consumer}' is a convolution fed by a Linear or flattened output"
    if consumer.groups != 1 or consumer.in_channels != n:
        return f"consumer '{link.consumer}' is a grouped convolution or does not read {n} channels"
    return None


def _find_roots(parent: Tensor) -> Tensor:
    """Flatten the union-find forest in place (pointer jumping) and return it."""
    while True:
        grand = parent[parent]
        if torch.equal(grand, parent):
            return parent
        parent.copy_(grand)


def _union(parent: Tensor, first: Tensor, second: Tensor) -> None:
    """Merge the sets of each pair (first[k], second[k]); roots are the smallest member."""
    while first.numel():
        roots = _find_roots(parent)
        root_a, root_b = roots[first], roots[second]
        differ = root_a != root_b
        first, second, root_a, root_b = first[differ], second[differ], root_a[differ], root_b[differ]
        parent.scatter_reduce_(0, torch.maximum(root_a, root_b), torch.minimum(root_a, root_b), reduce="amin")


def _squared_norms(incoming: Tensor, outgoing: Tensor) -> Tensor:
    return torch.linalg.vector_norm(incoming, dim=1).square() + torch.linalg.vector_norm(outgoing, dim=0).square()


def _analyse(vectors: _NeuronVectors, vanish_threshold: float, identical_threshold: float, chunk_size: int):
    """(num_vanishing, group_sizes, num_independent, nearest_distance) of one layer."""
    n = vectors.num
    chunks = [(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]
    sq_norms = torch.cat([_squared_norms(*vectors.chunk(start, stop, 0)) for start, stop in chunks])
    norms = sq_norms.sqrt()
    vanishing = norms < vanish_threshold * norms.max() if norms.max() > 0 else torch.ones_like(norms, dtype=torch.bool)
    parent = torch.arange(n, device=sq_norms.device)
    nearest = torch.full((n,), float("inf"), dtype=torch.float64, device=sq_norms.device)
    for i, (start_i, stop_i) in enumerate(chunks):
        in_i, out_i = vectors.chunk(start_i, stop_i, 0)
        for start_j, stop_j in chunks[i:]:
            in_j, out_j = (in_i, out_i) if start_j == start_i else vectors.chunk(start_j, stop_j, 1)
            gram = torch.addmm(in_i @ in_j.T, out_i.T, out_j)
            total = sq_norms[start_i:stop_i, None] + sq_norms[None, start_j:stop_j]
            distance = (2 * (total - 2 * gram) / total).clamp_min(0)
            valid = ~vanishing[start_i:stop_i, None] & ~vanishing[None, start_j:stop_j]
            if start_j == start_i:
                valid &= ~torch.eye(stop_i - start_i, dtype=torch.bool, device=valid.device)
            distance = distance.masked_fill(~valid, float("inf"))
            nearest[start_i:stop_i] = torch.minimum(nearest[start_i:stop_i], distance.min(1).values)
            nearest[start_j:stop_j] = torch.minimum(nearest[start_j:stop_j], distance.min(0).values)
            pairs = (distance < identical_threshold).nonzero()
            _union(parent, pairs[:, 0] + start_i, pairs[:, 1] + start_j)
    roots = _find_roots(parent)[~vanishing]
    sizes = torch.bincount(roots, minlength=n)
    group_sizes = sorted((int(s) for s in sizes[sizes >= 2]), reverse=True)
    return int(vanishing.sum()), group_sizes, int((sizes > 0).sum()), nearest


def check_invariant_set_args(vanish_threshold: Any, identical_threshold: Any, chunk_size: Any) -> None:
    """Raise ValueError for thresholds that are not finite and positive, or a ``chunk_size`` below 1."""
    check_positive("vanish_threshold", vanish_threshold)
    check_positive("identical_threshold", identical_threshold)
    check_int("chunk_size", chunk_size, 1)


@torch.no_grad()
def invariant_sets(
    model: nn.Module,
    vanish_threshold: float = 0.1,
    identical_threshold: float = 0.1,
    chunk_size: int = 256,
) -> InvariantSetReport:
    """Vanishing and identical neurons of every Linear/Conv/Conv1D layer with a known consumer.

    Data-free (weights only). Definitions, the consumer search and BatchNorm folding are described
    in the module docstring; thresholds default to the paper's 0.1 and 0.1.

    Args:
        model: the model, traced with ``torch.fx`` (whole, or block by block); under FSDP call it inside
            :func:`hildtools.sharding.full_parameters` (layer names are then reported without FSDP1's
            ``_fsdp_wrapped_module``).
        vanish_threshold: relative norm below which a neuron is vanishing, > 0.
        identical_threshold: normalised squared distance below which two neurons are identical, > 0.
        chunk_size: neurons per Gram block; memory ~ 2 * chunk_size * vector length * 8 bytes.

    Returns:
        :class:`InvariantSetReport` with per-layer :class:`LayerInvariantSets` and skipped layers.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``.
        ValueError: for non-positive thresholds or ``chunk_size``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
        >>> with torch.no_grad():
        ...     mlp[0].weight[1] = mlp[0].weight[0]; mlp[0].bias[1] = mlp[0].bias[0]
        ...     mlp[2].weight[:, 1] = mlp[2].weight[:, 0]
        >>> layer = invariant_sets(mlp).layers["0"]
        >>> layer.group_sizes, layer.num_independent, layer.independent_fraction
        ([2], 15, 0.9375)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    check_invariant_set_args(vanish_threshold, identical_threshold, chunk_size)

    modules = dict(model.named_modules())
    blocks, failures = _traced_blocks(model)
    layers, skipped, ups = {}, {}, {}
    for block in blocks:
        block_modules = dict(block.module.named_modules())
        calls = Counter(node.target for node in block.graph.nodes if node.op == "call_module")
        for node in block.graph.nodes:
            if node.op != "call_module" or not _is_producer(block_modules[node.target]):
                continue
            name = _join(block.prefix, node.target)
            if name in ups:  # already analysed as the up projection of a gate
                continue
            if calls[node.target] > 1:
                skipped[name] = "called more than once per forward (shared module)"
                continue
            link = _follow(node, block_modules, is_root=block.prefix == "")
            if isinstance(link, _Link):
                link = _absolute(link, block, blocks, modules)
            if isinstance(link, _Link):
                up = modules[link.up] if link.up is not None else None
                link = _check_link(modules[name], modules[link.consumer], link, up) or link
            if isinstance(link, str):
                skipped[name] = link
                continue
            producers = [modules[name]] + ([modules[link.up]] if link.up is not None else [])
            vectors = _NeuronVectors(producers, modules[link.consumer], link.batchnorm, chunk_size)
            num_vanishing, group_sizes, num_independent, nearest = _analyse(
                vectors, vanish_threshold, identical_threshold, chunk_size
            )
            layers[name] = LayerInvariantSets(
                clean_name(name), clean_name(link.consumer), vectors.num, num_vanishing, group_sizes,
                num_independent, nearest, clean_name(link.up) if link.up is not None else None,
            )  # fmt: skip
            if link.up is not None:
                ups[link.up] = name
    for up, gate in ups.items():
        layers.pop(up, None)
        skipped[up] = f"up projection of the gated MLP: its neurons are analysed with the gate '{clean_name(gate)}'"
    for name, module in modules.items():
        if _is_producer(module) and name not in layers and name not in skipped:
            parent = name.rpartition(".")[0]
            where = f"'{clean_name(parent)}'" if parent else "the model"
            skipped[name] = (
                f"torch.fx could not trace {where} ({failures[parent]})" if parent in failures
                else "not called as a module in a traced graph (e.g. inside a leaf module)"
            )  # fmt: skip
    return InvariantSetReport(
        {clean_name(name): layer for name, layer in layers.items()},
        {clean_name(name): reason for name, reason in skipped.items()},
    )


@dataclass
class _Block:
    """A traced module: its name in the model ("" for the whole model), the module and its fx graph."""

    prefix: str
    module: nn.Module
    graph: fx.Graph


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _traced_blocks(model: nn.Module) -> tuple[list[_Block], dict[str, str]]:
    """The whole model's graph if it traces; else, recursively, the graphs of the children that trace.

    Returns the traced blocks and, per module that could not be traced, the error (first line)."""
    blocks, failures = [], {}

    def visit(prefix: str, module: nn.Module) -> None:
        if _is_producer(module) or not any(_is_producer(m) for m in module.modules()):
            return
        try:
            blocks.append(_Block(prefix, module, _Tracer().trace(module)))
        except Exception as error:  # noqa: BLE001 - any tracing failure means: try the children
            message = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
            failures[prefix] = f"{type(error).__name__}: {message}"
            for name, child in module.named_children():
                visit(_join(prefix, name), child)

    visit("", model)
    return blocks, failures


def _entry_producer(block: _Block) -> str | None:
    """The Linear/Conv1D that the block's first input goes straight into (its only use), else None."""
    placeholders = [node for node in block.graph.nodes if node.op == "placeholder"]
    if not placeholders:
        return None
    users = [user for user in placeholders[0].users if not _is_shape_query(user)]
    modules = dict(block.module.named_modules())
    if len(users) == 1 and users[0].op == "call_module" and _is_producer(modules[users[0].target]):
        return users[0].target if users[0].args[:1] == (placeholders[0],) else None
    return None


def _absolute(link: _Link, block: _Block, blocks: list[_Block], modules: dict[str, nn.Module]) -> _Link | str:
    """``link`` with model-level names; a block output is paired with the entry layer of the next sibling block."""
    up = _join(block.prefix, link.up) if link.up is not None else None
    if link.consumer is not None:
        return _Link(_join(block.prefix, link.consumer), link.batchnorm, link.flattened, up)
    parent, _, name = block.prefix.rpartition(".")
    siblings = [child for child, _ in modules[parent].named_children()]
    following = siblings[siblings.index(name) + 1] if siblings.index(name) + 1 < len(siblings) else None
    sibling = next((b for b in blocks if following is not None and b.prefix == _join(parent, following)), None)
    entry = _entry_producer(sibling) if sibling is not None else None
    if entry is None:
        return (
            f"no consumer: its activated output leaves block '{clean_name(block.prefix)}' and the next sibling "
            "block does not feed its first input straight into a Linear/Conv1D"
        )
    return _Link(_join(sibling.prefix, entry), link.batchnorm, link.flattened, up)
