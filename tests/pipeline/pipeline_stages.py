"""Stage transforms registered by the pipeline tests, with the transform signature (the real transforms have
their own tests)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from torchfast.config import Config, check_range
from torchfast.stages import Stage, register_stage
from torchfast.report import Report

CALLS: list[str] = []


@dataclass(frozen=True)
class Noise(Config):
    """Adds Gaussian noise of relative size ``scale`` to every weight (0 = identity)."""
    scale: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        check_range("Noise", "scale", self.scale, 0.0, None)


@dataclass(frozen=True)
class DropHidden(Config):
    """Zeroes the first ``fraction`` of the first Linear's output units: a real, deterministic accuracy loss."""
    fraction: float = 0.5


@dataclass(frozen=True)
class Boom(Config):
    """A stage that mutates the model in place and then raises."""


@dataclass(frozen=True)
class Slow(Config):
    """Wraps the model in a module that sleeps ``ms`` per call: a stage that does not pay for itself."""
    ms: float = 3.0


@dataclass(frozen=True)
class RescaleConvs(Config):
    """Multiplies every conv's weight and bias by ``factor``: what the BatchNorm after it sees changes scale,
    which re-estimating its statistics undoes exactly."""
    factor: float = 3.0


class _Sleepy(nn.Module):
    def __init__(self, inner: nn.Module, ms: float):
        super().__init__()
        self.inner, self.ms = inner, ms

    def forward(self, x):
        time.sleep(self.ms / 1e3)
        return self.inner(x)


def _noise(model, cfg, *, example_inputs=None, calibration=None, inplace=False):
    CALLS.append(f"noise:{cfg.scale}")
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * cfg.scale * p.abs().mean())
    rep = Report(f"noise {cfg.scale}")
    rep.add_row(layer="*", applied=True, calibration_batches=len(calibration or []))
    return model, rep


def _drop(model, cfg, *, example_inputs=None, calibration=None, inplace=False):
    CALLS.append("drop")
    lin = next(m for m in model.modules() if isinstance(m, nn.Linear))
    k = int(lin.out_features * cfg.fraction)
    with torch.no_grad():
        lin.weight[:k] = 0
        lin.bias[:k] = 0
    return model, Report("drop hidden")


def _boom(model, cfg, *, example_inputs=None, calibration=None, inplace=False):
    CALLS.append("boom")
    with torch.no_grad():
        next(model.parameters()).zero_()
    raise RuntimeError("boom: this stage always fails")


def _slow(model, cfg, *, example_inputs=None, calibration=None, inplace=False):
    CALLS.append("slow")
    return _Sleepy(model, cfg.ms), Report("slow")


def _rescale(model, cfg, *, example_inputs=None, calibration=None, inplace=False):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(cfg.factor)
                if m.bias is not None:
                    m.bias.mul_(cfg.factor)
    return model, Report("rescale convs")


# in the one stage table, as a transform of your own would be: recipes and recipe strings run them
register_stage(Stage(Noise, _noise, {"noise": {}}))
register_stage(Stage(DropHidden, _drop, {"drop-hidden": {}}))
register_stage(Stage(Boom, _boom, {"boom": {}}))
register_stage(Stage(Slow, _slow, {"slow": {}, "slow-1ms": {"ms": 1.0}}))
register_stage(Stage(RescaleConvs, _rescale, {"rescale-convs": {}}))


class TwoInputs(nn.Module):
    """forward(input_ids, attention_mask=None): the call shape of a Hugging Face encoder."""

    def __init__(self, vocab: int = 50, dim: int = 16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1).to(h.dtype)
        return self.out(h).mean(1)


def build_mlp():
    """module:callable target for the CLI tests."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))


_TRAINED: dict = {}


def trained_digits_mlp():
    """(fresh copy of a 64-32-10 MLP trained on scikit-learn's real 8x8 digits, data, eval_fn). Trained once per
    session in about a second (the zoo's session models take much longer on a loaded machine)."""
    import copy

    from torchfast.measure import accuracy, fixed_threads
    from torchfast.zoo.digits import load_digits
    if not _TRAINED:
        data = load_digits(size=8)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
        with fixed_threads(1):  # tiny matmuls: one thread beats two on a shared, loaded machine
            for _ in range(150):
                opt.zero_grad()
                nn.functional.cross_entropy(model(data.x_train), data.y_train).backward()
                opt.step()
        _TRAINED.update(model=model.eval(), data=data)
    data = _TRAINED["data"]
    return copy.deepcopy(_TRAINED["model"]), data, (lambda m: accuracy(m, data.test_batches()))
