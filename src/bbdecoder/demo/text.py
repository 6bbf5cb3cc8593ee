"""A generated text task with a planted keyword, and a small transformer for it (plain torch).

Every sentence is 5 to 12 words drawn uniformly from :data:`DISTRACTORS`, with exactly one of the
two :data:`KEYWORDS` put at a random position; the label is which keyword it is (0 ``"awful"``,
1 ``"superb"``). Nothing else in the sentence carries information about the label, so a model that
solves the task has to find the keyword, and an explanation of it should point there: per sentence,
the token with the highest attribution should be the keyword (chance: one token in ``length``).

Sentences are right-padded to :data:`MAX_LENGTH` with ``[pad]`` (id 0); the batch is the dict a Hugging
Face model takes (``input_ids``, ``attention_mask``). :class:`TextTransformer` is an embedding plus
learned positions, a 2-layer ``nn.TransformerEncoder`` (2 heads) that masks the padding,
a masked mean over the tokens and a linear head: it trains to 100% test accuracy in about a second
on a CPU. Everything is seeded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

PAD = "[pad]"
KEYWORDS = ("awful", "superb")  # the keyword of class c is KEYWORDS[c]
CLASSES = ("negative", "positive")
DISTRACTORS = (
    "the", "a", "movie", "film", "was", "is", "plot", "actor", "scene", "very", "quite", "really",
    "story", "music", "ending", "and", "but", "it", "this", "that", "cast", "script", "long", "short",
    "first", "second", "part", "director", "camera", "light", "sound", "screen", "night", "day",
    "city", "house", "old", "new", "some", "many",
)  # fmt: skip
VOCAB = (PAD, *KEYWORDS, *DISTRACTORS)
PAD_ID = 0
KEYWORD_IDS = (1, 2)
MIN_LENGTH, MAX_LENGTH = 5, 12


@dataclass
class TextData:
    """``input_ids`` and ``attention_mask`` (N, MAX_LENGTH) int64, ``labels`` (N,) int64 and the
    position of the planted keyword in each sentence, ``keyword_at`` (N,) int64."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    keyword_at: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.numel())

    def __getitem__(self, index: slice | torch.Tensor) -> TextData:
        return TextData(
            self.input_ids[index], self.attention_mask[index], self.labels[index], self.keyword_at[index]
        )

    def batch(self) -> dict[str, torch.Tensor]:
        """The model's keyword arguments: ``{"input_ids": ..., "attention_mask": ...}``."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    @property
    def lengths(self) -> torch.Tensor:
        """Words per sentence (N,)."""
        return self.attention_mask.sum(dim=1)

    def tokens(self, index: int) -> list[str]:
        """The words of sentence ``index`` (padding left out)."""
        length = int(self.lengths[index])
        return [VOCAB[int(i)] for i in self.input_ids[index, :length]]


def make_text_data(n: int, seed: int = 0) -> TextData:
    """``n`` sentences of the planted-keyword task, half of each class on average; fixed by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(MIN_LENGTH, MAX_LENGTH + 1, (n,), generator=generator)
    first_distractor = len(VOCAB) - len(DISTRACTORS)
    ids = torch.randint(first_distractor, len(VOCAB), (n, MAX_LENGTH), generator=generator)
    labels = torch.randint(0, len(KEYWORDS), (n,), generator=generator)
    keyword_at = (torch.rand(n, generator=generator) * lengths).long()
    rows = torch.arange(n)
    ids[rows, keyword_at] = torch.tensor(KEYWORD_IDS)[labels]
    mask = (torch.arange(MAX_LENGTH)[None] < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, PAD_ID))
    return TextData(ids, mask, labels, keyword_at)


class TextTransformer(nn.Module):
    """Token embedding + learned positions, an ``nn.TransformerEncoder`` that ignores the
    padding, a masked mean over the tokens and a linear head: logits ``(N, classes)``.

    Called like a Hugging Face classifier: ``model(input_ids, attention_mask=None)``;
    :meth:`get_input_embeddings` is the token embedding (where token attributions are taken).
    """

    def __init__(
        self,
        vocab: int = len(VOCAB),
        dim: int = 32,
        heads: int = 2,
        layers: int = 2,
        classes: int = len(CLASSES),
        max_length: int = MAX_LENGTH,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(max_length, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = self.embed(input_ids) + self.position(positions)
        keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask != 0
        hidden = self.norm(self.encoder(hidden, src_key_padding_mask=~keep))
        weights = keep.to(hidden.dtype)[..., None]
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return self.head(pooled)


def training_batches(
    data: TextData, epochs: int, batch_size: int = 32, seed: int = 0
) -> Iterator[list[TextData]]:
    """One list of batches per epoch, in the order training sees them (a seeded shuffle per epoch)."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator)
        yield [data[order[start : start + batch_size]] for start in range(0, len(order), batch_size)]


def make_optimizer(
    model: nn.Module, total_steps: int, lr: float = 3e-3
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW (weight decay 0.1) with a one-cycle learning rate over ``total_steps``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(1, total_steps))
    return optimizer, schedule


def train_text_transformer(
    data: TextData,
    *,
    epochs: int = 3,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    on_epoch: Callable[[int, float], object] | None = None,
) -> TextTransformer:
    """Train :class:`TextTransformer` (AdamW, one-cycle learning rate, fixed seeds); returned in eval
    mode. ``on_epoch(epoch, mean loss)`` is called after each epoch. The demo runs the same steps
    through the Analyzer (:mod:`bbdecoder.demo.text_run`)."""
    torch.manual_seed(seed)
    model = TextTransformer()
    optimizer, schedule = make_optimizer(model, epochs * -(-len(data) // batch_size), lr)
    model.train()
    for epoch, batches in enumerate(training_batches(data, epochs, batch_size, seed)):
        total = 0.0
        for part in batches:
            loss = F.cross_entropy(model(**part.batch()), part.labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(part)
        if on_epoch is not None:
            on_epoch(epoch, total / len(data))
    model.eval()
    return model


@torch.no_grad()
def text_accuracy(model: nn.Module, data: TextData) -> float:
    """Top-1 accuracy of ``model`` on ``data``, in [0, 1]."""
    predicted = model(**data.batch()).argmax(dim=1)
    return float((predicted == data.labels).double().mean())


def shuffled_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with the entries of every parameter tensor randomly permuted (same values,
    no learned structure): the randomisation check's control. ``model`` is not changed."""
    import copy

    control = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in control.parameters():
            flat = parameter.view(-1)
            flat.copy_(flat[torch.randperm(flat.numel(), generator=generator)])
    return control.eval()


__all__ = [
    "CLASSES",
    "KEYWORDS",
    "KEYWORD_IDS",
    "PAD_ID",
    "VOCAB",
    "TextData",
    "TextTransformer",
    "make_text_data",
    "shuffled_copy",
    "text_accuracy",
    "train_text_transformer",
]
