"""HessianOperator: products against the dense fp64 Hessian (MLP, CNN, BatchNorm in train and eval mode, both
backends), unused and frozen parameters, preconditioning, bf16 models computed in fp32, non-finite losses,
no side effects, and the mean over ranks under torch.distributed."""

import copy

import pytest
import torch
from ddp_utils import run_ranks
from test_curvature_reference import MODELS, bn_mlp, classification_batch, cross_entropy, dense_hessian, mlp, mse
from torch import nn

from hildtools.curvature import HessianOperator, NonFiniteLossError, hessian_eigenpairs


@pytest.mark.parametrize("backend", ["autograd", "func"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_products_match_the_dense_hessian(name, backend):
    model = MODELS[name]()
    batch = classification_batch(name)
    hessian = dense_hessian(model, cross_entropy, batch)
    operator = HessianOperator(model, cross_entropy, batch, backend=backend)
    vectors = torch.randn(operator.size, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    products = torch.stack([operator.matvec(v) for v in vectors.T], 1)
    assert operator.size == hessian.shape[0] and operator.num_matvecs == 3
    assert torch.allclose(products, hessian @ vectors, rtol=1e-10, atol=1e-12)


def test_train_and_eval_batchnorm_give_different_hessians():
    batch = classification_batch("bn")
    train = dense_hessian(bn_mlp(train=True), cross_entropy, batch)
    evaluation = dense_hessian(bn_mlp(train=False), cross_entropy, batch)
    assert not torch.allclose(train, evaluation, rtol=1e-2)


def test_fp32_products_are_accurate_to_single_precision():
    model, batch = mlp(), classification_batch("mlp")
    hessian = dense_hessian(model, cross_entropy, batch)
    model32, batch32 = mlp(torch.float32), (batch[0].float(), batch[1])
    operator = HessianOperator(model32, cross_entropy, batch32)
    v = torch.randn(operator.size, dtype=torch.float64)
    product = operator.matvec(v.float())
    assert product.dtype == torch.float32
    assert (product.double() - hessian @ v).norm() <= 1e-5 * (hessian @ v).norm()


def test_bf16_model_is_differentiated_in_fp32():
    """The weights stay bf16, but the Hessian is that of the bf16 weights evaluated in fp32 arithmetic."""
    model, batch = mlp(torch.bfloat16), classification_batch("mlp", dtype=torch.bfloat16)
    reference = copy.deepcopy(model).double()
    hessian = dense_hessian(reference, cross_entropy, (batch[0].double(), batch[1]))
    operator = HessianOperator(model, cross_entropy, batch)
    v = torch.randn(operator.size, dtype=torch.float64)
    product = operator.matvec(v)
    assert operator.dtype == torch.float32 and product.dtype == torch.float32
    assert (product.double() - hessian @ v).norm() <= 1e-5 * (hessian @ v).norm()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_float64_products_for_a_float32_model():
    model, batch = mlp(), classification_batch("mlp")
    hessian = dense_hessian(model, cross_entropy, batch)
    operator = HessianOperator(mlp(torch.float32), cross_entropy, (batch[0].float(), batch[1]), dtype=torch.float64)
    v = torch.randn(operator.size, dtype=torch.float64)
    # the weights were rounded to fp32, so agreement is to fp32 rounding of the weights, not to 1e-10
    assert torch.allclose(operator.matvec(v), hessian @ v, rtol=1e-5, atol=1e-6)


class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 3)  # no gradient path at all
        self.frozen = nn.Linear(4, 3).requires_grad_(False)

    def forward(self, x):
        return self.used(x) + self.frozen(x)


def test_unused_parameters_have_a_zero_hessian_block():
    model = WithUnused().double()
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    operator = HessianOperator(model, cross_entropy, (x, y))
    assert operator.size == 2 * 15  # used + unused; frozen excluded
    hessian = dense_hessian(model, cross_entropy, (x, y))
    assert torch.count_nonzero(hessian[15:]) == 0
    v = torch.randn(operator.size, dtype=torch.float64)
    assert torch.allclose(operator.matvec(v), hessian @ v, atol=1e-12)


def test_linear_loss_has_zero_hessian():
    model = nn.Linear(3, 1).double()
    operator = HessianOperator(model, lambda m, b: m(b).sum(), torch.randn(5, 3, dtype=torch.float64))
    assert torch.count_nonzero(operator.matvec(torch.ones(4, dtype=torch.float64))) == 0


def test_parameter_subset_is_the_matching_hessian_block():
    model, batch = mlp(), classification_batch("mlp")
    params = list(model.parameters())
    hessian = dense_hessian(model, cross_entropy, batch)
    operator = HessianOperator(model, cross_entropy, batch, params=params[2:4])
    start, stop = params[0].numel() + params[1].numel(), sum(p.numel() for p in params[:4])
    v = torch.randn(operator.size, dtype=torch.float64)
    assert torch.allclose(operator.matvec(v), hessian[start:stop, start:stop] @ v, atol=1e-12)


def test_preconditioned_operator_is_s_h_s():
    model, batch = mlp(), classification_batch("mlp")
    hessian = dense_hessian(model, cross_entropy, batch)
    s = torch.rand(hessian.shape[0], dtype=torch.float64) + 0.5
    operator = HessianOperator(model, cross_entropy, batch, preconditioner=s)
    per_param = HessianOperator(model, cross_entropy, batch, preconditioner=list(s.split(operator.sizes)))
    v = torch.randn(operator.size, dtype=torch.float64)
    expected = s * (hessian @ (s * v))
    assert torch.allclose(operator.matvec(v), expected, atol=1e-12)
    assert torch.allclose(per_param.matvec(v), expected, atol=1e-12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("backend", ["autograd", "func"])
def test_non_finite_loss_raises_a_dedicated_error(bad, backend):
    model = mlp()
    with pytest.raises(NonFiniteLossError, match="not finite"):
        HessianOperator(model, lambda m, b: cross_entropy(m, b) * bad, classification_batch("mlp"), backend=backend)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"backend": "fd"}, "backend"),
        ({"params": []}, "params"),
        ({"params": [nn.Parameter(torch.ones(2))]}, "params"),
        ({"preconditioner": torch.ones(3)}, "preconditioner"),
        ({"dtype": torch.int64}, "dtype"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HessianOperator(mlp(), cross_entropy, classification_batch("mlp"), **kwargs)


def test_non_scalar_loss_and_wrong_vector_size():
    model, batch = mlp(), classification_batch("mlp")
    with pytest.raises(ValueError, match="scalar"):
        HessianOperator(model, lambda m, b: m(b[0]), batch)
    with pytest.raises(ValueError, match="entries"):
        HessianOperator(model, cross_entropy, batch).matvec(torch.ones(3))


class DropoutBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize(
    "backend, hvp",
    [("autograd", "autograd"), ("func", "autograd"), ("autograd", "finite_difference"), ("autograd", "auto")],
)
def test_no_side_effects(backend, hvp):
    """Parameters, .grad, buffers (BatchNorm statistics), modes and the global RNG are bitwise unchanged."""
    torch.manual_seed(0)
    model = DropoutBN().double().train()
    model.net[3].eval()  # a mixed-mode model: modes must stay exactly as they are
    batch = classification_batch("mlp")
    cross_entropy(model, batch).backward()  # a training gradient sitting in .grad
    state = copy.deepcopy(model.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    grad_objects = [p.grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    operator = HessianOperator(model, cross_entropy, batch, backend=backend, hvp=hvp)
    first = operator.matvec(torch.ones(operator.size, dtype=torch.float64))
    second = operator.matvec(torch.ones(operator.size, dtype=torch.float64))
    assert torch.equal(first, second)  # one dropout mask, reused: a fixed operator
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, b) for a, b in zip(state.values(), model.state_dict().values()))
    assert all(p.grad is g for p, g in zip(model.parameters(), grad_objects))
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert [m.training for m in model.modules()] == modes


def test_train_mode_dropout_operator_is_the_hessian_for_one_mask():
    """With train-mode dropout, both backends differentiate the same loss (same mask, drawn at construction)."""
    torch.manual_seed(0)
    model = DropoutBN().double().train()
    batch = classification_batch("mlp")
    ones = torch.ones(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    a = HessianOperator(model, cross_entropy, batch).matvec(ones)
    b = HessianOperator(model, cross_entropy, batch, backend="func").matvec(ones)
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_ddp_wrapper_is_removed():
    model, batch = mlp(), classification_batch("mlp")
    wrapped = nn.DataParallel(model)
    v = torch.ones(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    assert torch.equal(
        HessianOperator(wrapped, cross_entropy, batch).matvec(v), HessianOperator(model, cross_entropy, batch).matvec(v)
    )


def _distributed_product(rank, world_size):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randn(16, 2, generator=g, dtype=torch.float64)
    shard = slice(rank * 8, rank * 8 + 8)
    operator = HessianOperator(model, mse, (x[shard], y[shard]))
    v = torch.randn(operator.size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    hessian = dense_hessian(model, mse, (x, y))
    values = hessian_eigenpairs(model, mse, (x[shard], y[shard]), k=2, tol=1e-10).eigenvalues
    return operator.matvec(v), hessian @ v, values, torch.linalg.eigvalsh(hessian).flip(0)[:2]


def test_products_and_eigenvalues_are_those_of_the_full_batch_on_every_rank():
    """Two ranks with half the batch each hold the Hessian-vector products and eigenvalues of the full-batch
    mean loss, identical on both ranks."""
    (first, expected, values, exact), (second, _, other_values, _) = run_ranks(_distributed_product, world_size=2)
    assert torch.equal(first, second) and torch.equal(values, other_values)
    assert torch.allclose(first, expected, rtol=1e-10, atol=1e-12)
    assert torch.allclose(values, exact, rtol=1e-9)


class TiedEmbedding(nn.Module):
    """Input embedding and output layer share one weight (as in language models)."""

    def __init__(self):
        super().__init__()
        self.embed, self.out = nn.Embedding(7, 4), nn.Linear(4, 7, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens):
        return self.out(torch.tanh(self.embed(tokens)).mean(1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_tied_weights_count_once(dtype):
    torch.manual_seed(0)
    model = TiedEmbedding().double()
    batch = (torch.randint(0, 7, (10, 3)), torch.randint(0, 7, (10,)))
    hessian = dense_hessian(model, cross_entropy, batch)
    operator = HessianOperator(model.to(dtype), cross_entropy, batch)
    v = torch.randn(operator.size, dtype=torch.float64)
    assert operator.size == 28
    tolerance = 1e-12 if dtype == torch.float64 else 2e-2  # bf16 weights differ from the fp64 reference
    assert (operator.matvec(v).double() - hessian @ v).norm() <= tolerance * (hessian @ v).norm()
