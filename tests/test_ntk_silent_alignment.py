"""Silent alignment (Atanasov, Bordelon & Pehlevan 2022) reproduced with loose bounds: a small-init two-layer network
on whitened data aligns its NTK with the task while the loss is still near its initial value."""

import os
import sys

import torch
from torch import nn

from hildtools.metrics import empirical_ntk, kernel_alignment, kernel_alignment_between

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))


def whitened_linear_task(n=64, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    values, vectors = torch.linalg.eigh(x.T @ x / n)
    x = x @ vectors @ torch.diag(values.rsqrt()) @ vectors.T
    beta = torch.randn(dim, generator=generator, dtype=torch.float64)
    return x, x @ (beta / beta.norm())


def train_two_layer(init_scale, steps=150, every=10, lr=0.05, width=32):
    """Full-batch gradient descent on 0.5 x MSE; (step, loss, task alignment, kernel) every ``every`` steps."""
    x, y = whitened_linear_task()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(x.shape[1], width, bias=False), nn.Linear(width, 1, bias=False)).double()
    for p in model.parameters():
        nn.init.normal_(p, std=init_scale)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    rows = []
    for step in range(steps + 1):
        loss = 0.5 * (model(x)[:, 0] - y).pow(2).mean()
        if step % every == 0:
            kernel = empirical_ntk(model, x)
            rows.append(
                {"step": step, "loss": loss.item(), "alignment": kernel_alignment(kernel, y).item(), "K": kernel}
            )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return rows


def test_small_init_aligns_before_the_loss_falls():
    rows = train_two_layer(init_scale=1e-3)
    first, last = rows[0], rows[-1]
    assert last["loss"] < 0.01 * first["loss"]  # it did learn
    assert abs(last["alignment"] - 2 / 11**0.5) < 0.02  # final kernel ~ X X^T + y y^T: alignment 2/sqrt(d + 3)
    assert last["alignment"] - first["alignment"] > 0.1
    aligned = next(
        r for r in rows if r["alignment"] - first["alignment"] >= 0.9 * (last["alignment"] - first["alignment"])
    )
    assert aligned["loss"] > 0.9 * first["loss"]  # 90% of the rise while the loss has fallen by < 10%
    assert kernel_alignment_between(aligned["K"], last["K"]) > 0.99  # the kernel's direction is already final
    assert last["K"].trace() > 100 * aligned["K"].trace()  # ... and afterwards it grows in scale


def test_standard_init_kernel_stays_put():
    rows = train_two_layer(init_scale=8**-0.5, steps=30)
    assert rows[-1]["loss"] < 0.01 * rows[0]["loss"]
    assert kernel_alignment_between(rows[0]["K"], rows[-1]["K"]) > 0.99


def test_example_reproduces_it_through_the_monitor_in_a_lightning_fit(tmp_path):
    import silent_alignment

    args = silent_alignment.parse_args(["--tiny", "--out", str(tmp_path)])
    rows = silent_alignment.run(args.init_scale, args, "small", args.seed)
    first, last = rows[0], rows[-1]
    assert [r["step"] for r in rows] == list(range(0, args.steps + 1, args.every))
    aligned = silent_alignment.alignment_time(rows)
    assert last["ntk/target_alignment"] - first["ntk/target_alignment"] > 0.1
    assert aligned["loss"] > 0.9 * first["loss"] and last["loss"] < 0.01 * first["loss"]
    assert aligned["final_alignment"] > 0.99
    with open(os.path.join(tmp_path, f"small_seed{args.seed}", "version_0", "metrics.csv")) as file:
        header = file.readline().strip().split(",")
    assert {"ntk/target_alignment", "ntk/init_alignment", "ntk/relative_change", "ntk/trace"} <= set(header)
