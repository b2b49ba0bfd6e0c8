"""Workloads by name: how to build the model, deal the data to workers and evaluate.

Data is sharded iid: every epoch reshuffles the training examples with a seed that all
workers share (seed + epoch), and worker r takes its own disjoint share, so workers see
disjoint uniformly random parts of the data and a restarted worker finds the same batches.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from backends.registry import Registry
from workloads.training.corpus import load_corpus
from workloads.training.fashion_mnist import load_fashion_mnist
from workloads.training.models import FashionCNN, LSTMLanguageModel
from workloads.training.params import TrainingParams


@dataclass
class EvalResult:
    """Loss per example/token, perplexity (language models) and accuracy."""

    loss: float
    ppl: float | None
    accuracy: float


class Task(ABC):
    """One workload on one worker; ``name`` is the grid's ``workload`` value."""

    name: str
    reports_ppl: ClassVar[bool] = False  # evaluate() gives a perplexity (target_ppl can be reached)

    @classmethod
    def check_params(cls, params: TrainingParams) -> None:
        """Refuse, at validation, parameters this workload could not run or would ignore (ValueError)."""
        if params.target_ppl is not None and not cls.reports_ppl:
            raise ValueError(f"workload {cls.name!r} reports no perplexity: set target_accuracy, not target_ppl")

    def __init__(self, params: TrainingParams, rank: int, world_size: int, device: torch.device) -> None:
        self.params, self.rank, self.world_size, self.device = params, rank, world_size, device

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A fresh model (seeded by the caller)."""

    @abstractmethod
    def steps_per_epoch(self) -> int:
        """Steps in one pass over this worker's share."""

    @abstractmethod
    def loss(self, model: nn.Module, epoch: int, index: int) -> tuple[torch.Tensor, int]:
        """Training loss of batch ``index`` of ``epoch`` and how many samples it holds."""

    @abstractmethod
    def evaluate(self, model: nn.Module, split: str, max_batches: int | None) -> EvalResult:
        """Loss and quality of ``model`` on ``split``."""

    def state_dict(self) -> dict[str, Any]:
        """State carried between steps that a resumed run needs (recurrent state); none by default."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict returned."""
        del state

    def baseline(self) -> dict[str, float]:
        """Reference quality a trained model must beat (e.g. the unigram perplexity)."""
        return {}


TASKS: Registry[type[Task]] = Registry("training workload")


@TASKS.register
class LanguageModelTask(Task):
    """Word-level LSTM LM on KJV; truncated BPTT with hidden state carried across batches."""

    name = "lstm"
    reports_ppl = True

    @classmethod
    def check_params(cls, params: TrainingParams) -> None:
        """The tied output layer is the embedding: their widths must match."""
        super().check_params(params)
        if params.model.tied and params.model.embed != params.model.hidden:
            raise ValueError(f"model.tied needs model.embed == model.hidden (the output layer reuses the embedding); "
                             f"got embed {params.model.embed}, hidden {params.model.hidden}")

    def __init__(self, params: TrainingParams, rank: int, world_size: int, device: torch.device) -> None:
        super().__init__(params, rank, world_size, device)
        self.corpus = load_corpus(params.model.vocab_size)
        self._epoch_rows: tuple[int, torch.Tensor] | None = None
        self.hidden: Any = None
        # Columns per worker are fixed by the corpus size, not the shuffle (verses only permute).
        total = len(self.corpus.ids["train"])
        self._length = total // (world_size * params.batch_size)

    def build_model(self) -> nn.Module:
        """PTB-style LSTM LM with the configured sizes."""
        m = self.params.model
        return LSTMLanguageModel(len(self.corpus.vocab), m.embed, m.hidden, m.layers, m.dropout, m.tied)

    def steps_per_epoch(self) -> int:
        """(columns - 1) // bptt."""
        return (self._length - 1) // self.params.bptt

    def _rows(self, epoch: int) -> torch.Tensor:
        """This worker's [batch, length] token streams for ``epoch`` (verses shuffled with seed + epoch)."""
        if self._epoch_rows is None or self._epoch_rows[0] != epoch:
            stream = self.corpus.shuffled_stream("train", self.params.seed + epoch)
            rows = self.world_size * self.params.batch_size
            grid = stream[: rows * self._length].view(rows, self._length)
            self._epoch_rows = (epoch, grid[self.rank :: self.world_size].to(self.device))
        return self._epoch_rows[1]

    def state_dict(self) -> dict[str, Any]:
        """The LSTM state carried into the next window (a resumed run continues bit-identically)."""
        return {"hidden": None if self.hidden is None else tuple(h.detach() for h in self.hidden)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Carry the saved LSTM state on."""
        self.hidden = state.get("hidden")

    def loss(self, model: nn.Module, epoch: int, index: int) -> tuple[torch.Tensor, int]:
        """Mean token cross-entropy of the next bptt window (state detached between windows)."""
        rows = self._rows(epoch)
        start = index * self.params.bptt
        x = rows[:, start : start + self.params.bptt]
        y = rows[:, start + 1 : start + 1 + self.params.bptt]
        if index == 0:
            self.hidden = None
        hidden = None if self.hidden is None else tuple(h.detach() for h in self.hidden)
        logits, self.hidden = model(x, hidden)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)), y.numel()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, max_batches: int | None) -> EvalResult:
        """Token-level loss, perplexity and next-word accuracy over ``split`` (10 streams, bptt windows)."""
        model.eval()
        stream = self.corpus.stream(split).to(self.device)
        streams = 10
        length = stream.numel() // streams
        rows = stream[: streams * length].view(streams, length)
        total_loss, total_correct, total_tokens, hidden = 0.0, 0, 0, None
        bptt = self.params.bptt
        for n, start in enumerate(range(0, length - 1, bptt)):
            if max_batches is not None and n >= max_batches:
                break
            x = rows[:, start : min(start + bptt, length - 1)]
            y = rows[:, start + 1 : start + 1 + x.size(1)]
            logits, hidden = model(x, hidden)
            flat = logits.reshape(-1, logits.size(-1))
            total_loss += float(F.cross_entropy(flat, y.reshape(-1), reduction="sum"))
            total_correct += int((flat.argmax(-1) == y.reshape(-1)).sum())
            total_tokens += y.numel()
        model.train()
        loss = total_loss / total_tokens
        return EvalResult(loss=loss, ppl=math.exp(min(loss, 50.0)), accuracy=total_correct / total_tokens)

    def baseline(self) -> dict[str, float]:
        """Validation perplexity of the training unigram distribution."""
        return {"unigram_ppl": self.corpus.unigram_ppl("valid")}


@TASKS.register
class ImageTask(Task):
    """CNN on Fashion-MNIST; each epoch a shared permutation is dealt out in equal shares."""

    name = "cnn"

    def __init__(self, params: TrainingParams, rank: int, world_size: int, device: torch.device) -> None:
        super().__init__(params, rank, world_size, device)
        self.data = load_fashion_mnist()
        self._epoch_index: tuple[int, torch.Tensor] | None = None

    def build_model(self) -> nn.Module:
        """FashionCNN with the configured widths."""
        return FashionCNN(self.params.model.channels, self.params.model.hidden)

    def steps_per_epoch(self) -> int:
        """Images per worker // batch size."""
        return len(self.data["train"][1]) // self.world_size // self.params.batch_size

    def _share(self, epoch: int) -> torch.Tensor:
        if self._epoch_index is None or self._epoch_index[0] != epoch:
            n = len(self.data["train"][1])
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.params.seed + epoch))
            self._epoch_index = (epoch, order[self.rank :: self.world_size])
        return self._epoch_index[1]

    def loss(self, model: nn.Module, epoch: int, index: int) -> tuple[torch.Tensor, int]:
        """Cross-entropy of one batch of this worker's share."""
        b = self.params.batch_size
        idx = self._share(epoch)[index * b : (index + 1) * b]
        images, labels = self.data["train"]
        logits = model(images[idx].to(self.device))
        return F.cross_entropy(logits, labels[idx].to(self.device)), len(idx)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, max_batches: int | None) -> EvalResult:
        """Mean cross-entropy and accuracy over ``split`` in batches of 1,000."""
        model.eval()
        images, labels = self.data[split]
        total_loss, correct, seen = 0.0, 0, 0
        for n, start in enumerate(range(0, len(labels), 1000)):
            if max_batches is not None and n >= max_batches:
                break
            x, y = images[start : start + 1000].to(self.device), labels[start : start + 1000].to(self.device)
            logits = model(x)
            total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
            seen += len(y)
        model.train()
        return EvalResult(loss=total_loss / seen, ppl=None, accuracy=correct / seen)




def build_task(params: TrainingParams, rank: int, world_size: int, device: torch.device) -> Task:
    """The task for ``params.workload``."""
    return TASKS[params.workload](params, rank, world_size, device)
