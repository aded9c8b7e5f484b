"""The empirical NTK of Hugging Face transformers (built from configs, random weights) against explicit fp64
Jacobians: a BERT classifier with padded dict batches (its mask utilities defeat vmap) and a causal GPT-2 whose
output is (batch, positions, vocabulary)."""

import lightning.pytorch as pl
import pytest
import torch
from torch.func import functional_call
from torch.utils.data import DataLoader

from hildtools.callbacks import NTKAlignmentMonitor
from hildtools.metrics import empirical_ntk

transformers = pytest.importorskip("transformers")


def tiny_bert():
    config = transformers.BertConfig(
        vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).double().eval()


def tiny_gpt2(vocab_size=11, positions=8):
    config = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=8, vocab_size=vocab_size, n_positions=positions,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).double().eval()


def bert_batch(n=4, length=6):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 20, (n, length), generator=generator)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[1, 4:] = 0  # padding: the masks differ between examples
    mask[3, 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def explicit_jacobian(model, inputs):
    """(n, C, P) Jacobian of the batched logits (flattened per example) w.r.t. every parameter, fp64."""
    names = [name for name, _ in model.named_parameters()]

    def outputs(*params):
        logits = functional_call(model, dict(zip(names, params)), (), inputs).logits
        return logits.reshape(len(logits), -1)

    params = tuple(p.detach() for p in model.parameters())
    jacobians = torch.autograd.functional.jacobian(outputs, params)
    return torch.cat([j.reshape(j.shape[0], j.shape[1], -1) for j in jacobians], dim=2)


def assert_relative(actual, expected, tol=1e-8):
    error = (actual - expected).norm() / expected.norm()
    assert error < tol, f"relative error {error:.2e}"


def test_bert_with_padding_masks_matches_the_explicit_jacobian():
    """HF's mask utilities branch on tensor values (data-dependent control flow, which vmap refuses): the rows then
    come one example at a time, exactly."""
    model, inputs = tiny_bert(), bert_batch()
    jacobian = explicit_jacobian(model, inputs)
    assert_relative(empirical_ntk(model, inputs), torch.einsum("iap,jap->ij", jacobian, jacobian))
    full = empirical_ntk(model, inputs, output="full", chunk_size=5)
    assert_relative(full, torch.einsum("iap,jbp->iajb", jacobian, jacobian).reshape(12, 12))


class BertClassifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = tiny_bert().float().train()

    def forward(self, **inputs):
        return self.model(**inputs)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def split_labels(batch):
    return {key: value for key, value in batch.items() if key != "labels"}, batch["labels"]


def test_monitor_on_bert_with_dict_batches_logs_the_functional_kernel(tmp_path):
    batches = [{**bert_batch(4), "labels": torch.tensor([0, 1, 2, 1])} for _ in range(3)]
    module = BertClassifier()
    monitor = NTKAlignmentMonitor(every_n_steps=2, probe_size=4, unpack=split_labels)
    trainer = pl.Trainer(
        max_steps=2, accelerator="cpu", devices=1, logger=False, callbacks=[monitor], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, DataLoader(batches, batch_size=None))
    inputs, _ = split_labels(batches[0])
    expected = empirical_ntk(module.model.eval(), inputs)
    torch.testing.assert_close(monitor.last_kernel, expected, rtol=1e-5, atol=0)
    assert {"ntk/trace", "ntk/target_alignment", "ntk/init_alignment"} <= set(monitor.last_metrics)
    assert monitor.last_metrics["ntk/trace"] == pytest.approx(float(expected.trace()), rel=1e-6)


def reference_kernel(jacobian, output, output_index=None, seed=0):
    """Each convention from the (n, C, P) Jacobian of the flattened (positions x vocabulary) logits."""
    n, c, _ = jacobian.shape
    full = torch.einsum("iap,jbp->iajb", jacobian, jacobian)
    if output == "full":
        return full.reshape(n * c, n * c)
    if output == "index":
        return full[:, output_index, :, output_index]
    if output == "projection":  # one v ~ N(0, I_{T*V}) from a CPU generator seeded with `seed`
        v = torch.randn(c, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)[:, 0]
        return torch.einsum("iajb,a,b->ij", full, v, v)
    traced = torch.einsum("iaja->ij", full)
    return traced / c if output == "mean" else traced


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("output", ["sum", "mean", "index", "projection", "full", "auto"])
def test_gpt2_sequence_outputs_match_the_explicit_jacobian(output, masked):
    """(n, T, V) logits, flattened per example (a = t*V + v): sums run over positions and vocabulary. With an
    attention mask HF's mask utilities defeat vmap and the per-example path runs."""
    model = tiny_gpt2()
    n, length, vocab = 3, 5, 11
    ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(2))
    inputs = {"input_ids": ids}
    if masked:
        inputs["attention_mask"] = torch.ones(n, length, dtype=torch.long)
    jacobian = explicit_jacobian(model, inputs)
    assert jacobian.shape[1] == length * vocab
    index = 2 * vocab + 7 if output == "index" else None  # position 2, token 7
    expected_output = "projection" if output == "auto" else output  # C = 55 > 16 outputs
    expected = reference_kernel(jacobian, expected_output, index, seed=4)
    kernel = empirical_ntk(model, inputs, output=output, output_index=index, seed=4, chunk_size=40)
    assert_relative(kernel, expected)


class CausalLM(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = tiny_gpt2().float().train()

    def forward(self, input_ids):
        return self.model(input_ids)

    def training_step(self, batch, batch_idx):
        return self.model(batch[0], labels=batch[0]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_monitor_default_on_a_causal_lm_is_the_projection_over_positions_and_vocabulary(tmp_path):
    """The monitor's default output="auto" on (n, T, V) logits (C = 55 > 16): the seeded projection, one backward
    per example; token labels (n, T) are not per-example targets, so target alignment is skipped with a message."""
    ids = torch.randint(0, 11, (8, 5), generator=torch.Generator().manual_seed(3))
    module = CausalLM()
    monitor = NTKAlignmentMonitor(every_n_steps=2, probe_size=8)
    trainer = pl.Trainer(
        max_steps=2, accelerator="cpu", devices=1, logger=False, callbacks=[monitor], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    with pytest.warns(UserWarning, match="target_alignment is not logged"):
        trainer.fit(module, DataLoader(torch.utils.data.TensorDataset(ids, ids), batch_size=8))
    expected = empirical_ntk(module.eval(), ids, output="projection")
    torch.testing.assert_close(monitor.last_kernel, expected, rtol=1e-5, atol=0)
    assert {"ntk/trace", "ntk/init_alignment", "ntk/relative_change", "ntk/effective_rank", "ntk/seconds"} == set(
        monitor.last_metrics
    )
