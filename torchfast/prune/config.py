"""Configs for structured pruning and sparsity (frozen, validated on construction)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from ..config import Config, ConfigError, check_choice, check_flag, check_range, opaque
from ..transform import Exclusion

IMPORTANCE = ("l1", "l2", "bn_scale", "taylor")


@dataclasses.dataclass(frozen=True)
class ChannelPruning(Config):
    """Remove ``amount`` of the prunable channels / neurons / attention heads of every coupled group.

    importance: 'l1' | 'l2' (weight norms), 'bn_scale' (|BatchNorm gamma|, L1 where a group has no BN),
        'taylor' (|w * dL/dw| on calibration batches or the example inputs; ``loss_fn(output) -> scalar``,
        default: mean squared output, a label-free proxy).
    scope: 'local' prunes each group by ``amount``; 'global' removes ``amount`` of all prunable channels,
        ranked by group-normalized importance, at most ``max_amount`` of any one group.
    exclude: module names or fnmatch globs (a name covers its submodules) whose channels must not change.
    layer_amounts: {layer name: amount} overrides for the groups that layer produces.
    round_to: keep channel counts multiples of this (e.g. 8 for vectorized kernels).
    recalibrate_bn: re-estimate the BatchNorm statistics on the calibration batches after pruning (the layers
        feeding them lost channels, so the statistics they were trained with no longer fit). ``None``
        (default): whenever calibration batches are given, kept where it brings the outputs closer to the
        original's on the last batch (held out); ``True``: always (needs calibration); ``False``: never.
    reconstruct: refit each Conv2d / Linear that lost input channels by least squares, so the kept channels
        reproduce the original layer's output on the calibration batches (``torchfast.prune.reconstruct``;
        runs before the BatchNorm re-estimation). ``None`` (default): whenever two or more calibration batches
        are given, per layer where it lowers the held-out error, and only if the outputs come closer to the
        original's on the held-out batch; ``True``: always (needs calibration); ``False``: never.
    ``loss_fn`` is a callable: ``to_dict`` shows its type and ``from_dict`` leaves it unset.
    """
    _transform = "prune"
    amount: float = 0.3
    importance: str = "l2"
    scope: str = "local"
    exclude: tuple[str, ...] = ()
    layer_amounts: Any = ()
    round_to: int = 1
    max_amount: float = 0.9
    loss_fn: Callable[[Any], Any] | None = opaque()
    recalibrate_bn: bool | None = None
    reconstruct: bool | None = None

    def __post_init__(self) -> None:
        la = self.layer_amounts
        if isinstance(la, Mapping):
            la = tuple(sorted(la.items()))
        object.__setattr__(self, "layer_amounts", tuple(tuple(x) for x in la))
        super().__post_init__()

    def validate(self) -> None:
        n = type(self).__name__
        check_range(n, "amount", self.amount, 0.0, 1.0, hi_inclusive=False)
        check_choice(n, "importance", self.importance, IMPORTANCE)
        check_choice(n, "scope", self.scope, ("local", "global"))
        check_range(n, "max_amount", self.max_amount, 0.0, 1.0, hi_inclusive=False)
        check_flag(n, "recalibrate_bn", self.recalibrate_bn, none="where it helps")
        check_flag(n, "reconstruct", self.reconstruct, none="where it helps")
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise ConfigError(f"{n}.round_to must be a positive int, got {self.round_to!r}")
        excluded = Exclusion(self.exclude)
        for pair in self.layer_amounts:
            if len(pair) != 2 or not isinstance(pair[0], str):
                raise ConfigError(f"{n}.layer_amounts must map layer names to amounts, got {pair!r}")
            name, amt = pair
            check_range(n, f"layer_amounts[{name!r}]", amt, 0.0, 1.0, hi_inclusive=False)
            if excluded(name):
                raise ConfigError(f"{n}: layer {name!r} is excluded ({excluded.match(name)!r}), so it cannot be "
                                  f"pruned (layer_amounts[{name!r}]={amt})")


@dataclasses.dataclass(frozen=True)
class UnstructuredSparse(Config):
    """Zero the ``amount`` smallest-magnitude weights of each Linear; swap in a sparse kernel where measured faster.

    layouts: sparse formats tried on CPU ("csr"; "bsr" is available but never beat dense on unstructured
    masks in benchmarks/prune.py); ``min_speedup``: a sparse kernel must beat the
    dense layer by this factor on the layer's real input shape, else the layer stays dense (with zeros);
    ``runs``: timed runs per kernel (default three quarters of ``torchfast.measure.DEFAULT_TIMING``'s, 15).
    exclude: module names or fnmatch globs (a name covers its submodules) left dense and unmasked.
    """
    _transform = "sparsify"
    amount: float = 0.9
    layouts: tuple[str, ...] = ("csr",)
    blocksize: int = 16
    min_speedup: float = 1.1
    exclude: tuple[str, ...] = ()
    runs: int | None = None

    def validate(self) -> None:
        n = type(self).__name__
        check_range(n, "amount", self.amount, 0.0, 1.0, hi_inclusive=False)
        for x in self.layouts:
            check_choice(n, "layouts", x, ("csr", "bsr"))
        check_range(n, "min_speedup", self.min_speedup, 0.0, None)
        if self.runs is not None:
            check_range(n, "runs", self.runs, 1, None)
        if self.blocksize not in (2, 4, 8, 16, 32, 64):
            raise ConfigError(f"{n}.blocksize must be one of 2..64 (a power of two), got {self.blocksize!r}")


@dataclasses.dataclass(frozen=True)
class SemiStructured24(Config):
    """2:4 sparsity (2 of every 4 consecutive input weights zeroed, by magnitude) on Linear layers.

    On CUDA (compute capability >= 8.0, fp16/bf16) weights become ``torch.sparse.to_sparse_semi_structured``
    tensors (sparse tensor cores). Elsewhere the 2:4 masks are applied and the layers stay dense, with a
    report line per layer; ``require_kernel=True`` raises instead.
    exclude: module names or fnmatch globs (a name covers its submodules) left dense and unmasked.
    """
    _transform = "sparsify"
    exclude: tuple[str, ...] = ()
    require_kernel: bool = False
    min_speedup: float = 1.0

    def validate(self) -> None:
        check_range(type(self).__name__, "min_speedup", self.min_speedup, 0.0, None)
