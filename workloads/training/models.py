"""The two models: a word-level LSTM language model and a small Fashion-MNIST CNN."""

from __future__ import annotations

import torch
from torch import nn


class LSTMLanguageModel(nn.Module):
    """Embedding -> dropout -> L-layer LSTM -> dropout -> softmax layer (PTB-medium: 2x650, p=0.5)."""

    def __init__(self, vocab: int, embed: int, hidden: int, layers: int, dropout: float, tied: bool) -> None:
        super().__init__()
        if tied and embed != hidden:
            raise ValueError(f"tied weights need embed == hidden (got {embed} and {hidden})")
        self.drop = nn.Dropout(dropout)
        self.embedding = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, layers, dropout=dropout if layers > 1 else 0.0, batch_first=True)
        self.decoder = nn.Linear(hidden, vocab)
        if tied:
            self.decoder.weight = self.embedding.weight
        for w in (self.embedding.weight, self.decoder.weight):
            nn.init.uniform_(w, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(
        self, tokens: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Logits [batch, time, vocab] and the final LSTM state."""
        out, state = self.lstm(self.drop(self.embedding(tokens)), state)
        return self.decoder(self.drop(out)), state


class FashionCNN(nn.Module):
    """Two conv-ReLU-maxpool blocks and two dense layers (28x28 grey images, 10 classes)."""

    def __init__(self, channels: int = 32, hidden: int = 128) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * channels * 5 * 5, hidden), nn.ReLU(), nn.Linear(hidden, 10)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits [batch, 10]."""
        return self.classifier(self.features(images))
