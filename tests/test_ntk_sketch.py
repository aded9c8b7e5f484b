"""method="sketch": K~ = (J S)(J S)^T from forward finite differences, against explicit fp64 Jacobians with the same
random directions (deterministic), against the exact kernel (statistically, from the stated variance), and in the
monitor with the exact target-alignment numerator."""

import math

import pytest
import torch
from test_ntk_empirical import OUTPUTS, bn_convnet, data, explicit_jacobian, mlp
from torch import nn

from hildtools.metrics import (
    center_kernel,
    empirical_ntk,
    kernel_alignment,
    target_alignment_numerator,
)
from hildtools.metrics.ntk_sketch import column_seeds, direction


def selected_jacobian(jacobian, output, output_index=None, seed=0):
    """The (n, C', P) Jacobian of the selected outputs of each convention."""
    if output == "index":
        return jacobian[:, output_index : output_index + 1]
    if output == "projection":
        v = torch.randn(jacobian.shape[1], 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return torch.einsum("iap,a->ip", jacobian, v[:, 0])[:, None]
    return jacobian


def directions_matrix(model, sketch_dim, seed):
    """R (P x k): the columns the sketch draws, rebuilt from its seeds, parameters in the Jacobian's order."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    columns = [direction(params, s) for s in column_seeds(seed, sketch_dim)]
    return torch.stack([torch.cat([c[name].reshape(-1) for name in params]) for c in columns], dim=1)


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("make_model, shape, train", [(mlp, (4,), False), (bn_convnet, (1, 4, 4), True)])
def test_sketch_is_the_jacobian_times_its_directions(make_model, shape, train, output):
    """With the same R, K~ = (J R / sqrt(k))(J R / sqrt(k))^T to finite-difference accuracy (fp64); a train-mode
    BatchNorm (coupled batch) included: the forward differences see the batched function."""
    torch.manual_seed(0)
    model = make_model().double().train(train)
    x, k = data(shape, n=5), 6
    index = 1 if output == "index" else None
    rows = selected_jacobian(explicit_jacobian(model, x), output, index, seed=3)
    sketched = rows @ directions_matrix(model, k, seed=3) / math.sqrt(k)  # (n, C', k); seed 3 draws v and R
    n, c = sketched.shape[:2]
    if output == "full":
        expected = sketched.reshape(n * c, k) @ sketched.reshape(n * c, k).T
    else:
        expected = sketched.reshape(n, -1) @ sketched.reshape(n, -1).T / (c if output == "mean" else 1)
    kernel = empirical_ntk(model, x, output=output, output_index=index, seed=3, method="sketch", sketch_dim=k)
    error = (kernel - expected).norm() / expected.norm()
    assert error < 1e-7, f"relative error {error:.1e}"


def test_sketch_of_a_multi_output_kernel_has_the_stated_mean_and_variance():
    """ "sum" over C = 3 outputs: E K~ = K and Var(K~_ij) = (<G_ii, G_jj>_F + ||G_ij||_F^2) / k with G_ij = J_i J_j^T,
    over 60 seeds (fixed, so the test is deterministic; the bounds are 4.5 standard errors)."""
    torch.manual_seed(0)
    model, x, k, seeds = mlp().double(), data((4,), n=6), 16, range(60)
    jacobian = explicit_jacobian(model, x)
    gram = torch.einsum("iap,jbp->ijab", jacobian, jacobian)  # G_ij
    exact = torch.einsum("ijaa->ij", gram)
    diagonal_blocks = gram.diagonal(dim1=0, dim2=1).permute(2, 0, 1)  # G_ii, (n, C, C)
    variance = (torch.einsum("iab,jab->ij", diagonal_blocks, diagonal_blocks) + gram.square().sum((2, 3))) / k
    sketches = torch.stack([empirical_ntk(model, x, method="sketch", sketch_dim=k, seed=s) for s in seeds])
    standard_error = (variance / len(seeds)).sqrt()
    assert ((sketches.mean(0) - exact).abs() / standard_error).max() < 4.5  # unbiased
    normalised = ((sketches - exact) ** 2 / variance).mean()  # 1 in expectation
    assert 0.75 < normalised < 1.3


def test_fp32_sketch_is_accurate_to_the_stated_step_error():
    """In fp32 the central difference with h = eps^(1/3) rms(theta) is accurate to about eps^(2/3) (2e-5) on a
    smooth model: the fp32 sketch equals the fp64 one with the same directions to < 1e-3."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    x = torch.randn(6, 4)
    sketch32 = empirical_ntk(model, x, method="sketch", sketch_dim=32)
    exact64 = empirical_ntk(model.double(), x.double())
    rows = explicit_jacobian(model, x.double())
    directions = directions_matrix(model.float(), 32, seed=0).double()  # the fp32 draws, as the fp32 sketch used
    sketched = rows @ directions / math.sqrt(32)
    expected = sketched.reshape(6, -1) @ sketched.reshape(6, -1).T
    assert (sketch32 - expected).norm() / expected.norm() < 1e-3
    assert (sketch32 - exact64).norm() / exact64.norm() > 1e-3  # the comparison above is not with the exact kernel


def test_forward_only_works_without_vmap_and_leaves_everything_untouched():
    """nn.GRU: no vmap rule, the sketch needs none; parameters, .grad, buffers and the global RNG untouched."""
    torch.manual_seed(0)

    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru, self.head = nn.GRU(3, 5, batch_first=True), nn.Linear(5, 2)

        def forward(self, x):
            return self.head(self.gru(x)[0][:, -1])

    model = Recurrent().double()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    rng = torch.get_rng_state()
    kernel = empirical_ntk(model, x, method="sketch", sketch_dim=2000)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(p, before[name]) and torch.equal(p.grad, torch.ones_like(p))
               for name, p in model.named_parameters())  # fmt: skip
    exact = empirical_ntk(model, x)
    assert (kernel - exact).norm() / exact.norm() < 0.15  # sqrt((1 + tr^2/||K||^2) / k) <= sqrt(5 / 2000) = 0.05


def test_exact_numerator_over_the_sketch_norm():
    """kernel_alignment(K~, y, numerator=<K, T>) uses the exact numerator from one backward per target column."""
    torch.manual_seed(0)
    model, x = mlp().double(), data((4,), n=8)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    exact = empirical_ntk(model, x)
    sketch = empirical_ntk(model, x, method="sketch", sketch_dim=64)
    for centered in (False, True):
        numerator = target_alignment_numerator(model, x, y, centered=centered)
        mixed = kernel_alignment(sketch, y, centered=centered, numerator=numerator)
        center = center_kernel if centered else (lambda kernel: kernel)
        expected = kernel_alignment(exact, y, centered=centered) * center(exact).norm() / center(sketch).norm()
        torch.testing.assert_close(mixed, expected, rtol=1e-10, atol=0)


def test_monitor_with_the_sketch_logs_the_functional_values_and_leaves_training_alone(tmp_path):
    from test_ntk_monitor import KEYS, dataset, fit

    from hildtools.callbacks import NTKAlignmentMonitor

    plain, _ = fit([], tmp_path)
    probe = dataset(seed=3).tensors
    probe = (probe[0][:15], probe[1][:15])
    monitor = NTKAlignmentMonitor(every_n_steps=4, probe_data=probe, method="sketch", sketch_dim=32, seed=5)
    model, _ = fit([monitor], tmp_path)  # 8 steps: the last measurement sees the final weights
    for (name, a), b in zip(plain.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    assert {key.split("/")[1] for key in monitor.last_metrics} == KEYS
    model.eval()
    kernel = empirical_ntk(model, probe[0], method="sketch", sketch_dim=32, seed=5)
    torch.testing.assert_close(monitor.last_kernel, kernel, rtol=1e-6, atol=1e-9)
    for name, centered in (("target_alignment", False), ("target_alignment_centered", True)):
        numerator = target_alignment_numerator(model, probe[0], probe[1], centered=centered, seed=5)
        expected = kernel_alignment(kernel, probe[1], centered=centered, numerator=numerator)
        assert monitor.last_metrics[f"ntk/{name}"] == pytest.approx(expected.item(), rel=1e-5)
