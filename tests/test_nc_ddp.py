"""NeuralCollapse and FeatureRank under 2-process DDP (gloo, CPU) equal the single-process values."""

import pytest
import torch
import torch.distributed as dist
from ddp_utils import run_ranks

from hildtools.metrics import FeatureRank, NeuralCollapse, feature_rank, neural_collapse


def data():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat(30)
    features = torch.randn(4, 16, generator=generator)[labels] + 0.4 * torch.randn(120, 16, generator=generator)
    weight = torch.randn(4, 16, generator=generator)
    predictions = (features @ weight.T).argmax(1)
    return features, labels, weight, predictions


def measure_on_shard(rank, world_size):
    features, labels, weight, predictions = data()
    shard = slice(0, 70) if rank == 0 else slice(70, None)  # uneven shards
    collapse = NeuralCollapse(4, 16, classifier_weight=weight)
    for _ in range(2):
        for chunk in torch.arange(len(labels))[shard].split(16):
            collapse.update(features[chunk], labels[chunk], predictions=predictions[chunk])
        if "nc1" not in collapse.compute():
            collapse.start_second_pass()
    ranks = [FeatureRank(center="column"), FeatureRank(center="column", num_features=16)]
    for metric in ranks:
        metric.update(features[shard])
    return {"nc": collapse.compute(), "rank": [metric.compute() for metric in ranks]}


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_two_process_ddp_equals_single_process():
    features, labels, weight, predictions = data()
    expected_nc = neural_collapse(features, labels, 4, classifier_weight=weight, predictions=predictions)
    expected_rank = feature_rank(features, center="column")
    for result in run_ranks(measure_on_shard, world_size=2):
        assert set(result["nc"]) == set(expected_nc)
        for key, value in expected_nc.items():
            torch.testing.assert_close(result["nc"][key], value, rtol=1e-6, atol=1e-9, msg=key)
        for measured in result["rank"]:
            for key, value in expected_rank.items():
                torch.testing.assert_close(measured[key], value, rtol=1e-9, atol=1e-9, msg=key)


def fit_token_monitor_on_rank(rank, world_size, sizes):
    """Lightning DDP: a tiny GPT-2 with a token-level NeuralCollapseMonitor on this rank's (unequal) probe shard."""
    import lightning.pytorch as pl
    from test_nc_tokens import TinyGPT2, token_probe

    from hildtools.callbacks import NeuralCollapseMonitor

    input_ids, labels = token_probe()
    start = sum(sizes[:rank])
    shard = (input_ids[start : start + sizes[rank]], labels[start : start + sizes[rank]])
    monitor = NeuralCollapseMonitor(num_classes=256, every_n_steps=2, probe_data=shard, batch_size=8)
    torch.manual_seed(0)
    module = TinyGPT2()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(input_ids, labels), batch_size=8)
    pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=world_size,
        max_steps=2,
        callbacks=[monitor],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(module, loader)
    return {"state": {k: v.clone() for k, v in module.state_dict().items()}, "metrics": dict(monitor.last_metrics)}


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_token_level_monitor_under_ddp_equals_dense_reference_on_the_union():
    pytest.importorskip("transformers")
    from test_nc_tokens import TinyGPT2, dense_token_reference, token_probe

    results = run_ranks(fit_token_monitor_on_rank, (40, 24))  # the union is the whole token_probe()
    assert results[0]["metrics"] == results[1]["metrics"]
    module = TinyGPT2()
    module.load_state_dict(results[0]["state"])
    expected = dense_token_reference(module, *token_probe())
    for key, value in expected.items():
        assert results[0]["metrics"][f"nc/model.lm_head/{key}"] == pytest.approx(value.item(), rel=1e-4, abs=1e-6)
