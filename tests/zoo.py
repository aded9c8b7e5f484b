"""A zoo of small user models every monitor and optimizer is run on: MLP, BatchNorm CNN, residual network,
Transformer (embeddings, LayerNorm, scaled_dot_product_attention), recurrent model, dict (Hugging Face style)
batches, and real architectures at tiny sizes: a ResNet-18 (written here: torchvision does not install beside this
torch) and Hugging Face GPT-2 (causal LM, ``Conv1D``), BERT (sequence classifier, padded batches with
``attention_mask``), Llama (RMSNorm, rotary embeddings, SiLU-gated MLP, grouped-query attention) and ViT, built from
configs with random weights. Each is a LightningModule whose ``training_step`` returns the loss (for the Hugging Face
models the model's own ``outputs.loss`` from the batch's ``labels``) with a matching dataloader."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from hildtools.batches import default_unpack as unpack

NUM_CLASSES = 4
VOCAB, LENGTH = 64, 8  # the language models' vocabulary and sequence length


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
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
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

    def forward(self, input_ids):
        h = self.embed(input_ids) + self.pos
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
    """Hugging Face style examples: one dict of tensors per example, e.g. ``{"input_ids": ..., "labels": ...}``."""

    def __init__(self, **columns):
        self.columns = columns

    def __len__(self):
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i):
        return {key: column[i] for key, column in self.columns.items()}


class BasicBlock(nn.Module):
    def __init__(self, inputs, width, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inputs, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != width:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, width, 1, stride, bias=False), nn.BatchNorm2d(width))

    def forward(self, x):
        return F.relu(self.shortcut(x) + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResNet18(nn.Module):
    """torchvision's ResNet-18 layout (7x7 stem, max pool, four stages of two basic blocks, average pool, fc) at
    base width 8 instead of 64."""

    def __init__(self, width=8, num_classes=NUM_CLASSES):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        stages, inputs = [], width
        for i in range(4):
            stages += [BasicBlock(inputs, width * 2**i, 1 if i == 0 else 2), BasicBlock(width * 2**i, width * 2**i, 1)]
            inputs = width * 2**i
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(inputs, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.stages(self.stem(x))))


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=16, bos_token_id=0, eos_token_id=0)
    )


def bert(dropout=0.1):
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=16,
            num_labels=NUM_CLASSES,
            pad_token_id=0,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
        )
    )


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
    )


def vit():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(
        ViTConfig(
            image_size=8,
            patch_size=4,
            num_channels=3,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=NUM_CLASSES,
            hidden_dropout_prob=0.1,
        )
    )


def language_data(n, g):
    """Sequences that continue an arithmetic progression mod VOCAB: the next token is predictable."""
    start, step = torch.randint(1, VOCAB, (n, 1), generator=g), torch.randint(1, 4, (n, 1), generator=g)
    tokens = (start + step * torch.arange(LENGTH)) % (VOCAB - 1) + 1  # 0 is kept for padding
    return tokens


def make_data(name: str, n: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    if name == "mlp":
        return TensorDataset(torch.randn(n, 12, generator=g) + labels[:, None], labels)
    if name in ("bn_cnn", "resnet"):
        return TensorDataset(torch.randn(n, 1, 8, 8, generator=g) + labels[:, None, None, None], labels)
    if name in ("transformer", "dict_transformer"):
        tokens = (torch.randint(0, 15, (n, 6), generator=g) + labels[:, None]) % 20
        if name == "dict_transformer":
            return DictDataset(input_ids=tokens, labels=labels)
        return TensorDataset(tokens, labels)
    if name == "resnet18":
        return TensorDataset(torch.randn(n, 3, 16, 16, generator=g) + labels[:, None, None, None], labels)
    if name in ("gpt2", "llama"):
        tokens = language_data(n, g)
        return DictDataset(input_ids=tokens, attention_mask=torch.ones_like(tokens), labels=tokens)
    if name == "bert":  # random tokens after a class token (1 + label), right-padded (pad id 0, attention_mask 0)
        tokens = torch.randint(NUM_CLASSES + 1, VOCAB, (n, LENGTH), generator=g)
        tokens[:, 0] = 1 + labels
        mask = torch.arange(LENGTH) < torch.randint(3, LENGTH + 1, (n, 1), generator=g)
        return DictDataset(
            input_ids=tokens * mask, attention_mask=mask.long(), token_type_ids=torch.zeros_like(tokens), labels=labels
        )
    if name == "vit":
        return DictDataset(
            pixel_values=torch.randn(n, 3, 8, 8, generator=g) + labels[:, None, None, None], labels=labels
        )
    if name == "gru":
        return TensorDataset(torch.randn(n, 5, 3, generator=g) + labels[:, None, None], labels)
    raise ValueError(name)


NETWORKS = {
    "mlp": MLP,
    "bn_cnn": BNConvNet,
    "resnet": ResNet,
    "transformer": TinyTransformer,
    "dict_transformer": TinyTransformer,
    "gru": GRUClassifier,
}
ARCHITECTURES = {"resnet18": ResNet18, "gpt2": gpt2, "bert": bert, "llama": llama, "vit": vit}
HUGGING_FACE = ("gpt2", "bert", "llama", "vit")
LANGUAGE_MODELS = ("gpt2", "llama")  # one label per token: the next token, over VOCAB classes
ZOO = tuple(NETWORKS)  # the small models (every existing zoo test runs on them)
REAL_ZOO = tuple(ARCHITECTURES)  # the real architectures (their own test files)


def num_classes(name: str) -> int:
    return VOCAB if name in LANGUAGE_MODELS else NUM_CLASSES


class ZooModule(pl.LightningModule):
    """Wraps a small zoo network or the ResNet-18; ``make_optimizer(params)`` sets the optimizer (default SGD with
    momentum). Dict batches (``dict_transformer``) call ``forward(input_ids=...)``."""

    def __init__(self, name: str, make_optimizer=None, **options):
        super().__init__()
        self.net = {**NETWORKS, **ARCHITECTURES}[name](**options)
        self.make_optimizer = make_optimizer or (lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9))

    def forward(self, x=None, input_ids=None):
        return self.net(x if x is not None else input_ids)

    def training_step(self, batch, batch_idx):
        inputs, targets = unpack(batch)
        loss = F.cross_entropy(self(**inputs) if isinstance(inputs, dict) else self(inputs), targets)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return self.make_optimizer(self.parameters())


class HuggingFaceModule(ZooModule):
    """A Hugging Face model as users wrap one: ``training_step`` returns the model's own loss from the batch's
    ``labels`` (shifted inside the model for causal LMs); ``forward(**inputs)`` returns the logits."""

    def forward(self, **inputs):
        return self.net(**inputs).logits

    def training_step(self, batch, batch_idx):
        loss = self.net(**batch).loss
        self.log("train/loss", loss)
        return loss


def zoo_module(name: str, make_optimizer=None, **options) -> ZooModule:
    """The LightningModule of a zoo model; ``options`` go to the network's constructor."""
    return (HuggingFaceModule if name in HUGGING_FACE else ZooModule)(name, make_optimizer, **options)


def zoo_loader(name: str, n: int = 64, batch_size: int = 16, seed: int = 0) -> DataLoader:
    return DataLoader(
        make_data(name, n, seed), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
