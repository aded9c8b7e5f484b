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
