"""Cost of the full n x n empirical NTK: :func:`hildtools.metrics.empirical_ntk` against a naive per-example loop.

Usage::

    python benchmarks/bench_ntk.py [--device cuda] [--n 256] [--outputs 1] [--chunk-sizes 16,32,64,128,256]

Model: an MLP 784 -> 1024 -> 256 -> C (about 1.07M parameters; C = ``--outputs``, default 1 so every output
convention gives the same kernel), n = 256 random inputs, kernel convention ``"sum"``.

1. naive: ``torch.autograd.grad`` of each example's output (C backward passes per example), the gradients stored as
   the n x C x P Jacobian, then ``K = sum_a J_a J_a^T`` (products in fp64, as ours; and in fp32, as often written).
2. ``empirical_ntk`` with its default chunk (the rows fitting 1 GiB) and fp64 products (default) or fp32 products,
   then a sweep of ``chunk_size`` (fp32 products): peak memory follows the chunk (about 2 x chunk_size x P x 4 bytes
   plus activations; chunk_size counts Jacobian rows, i.e. example-output pairs), not n x P.
3. the forward-only sketch (``method="sketch"``, ``sketch_dim`` = 512 by default) and its relative Frobenius error.

``--transformer`` runs the language-model benchmark instead (:func:`transformer_benchmark`): a 2-layer GPT-2.

Each method runs in a fresh subprocess: time (median of ``--repeats`` runs after a warm-up) and peak extra memory
(peak resident set size after a reset of the peak counter on Linux CPUs; ``torch.cuda.max_memory_allocated`` on
CUDA), both counted from after the model and data exist. Prints a Markdown report (copy it to
``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from hildtools.metrics import empirical_ntk


def make_problem(args, device):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 256), nn.ReLU(), nn.Linear(256, args.outputs)
    )
    x = torch.randn(args.n, 784, generator=torch.Generator().manual_seed(1))
    return model.to(device).eval(), x.to(device)


def naive_ntk(model, x, product_dtype):
    """Per-example backward passes, the whole n x C x P Jacobian stored, then the Gram matrix."""
    params = [p for p in model.parameters() if p.requires_grad]
    size = sum(p.numel() for p in params)
    outputs = model(x[:1]).shape[1]
    jacobian = torch.empty(len(x), outputs, size, device=x.device)
    for i in range(len(x)):
        out = model(x[i : i + 1])[0]
        for a in range(outputs):
            grads = torch.autograd.grad(out[a], params, retain_graph=a + 1 < outputs)
            jacobian[i, a] = torch.cat([g.reshape(-1) for g in grads])
    flat = jacobian.transpose(0, 1).to(product_dtype)  # (C, n, P)
    return (flat @ flat.transpose(1, 2)).sum(0).double()


def method(args, name):
    if name == "naive_fp64":
        return lambda model, x: naive_ntk(model, x, torch.float64)
    if name == "naive_fp32":
        return lambda model, x: naive_ntk(model, x, torch.float32)
    if name == "ours_default":
        return lambda model, x: empirical_ntk(model, x)
    if name == "ours_fp32_products":
        return lambda model, x: empirical_ntk(model, x, product_dtype=torch.float32)
    if name.startswith("ours_chunk_"):
        chunk = int(name.rsplit("_", 1)[1])
        return lambda model, x: empirical_ntk(model, x, chunk_size=chunk, product_dtype=torch.float32)
    if name == "ours_sketch":
        return lambda model, x: empirical_ntk(model, x, method="sketch", sketch_dim=args.sketch_dim)
    raise ValueError(name)


def resident_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field))


def measure(args, name):
    """Run one method in this process: time, peak extra memory, and the kernel (saved for the error check)."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    model, x = make_problem(args, device)
    fn = method(args, name)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset the peak resident set size
        base = resident_kib("VmRSS:") * 1024
    kernel = fn(model, x)  # warm-up run, also the peak-memory run
    if cuda:
        torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() if cuda else resident_kib("VmHWM:") * 1024) - base
    times = []
    for _ in range(args.repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(model, x)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    torch.save(kernel.cpu(), f"{args.tmp}/{name}.pt")
    print(json.dumps({"name": name, "seconds": statistics.median(times), "peak_mib": peak / 2**20}))


def run_in_subprocess(args, name):
    passed = ("device", "n", "outputs", "sketch_dim", "repeats", "threads", "tmp")
    command = [sys.executable, __file__, "--measure", name]
    command += [f"--{key.replace('_', '-')}={getattr(args, key)}" for key in passed]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def gpt2_problem(n, length, vocab=256):
    """GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=256, n_positions=64), random weights, n sequences."""
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=vocab, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(1))
    return model, ids


def naive_projection_ntk(model, ids, seed=0):
    """The naive per-example loop for the ``"projection"`` kernel: one ``autograd.grad`` of ``v . f(x_i)`` per
    example (v of T*V entries from the same seeded CPU generator), the n x P Jacobian stored, fp64 Gram."""
    params = [p for p in model.parameters() if p.requires_grad]
    logits = model(ids[:1]).logits
    v = torch.randn(logits[0].numel(), 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    v = v[:, 0].to(logits.dtype).view(logits.shape[1:])
    rows = []
    for i in range(len(ids)):
        grads = torch.autograd.grad((model(ids[i : i + 1]).logits[0] * v).sum(), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]).double())
    jacobian = torch.stack(rows)
    return jacobian @ jacobian.T


def seconds(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def monitor_measurement_seconds(model, ids, **monitor_args):
    """Wall time of one NTKAlignmentMonitor measurement at its defaults (probe_size = n, measured at step 0) in a
    Lightning fit: a 1-step fit with the monitor minus a 1-step fit without it."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from hildtools.callbacks import NTKAlignmentMonitor

    class LanguageModel(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.model(input_ids)

        def training_step(self, batch, batch_idx):
            return self.model(batch[0], labels=batch[1]).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def fit(callbacks):
        loader = DataLoader(TensorDataset(ids, ids), batch_size=len(ids))
        trainer = pl.Trainer(
            max_steps=1,
            accelerator="cpu",
            logger=False,
            callbacks=callbacks,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        start = time.perf_counter()
        trainer.fit(LanguageModel(), loader)
        return time.perf_counter() - start

    plain = fit([])
    monitor = NTKAlignmentMonitor(probe_size=len(ids), **monitor_args)
    return fit([monitor]) - plain, monitor.last_metrics


def transformer_benchmark(args):
    """One NTK measurement on a 2-layer GPT-2 (n sequences of --length tokens): ours at the monitor's default
    convention ("auto" = the seeded projection over positions x vocabulary here) against the naive per-example loop
    for the same kernel, and the extrapolated cost of the exact "sum" over T*V outputs that the old default took."""
    import os

    torch.set_num_threads(args.threads)
    model, ids = gpt2_problem(args.n, args.length)
    params = sum(p.numel() for p in model.parameters())
    outputs = args.length * model.config.vocab_size
    masked = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    naive, reference = seconds(lambda: naive_projection_ntk(model, ids), args.repeats)
    ours, kernel = seconds(lambda: empirical_ntk(model, ids, output="auto"), args.repeats)
    ours_masked, kernel_masked = seconds(lambda: empirical_ntk(model, masked, output="auto"), args.repeats)
    k = 64
    sketch, kernel_sketch = seconds(lambda: empirical_ntk(model, ids, output="auto", method="sketch", sketch_dim=k), 1)
    rows = [
        ("naive per-example loop (autograd.grad per example)", naive, reference),
        ("empirical_ntk(output='auto'), input_ids (vmap over examples)", ours, kernel),
        ("empirical_ntk(output='auto'), dict with attention_mask (per-example fallback)", ours_masked, kernel_masked),
        (
            f"empirical_ntk(output='auto', method='sketch', sketch_dim={k}): {2 * k} forwards, no backward",
            sketch,
            kernel_sketch,
        ),
    ]
    # the exact "sum" over positions x vocabulary (the old default): time 256 Jacobian rows, extrapolate to n*T*V
    from hildtools.metrics.ntk import TangentModel

    tangent = TangentModel(model, ids, output="sum")
    row_seconds, _ = seconds(lambda: tangent.rows(range(1), range(256)), 1)
    jacobian_rows = args.n * outputs
    gram_flops = args.n**2 * outputs * params
    monitor, metrics = monitor_measurement_seconds(model, ids)
    load = os.getloadavg()
    lines = [
        "# empirical NTK on a 2-layer GPT-2 (cpu)",
        "",
        (
            f"Command: `OMP_NUM_THREADS={args.threads} python benchmarks/bench_ntk.py --transformer "
            f"--threads {args.threads} "
            f"--n {args.n} --length {args.length} --repeats {args.repeats}`"
        ),
        "",
        (
            f"- date: {datetime.date.today()}; device: 2-core CPU, shared, no GPU "
            f"({platform.processor() or platform.machine()}); "
            f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min; other jobs ran); "
            f"torch {torch.__version__}; python {platform.python_version()}; CPU threads: {args.threads}"
        ),
        (
            f"- model: GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=256, n_positions=64), "
            f"{params:,} parameters; "
            f"n = {args.n} sequences of T = {args.length} tokens; C = T x V = {outputs:,} outputs per example"
        ),
        f"- time: median of {args.repeats} runs after a warm-up",
        "",
        (
            "| method (kernel: seeded projection over positions x vocabulary) | time (s) | speed-up vs naive "
            "| rel. error vs naive |"
        ),
        "|---|---|---|---|",
    ]
    for label, elapsed, result in rows:
        error = float((result - reference).norm() / reference.norm())
        lines.append(f"| {label} | {elapsed:.3f} | {naive / elapsed:.2f}x | {error:.1e} |")
    lines += [
        "",
        (
            f"One NTKAlignmentMonitor measurement at its defaults (probe_size = {args.n}, output='auto') "
            f"in a Lightning fit: "
            f"{monitor:.2f} s (1-step fit with the monitor minus without); logged: {sorted(metrics)}."
        ),
        "",
        (
            f"The exact 'sum' over positions and vocabulary (the default before 'auto'): "
            f"256 Jacobian rows of one example "
            f"took {row_seconds:.3f} s, so the {jacobian_rows:,} rows take about "
            f"{row_seconds * jacobian_rows / 256:,.0f} s, "
            f"and their n x n Gram product n^2 C P = {gram_flops:.1e} multiply-adds; within the 1 GiB default chunk "
            f"({tangent.default_chunk_size():,} rows, one example each) the pairs of chunks recompute the rows "
            f"{args.n + 1} / 2 times over: hours, which is why the old default never finished."
        ),
    ]
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--outputs", type=int, default=1)
    parser.add_argument("--chunk-sizes", default="16,32,64,128,256")
    parser.add_argument("--sketch-dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-naive-fp32", action="store_true")
    parser.add_argument("--tmp", default="/tmp")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--transformer", action="store_true", help="the GPT-2 benchmark (n defaults to 64)")
    parser.add_argument("--length", type=int, default=32, help="tokens per sequence (--transformer)")
    args = parser.parse_args()
    if args.transformer:
        args.n = 64 if args.n == 256 else args.n
        return transformer_benchmark(args)
    if args.measure:
        return measure(args, args.measure)

    chunks = [int(c) for c in args.chunk_sizes.split(",") if c]
    names = (
        ["naive_fp64"]
        + ([] if args.skip_naive_fp32 else ["naive_fp32"])
        + ["ours_default", "ours_fp32_products", "ours_sketch"]
    )
    names += [f"ours_chunk_{c}" for c in chunks]
    results = {}
    for name in names:
        results[name] = run_in_subprocess(args, name)
        print(f"# {name}: {results[name]['seconds']:.3f} s, {results[name]['peak_mib']:.0f} MiB", file=sys.stderr)
    reference = torch.load(f"{args.tmp}/naive_fp64.pt")
    model, _ = make_problem(args, torch.device("cpu"))
    params = sum(p.numel() for p in model.parameters())
    naive = results["naive_fp64"]["seconds"]
    peak_counter = (
        "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "peak RSS, reset before the run"
    )

    device = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    )
    lines = [
        f"# empirical NTK benchmark ({args.device})",
        "",
        (
            f"- date: {datetime.date.today()}; device: {device}; torch {torch.__version__}; "
            f"python {platform.python_version()}; CPU threads: {args.threads}"
        ),
        (
            f"- model: MLP 784-1024-256-{args.outputs} ({params:,} parameters), n = {args.n}, convention 'sum'; "
            f"the naive Jacobian alone is {args.n * args.outputs * params * 4 / 2**20:,.0f} MiB"
        ),
        (
            f"- time: median of {args.repeats} runs after a warm-up; peak: extra memory over model + data "
            f"({peak_counter})"
        ),
        "",
        (
            "| method | time (s) | speed-up vs naive (fp64 products) | peak extra memory (MiB) "
            "| rel. error vs naive fp64 |"
        ),
        "|---|---|---|---|---|",
    ]
    for name in names:
        kernel = torch.load(f"{args.tmp}/{name}.pt")
        error = float((kernel - reference).norm() / reference.norm())
        row = results[name]
        label = name + (f" (k = {args.sketch_dim})" if name == "ours_sketch" else "")
        if name.startswith("ours_chunk_"):
            bound = 2 * int(name.rsplit("_", 1)[1]) * params * 4 / 2**20
            label += f" (2 x chunk x P x 4 B = {bound:.0f} MiB)"
        lines.append(
            f"| {label} | {row['seconds']:.3f} | {naive / row['seconds']:.2f}x | {row['peak_mib']:.0f} | {error:.1e} |"
        )
    sketch = torch.load(f"{args.tmp}/ours_sketch.pt")
    ratio = float(reference.trace() ** 2 / reference.norm() ** 2)
    diagonal = reference.diagonal()
    lines += [
        "",
        (
            f"Sketch error, stated vs measured (k = {args.sketch_dim}): relative Frobenius error "
            f"sqrt((1 + tr(K)^2/||K||_F^2)/k) = {((1 + ratio) / args.sketch_dim) ** 0.5:.3f} (participation ratio "
            f"{ratio:.1f}) vs {float((sketch - reference).norm() / reference.norm()):.3f}; diagonal relative error "
            f"sqrt(2/k) = {(2 / args.sketch_dim) ** 0.5:.4f} vs "
            f"{float(((sketch.diagonal() / diagonal - 1) ** 2).mean().sqrt()):.4f} (rms)."
        ),
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
