"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (MNIST idx files, gzip).

Split: the first 55,000 training images train, the last 5,000 validate, the 10,000 t10k
images test. Pixels are scaled to [0, 1] and standardised with the training mean and std.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

ROOT = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530
VALID_SIZE = 5_000


def _read_idx(path: Path) -> np.ndarray:
    """An idx file's array (big-endian header: zero, zero, type, ndim, then the dims)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@lru_cache(maxsize=1)
def load_fashion_mnist(root: str = str(ROOT)) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """split -> (images float [N, 1, 28, 28], labels long [N])."""
    base = Path(root)
    if not (base / "train-images-idx3-ubyte.gz").exists():
        raise FileNotFoundError(f"Fashion-MNIST not found under {base} (apt-get install dataset-fashion-mnist)")

    def pair(prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.from_numpy(_read_idx(base / f"{prefix}-images-idx3-ubyte.gz").copy()).float().div_(255)
        labels = torch.from_numpy(_read_idx(base / f"{prefix}-labels-idx1-ubyte.gz").copy()).long()
        return images.sub_(MEAN).div_(STD).unsqueeze(1), labels

    train_x, train_y = pair("train")
    test = pair("t10k")
    return {
        "train": (train_x[:-VALID_SIZE], train_y[:-VALID_SIZE]),
        "valid": (train_x[-VALID_SIZE:], train_y[-VALID_SIZE:]),
        "test": test,
    }
