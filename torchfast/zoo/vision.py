"""torchvision architectures (ResNet, MobileNetV3, ...) trained on the bundled digits, no download.

Random-weight ImageNet nets are near-uniform classifiers (on photo crops resnet18's top softmax probability
is ~1/1000 and the top-2 margin ~1e-4), so top-1 agreement on them measures noise, not a transform. These are
the unmodified torchvision modules (``num_classes=10``) trained for a few epochs on the digits upscaled to
``size`` and repeated to three channels: real trained weights on the real architectures, for claims about
accuracy on zoo models.
"""
from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from .digits import Digits, load_digits, train

__all__ = ["trained_torchvision"]


def _rgb(data: Digits) -> Digits:
    return Digits(data.x_train.expand(-1, 3, -1, -1).contiguous(), data.y_train,
                  data.x_test.expand(-1, 3, -1, -1).contiguous(), data.y_test)


def _settle_batchnorm(model: nn.Module, data: Digits, batch_size: int = 128) -> None:
    """Exact BatchNorm statistics of the final weights: torchvision's MobileNetV3 uses momentum 0.01, whose
    running averages are still far from the data after a few hundred steps."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the pass below
    model.train()
    with torch.no_grad():
        for i in range(0, len(data.x_train), batch_size):
            model(data.x_train[i:i + batch_size])
    model.eval()


@functools.lru_cache(maxsize=4)
def _trained_state(name: str, size: int, epochs: int, seed: int) -> tuple[dict, Digits]:
    import torchvision
    data = _rgb(load_digits(size=size, seed=seed))
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(num_classes=10)
    model = train(model, data, epochs=epochs, lr=2e-3, seed=seed)
    _settle_batchnorm(model, data)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, data


def trained_torchvision(name: str = "resnet18", size: int = 64, epochs: int = 4,
                        seed: int = 0) -> tuple[nn.Module, Digits]:
    """(torchvision ``name`` with 10 classes, trained on 3-channel digits, in eval mode; its data).

    Trained once per process for each setting and deterministic for a seed on a given machine (about a
    minute for resnet18 at 64x64 on two cores)."""
    import torchvision
    if not hasattr(torchvision.models, name) or not callable(getattr(torchvision.models, name)):
        raise ValueError(f"torchvision.models has no model {name!r}")
    state, data = _trained_state(name, size, epochs, seed)
    model = getattr(torchvision.models, name)(num_classes=10)
    model.load_state_dict(copy.deepcopy(state))
    return model.eval(), data
