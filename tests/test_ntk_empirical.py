"""empirical_ntk against explicit Jacobians (torch.autograd.functional.jacobian) in fp64, every output convention."""

import pytest
import torch
import torch.distributed as dist
from ddp_utils import run_ranks
from torch import nn
from torch.func import functional_call

from hildtools.metrics import empirical_ntk

OUTPUTS = ["sum", "mean", "index", "projection", "full"]


class TwoInputNet(nn.Module):
    """Takes a dict or a tuple of two tensors; returns a dataclass-like output with `logits`."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 6), nn.Linear(2, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, u, v):
        return {"logits": self.head(torch.tanh(self.a(u) + self.b(v)))}


class ListOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 2)

    def forward(self, x):
        return [self.layer(x)]


def mlp():
    return nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 5), nn.GELU(), nn.Linear(5, 3))


def bn_convnet():
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(8, 3),
    )  # fmt: skip


def explicit_jacobian(model, x):
    """(n, C, P) Jacobian of the batched outputs w.r.t. all trainable parameters, buffers read from copies."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    buffers = {name: b.clone() for name, b in model.named_buffers()}

    def outputs(*params):
        out = functional_call(model, ({**dict(zip(names, params)), **buffers}), (x,))
        return out.reshape(len(x), -1)

    params = tuple(dict(model.named_parameters())[name].detach() for name in names)
    jacobians = torch.autograd.functional.jacobian(outputs, params)
    return torch.cat([j.reshape(j.shape[0], j.shape[1], -1) for j in jacobians], dim=2)


def reference_kernel(jacobian, output, output_index=None, seed=0):
    """Each convention written out from the (n, C, P) Jacobian."""
    n, c, _ = jacobian.shape
    full = torch.einsum("iap,jbp->iajb", jacobian, jacobian)
    if output == "full":
        return full.reshape(n * c, n * c)
    if output == "index":
        return full[:, output_index, :, output_index]
    if output == "projection":  # v ~ N(0, I_C) from a CPU generator seeded with `seed`
        v = torch.randn(c, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)[:, 0]
        return torch.einsum("iajb,a,b->ij", full, v, v)
    traced = torch.einsum("iaja->ij", full)
    return traced / c if output == "mean" else traced


def data(shape, n=6, seed=0):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_relative(actual, expected, tol=1e-8):
    error = (actual - expected).norm() / expected.norm()
    assert error < tol, f"relative error {error:.2e}"


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("make_model, shape", [(mlp, (4,)), (bn_convnet, (1, 4, 4))])
def test_matches_explicit_jacobian(make_model, shape, output):
    torch.manual_seed(0)
    model = make_model().double().eval()
    x = data(shape)
    index = 1 if output == "index" else None
    expected = reference_kernel(explicit_jacobian(model, x), output, index, seed=3)
    assert_relative(empirical_ntk(model, x, output=output, output_index=index, seed=3), expected)


@pytest.mark.parametrize("output", OUTPUTS)
def test_train_mode_batchnorm_is_the_batched_kernel_and_leaves_buffers_alone(output):
    torch.manual_seed(0)
    model = bn_convnet().double().train()
    before = {name: b.clone() for name, b in model.named_buffers()}
    x = data((1, 4, 4))
    index = 2 if output == "index" else None
    kernel = empirical_ntk(model, x, output=output, output_index=index, chunk_size=4)
    assert_relative(kernel, reference_kernel(explicit_jacobian(model, x), output, index))
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name
    assert all(m.training for m in model.modules())
    eval_kernel = empirical_ntk(model.eval(), x, output=output, output_index=index)
    assert (eval_kernel - kernel).norm() > 1e-3 * kernel.norm()  # batch statistics change the kernel


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("output", OUTPUTS)
def test_linear_model_gives_gram_of_inputs_exactly(bias, output):
    """f(x) = W x + b with C = 3 outputs: K_ij = <x_i, x_j> + 1 per output (without bias: <x_i, x_j>)."""
    x = torch.randint(-3, 4, (5, 4), generator=torch.Generator().manual_seed(0)).double()  # exact products
    model = nn.Linear(4, 3, bias=bias).double()
    gram = x @ x.T + (1 if bias else 0)
    expected = {
        "sum": 3 * gram, "mean": gram, "index": gram, "full": torch.kron(gram, torch.eye(3, dtype=torch.float64)),
        "projection": (
            gram * (torch.randn(3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) ** 2).sum()
        ),
    }[output]  # fmt: skip
    kernel = empirical_ntk(model, x, output=output, output_index=0 if output == "index" else None)
    if output == "projection":
        torch.testing.assert_close(kernel, expected, rtol=1e-13, atol=1e-13 * expected.abs().max().item())
    else:
        assert torch.equal(kernel, expected)


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 10_000])
def test_chunked_equals_unchunked(output, chunk_size):
    torch.manual_seed(1)
    model = mlp().double()
    x = data((4,), n=7)
    index = 0 if output == "index" else None
    whole = empirical_ntk(model, x, output=output, output_index=index, chunk_size=10_000)
    torch.testing.assert_close(
        empirical_ntk(model, x, output=output, output_index=index, chunk_size=chunk_size), whole, rtol=1e-12, atol=0
    )


def test_dict_and_tuple_inputs_and_logits_outputs():
    torch.manual_seed(0)
    model = TwoInputNet().double()
    u, v = data((3,)), data((2,), seed=1)
    names = [name for name, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())
    jacobian = torch.autograd.functional.jacobian(
        lambda *p: functional_call(model, dict(zip(names, p)), (u, v))["logits"], params
    )
    jacobian = torch.cat([j.reshape(6, 3, -1) for j in jacobian], dim=2)
    expected = reference_kernel(jacobian, "sum")
    assert_relative(empirical_ntk(model, (u, v), chunk_size=4), expected)
    assert_relative(empirical_ntk(model, {"u": u, "v": v}), expected)


def test_parameter_subset_by_name_or_tensor():
    torch.manual_seed(0)
    model = mlp().double()
    x = data((4,))
    last = ["4.weight", "4.bias"]
    features = nn.Sequential(*list(model)[:4])(x).detach()
    expected = 3 * (features @ features.T + 1)  # the last layer is linear in its parameters
    assert_relative(empirical_ntk(model, x, params=last), expected, tol=1e-12)
    assert_relative(empirical_ntk(model, x, params=[model[4].weight, model[4].bias]), expected, tol=1e-12)
    model[0].weight.requires_grad_(False)
    frozen = explicit_jacobian(model, x)
    assert_relative(empirical_ntk(model, x), reference_kernel(frozen, "sum"))  # frozen parameters are excluded


def test_sketch_is_seeded_and_every_convention_runs():
    torch.manual_seed(0)
    model = mlp().double()
    x = data((4,), n=5)
    first = empirical_ntk(model, x, method="sketch", sketch_dim=64, seed=1)
    torch.testing.assert_close(empirical_ntk(model, x, method="sketch", sketch_dim=64, seed=1), first, rtol=0, atol=0)
    assert not torch.allclose(empirical_ntk(model, x, method="sketch", sketch_dim=64, seed=2), first)
    for output in OUTPUTS:
        index = 0 if output == "index" else None
        exact = empirical_ntk(model, x, output=output, output_index=index)
        sketch = empirical_ntk(model, x, output=output, output_index=index, method="sketch", sketch_dim=1024)
        assert sketch.shape == exact.shape and sketch.dtype == torch.float64
        assert (sketch - exact).norm() / exact.norm() < 0.25


def test_no_side_effects_and_accumulation_dtype():
    torch.manual_seed(0)
    model = mlp()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    x = torch.randn(6, 4)
    rng = torch.get_rng_state()
    with torch.inference_mode():  # works from inference/no-grad contexts too
        kernel = empirical_ntk(model, x, output="projection", method="sketch", sketch_dim=128)
    assert kernel.dtype == torch.float64
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
    exact32 = empirical_ntk(model, x)
    exact64 = empirical_ntk(model.double(), x.double())
    assert_relative(exact32, exact64, tol=1e-5)


def test_fp32_products_are_close_to_fp64_products():
    torch.manual_seed(0)
    model = mlp().double()
    x = data((4,), n=9)
    for output in ("sum", "full"):
        exact = empirical_ntk(model, x, output=output, chunk_size=4)
        fast = empirical_ntk(model, x, output=output, chunk_size=4, product_dtype=torch.float32)
        assert fast.dtype == torch.float64
        assert_relative(fast, exact, tol=1e-6)


def test_dropout_in_train_mode_is_refused_and_inactive_dropout_allowed():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="dropout"):
        empirical_ntk(model, x)
    model[1].p = 0.0
    empirical_ntk(model, x)
    empirical_ntk(model.eval(), x)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"output": "trace"}, "output must be one of"),
        ({"output": "index"}, "output_index must be an integer >= 0"),
        ({"output": "index", "output_index": 3}, r"output_index must be in \[0, 3\)"),
        ({"output_index": 1}, "only used with output='index'"),
        ({"chunk_size": 0}, "chunk_size must be an integer >= 1"),
        ({"method": "sketch", "sketch_dim": 0}, "sketch_dim must be an integer >= 1"),
        ({"sketch_dim": 8}, "sketch_dim is only used with method='sketch'"),
        ({"method": "sketch", "chunk_size": 8}, "chunk_size is only used with method='exact'"),
        ({"method": "forward"}, "method must be one of"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"params": ["nope"]}, "params: nope is not a parameter"),
        ({"params": []}, "params: no parameters"),
        ({"product_dtype": torch.float16}, "product_dtype must be one of"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        empirical_ntk(mlp(), torch.randn(3, 4), **kwargs)


def test_bad_inputs_and_outputs():
    with pytest.raises(TypeError, match="x must be a tensor"):
        empirical_ntk(mlp(), [1.0, 2.0])
    with pytest.raises(ValueError, match="same number of examples"):
        empirical_ntk(TwoInputNet(), (torch.randn(3, 3), torch.randn(4, 2)))
    with pytest.raises(TypeError, match="model must return a tensor"):
        empirical_ntk(ListOutput(), torch.randn(3, 2))


def kernels_on_rank(rank, world_size):
    torch.manual_seed(0)
    model = mlp().double()
    x = data((4,), n=7)
    return [
        empirical_ntk(model, x, output=output, distributed=True, **options)
        for output in ("sum", "full")
        for options in ({"chunk_size": 2}, {"method": "sketch", "sketch_dim": 16})
    ]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_distributed_chunks_give_the_single_process_kernel():
    torch.manual_seed(0)
    model = mlp().double()
    x = data((4,), n=7)
    expected = [
        empirical_ntk(model, x, output=output, **options)
        for output in ("sum", "full")
        for options in ({"chunk_size": 2}, {"method": "sketch", "sketch_dim": 16})
    ]
    for kernels in run_ranks(kernels_on_rank, world_size=2):
        for kernel, reference in zip(kernels, expected):
            torch.testing.assert_close(kernel, reference, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("output", OUTPUTS)
def test_cuda_matches_cpu_and_bf16_accumulates_in_fp64(output):
    torch.manual_seed(0)
    model = bn_convnet().double().eval()
    x = data((1, 4, 4), n=9)
    index = 1 if output == "index" else None
    cpu = empirical_ntk(model, x, output=output, output_index=index, chunk_size=5)
    cuda = empirical_ntk(model.cuda(), x.cuda(), output=output, output_index=index, chunk_size=5)
    assert cuda.device.type == "cuda"
    assert_relative(cuda.cpu(), cpu, tol=1e-10)
    sketch = empirical_ntk(model, x.cuda(), output=output, output_index=index, method="sketch", sketch_dim=4096)
    assert (sketch.cpu() - cpu).norm() / cpu.norm() < 0.2
    half = empirical_ntk(model.bfloat16(), x.cuda().bfloat16(), output=output, output_index=index)
    assert half.dtype == torch.float64
    assert (half.cpu() - cpu).norm() / cpu.norm() < 0.05


def test_model_without_a_vmap_rule_falls_back_to_a_loop():
    """nn.GRU has no vmap batching rule: rows come from one VJP per example and output, still exact."""
    from torch.autograd.functional import jacobian

    torch.manual_seed(0)
    gru, head = torch.nn.GRU(3, 5, batch_first=True).double(), torch.nn.Linear(5, 2).double()

    class Recurrent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gru, self.head = gru, head

        def forward(self, x):
            return self.head(self.gru(x)[0][:, -1])

    model, x = Recurrent(), torch.randn(4, 6, 3, dtype=torch.float64)
    params = dict(model.named_parameters())

    def outputs(*flat):
        return torch.func.functional_call(model, dict(zip(params, flat)), (x,))

    jac = jacobian(outputs, tuple(params.values()))
    rows = torch.cat([j.reshape(4, 2, -1) for j in jac], dim=-1)
    expected = torch.einsum("iap,jap->ij", rows, rows)
    assert torch.allclose(empirical_ntk(model, x), expected, rtol=1e-8, atol=1e-12)
