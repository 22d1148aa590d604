"""A real, trained model on real data with no download: scikit-learn's bundled digits.

Used by the demo, the tests and the benchmarks wherever a claim is about accuracy (fidelity on
random weights says little about trained ones).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F


@dataclass
class Digits:
    x_train: torch.Tensor  # [N, 1, S, S] float32, normalized
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def test_batches(self, batch_size: int = 256):
        return [(self.x_test[i:i + batch_size], self.y_test[i:i + batch_size])
                for i in range(0, len(self.x_test), batch_size)]

    def calibration(self, n_batches: int = 8, batch_size: int = 32) -> list[torch.Tensor]:
        """Batches of real training images (no labels), for calibration and data-aware transforms."""
        return [self.x_train[i * batch_size:(i + 1) * batch_size] for i in range(n_batches)]

    def eval_fn(self, model) -> float:
        from ..measure import accuracy
        return accuracy(model, self.test_batches())


def load_digits(size: int = 16, seed: int = 0, test_fraction: float = 0.2) -> Digits:
    """The 8x8 digits upscaled (bilinear) to ``size``x``size``, split reproducibly into train/test."""
    from sklearn.datasets import load_digits as sk_load

    d = sk_load()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - 0.3) / 0.35
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    n_test = int(len(x) * test_fraction)
    te, tr = perm[:n_test], perm[n_test:]
    return Digits(x[tr].contiguous(), y[tr], x[te].contiguous(), y[te])


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU blocks, pooling, flatten -> MLP head: the shapes real CNNs have, small enough to train in seconds."""

    def __init__(self, width: int = 32, size: int = 16, classes: int = 10):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        flat = 4 * w * (size // 4) ** 2
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, 256), nn.ReLU(inplace=True), nn.Dropout(0.2), nn.Linear(256, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class DigitsMLP(nn.Module):
    """The source article's MLP: 784 -> 128 -> 10 on 28x28 digits."""

    def __init__(self, size: int = 28, hidden: int = 128, classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(size * size, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def train(model: nn.Module, data: Digits, epochs: int = 12, lr: float = 2e-3, batch_size: int = 64,
          seed: int = 0, verbose: bool = False) -> nn.Module:
    """Adam + cosine schedule; deterministic for a given seed. Returns the model in eval mode."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(data.x_train) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    t0 = time.perf_counter()
    for ep in range(epochs):
        perm = torch.randperm(len(data.x_train), generator=g)
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            x, y = data.x_train[idx], data.y_train[idx]
            # light augmentation: random 1-pixel shifts keep the tiny dataset from being memorized
            dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if verbose:
            print(f"epoch {ep + 1}/{epochs} loss {loss.item():.3f} ({time.perf_counter() - t0:.1f}s)")
    return model.eval()


def trained_cnn(size: int = 16, width: int = 32, epochs: int = 12, seed: int = 0) -> tuple[DigitsCNN, Digits]:
    data = load_digits(size=size, seed=seed)
    torch.manual_seed(seed)
    return train(DigitsCNN(width=width, size=size), data, epochs=epochs, seed=seed), data


def trained_mlp(size: int = 28, epochs: int = 20, seed: int = 0) -> tuple[DigitsMLP, Digits]:
    data = load_digits(size=size, seed=seed)
    torch.manual_seed(seed)
    return train(DigitsMLP(size=size), data, epochs=epochs, seed=seed), data
