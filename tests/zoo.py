"""A zoo of small user models every monitor and optimizer is run on: MLP, BatchNorm CNN, residual network,
Transformer (embeddings, LayerNorm, scaled_dot_product_attention), recurrent model, and dict (Hugging Face style)
batches. Each is a LightningModule with a classification ``training_step`` and a matching dataloader."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

NUM_CLASSES = 4


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Dropout(0.1), nn.Linear(32, 16), nn.ReLU())
        self.classifier = nn.Linear(16, NUM_CLASSES)

    def forward(self, x):
        return self.classifier(self.body(x))


class BNConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.1),
            nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )
        self.classifier = nn.Linear(32, NUM_CLASSES)

    def forward(self, x):
        return self.classifier(self.body(x))


class ResidualBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.blocks = nn.Sequential(ResidualBlock(8), ResidualBlock(8))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(8, NUM_CLASSES)

    def forward(self, x):
        return self.classifier(self.pool(self.blocks(self.stem(x))))


class TinyTransformer(nn.Module):
    """Token embeddings + positions, one pre-LayerNorm attention block (SDPA), mean pooling, classifier."""

    def __init__(self, vocab=20, length=6, width=16, heads=2):
        super().__init__()
        self.heads = heads
        self.embed, self.pos = nn.Embedding(vocab, width), nn.Parameter(torch.zeros(length, width))
        self.norm1, self.qkv, self.proj = nn.LayerNorm(width), nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.norm2, self.mlp = nn.LayerNorm(width), nn.Sequential(nn.Linear(width, 32), nn.GELU(), nn.Linear(32, width))
        self.classifier = nn.Linear(width, NUM_CLASSES)

    def forward(self, tokens):
        h = self.embed(tokens) + self.pos
        b, t, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attention = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        h = h + self.proj(attention)
        h = h + self.mlp(self.norm2(h))
        return self.classifier(h.mean(1))


class GRUClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 16, batch_first=True)
        self.classifier = nn.Linear(16, NUM_CLASSES)

    def forward(self, x):
        return self.classifier(self.rnn(x)[0][:, -1])


class DictDataset(Dataset):
    """Hugging Face style examples: ``{"input_ids": LongTensor, "labels": int}``."""

    def __init__(self, tokens, labels):
        self.tokens, self.labels = tokens, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.tokens[i], "labels": self.labels[i]}


def make_data(name: str, n: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    if name == "mlp":
        return TensorDataset(torch.randn(n, 12, generator=g) + labels[:, None], labels)
    if name in ("bn_cnn", "resnet"):
        return TensorDataset(torch.randn(n, 1, 8, 8, generator=g) + labels[:, None, None, None], labels)
    if name in ("transformer", "dict_transformer"):
        tokens = (torch.randint(0, 15, (n, 6), generator=g) + labels[:, None]) % 20
        return DictDataset(tokens, labels) if name == "dict_transformer" else TensorDataset(tokens, labels)
    if name == "gru":
        return TensorDataset(torch.randn(n, 5, 3, generator=g) + labels[:, None, None], labels)
    raise ValueError(name)


NETWORKS = {"mlp": MLP, "bn_cnn": BNConvNet, "resnet": ResNet, "transformer": TinyTransformer,
            "dict_transformer": TinyTransformer, "gru": GRUClassifier}
ZOO = tuple(NETWORKS)


def unpack(batch):
    if isinstance(batch, dict):
        return batch["input_ids"], batch["labels"]
    return batch[0], batch[1]


class ZooModule(pl.LightningModule):
    """Wraps a zoo network; ``make_optimizer(params)`` sets the optimizer (default SGD with momentum)."""

    def __init__(self, name: str, make_optimizer=None):
        super().__init__()
        self.net = NETWORKS[name]()
        self.make_optimizer = make_optimizer or (lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = unpack(batch)
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return self.make_optimizer(self.parameters())


def zoo_loader(name: str, n: int = 64, batch_size: int = 16, seed: int = 0) -> DataLoader:
    return DataLoader(make_data(name, n, seed), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))
