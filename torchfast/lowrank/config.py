"""``LowRank``: the configuration of the low-rank rewrite, validated where the user writes it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from ..config import Config, ConfigError, check_choice, check_flag, check_range, opaque

METHODS = ("auto", "svd", "channel", "spatial", "tucker")


@dataclass(frozen=True)
class LowRank(Config):
    """Factorize ``Conv2d``/``Linear`` layers into pairs (or triples) of smaller plain layers.

    method: ``"svd"`` (Linear -> two Linears; on a Conv2d it is the channel decomposition, the SVD of
        the kernel as a ``[C_out, C_in*kh*kw]`` matrix), ``"channel"`` (kxk C_in->r then 1x1 r->C_out),
        ``"spatial"`` (kh x 1 then 1 x kw, Jaderberg et al.), ``"tucker"`` (1x1, kxk core, 1x1; Kim et al.),
        or ``"auto"``: per layer, the applicable method with the lowest reconstruction error (output error
        on calibration data when given, else weight error) at the FLOPs the channel/svd rank would cost.
        Linear layers always use ``svd``.
    Rank selection, at most one of (default ``ratio=0.5``):
        rank: a fixed rank for every layer, or ``{layer name: rank}`` (unlisted layers are left alone);
        ratio: a fraction of each layer's full rank (``min(C_out, C_in*kh*kw)`` for svd/channel);
        energy: keep the smallest rank holding this fraction of the (whitened) squared singular values;
        flops_reduction: per-layer target, e.g. ``2.0`` = the largest rank with at most half the FLOPs.
    budget + eval_fn: accuracy-budgeted search. ``eval_fn(model) -> metric`` (higher is better); per-layer
        ranks are chosen greedily from a per-layer sensitivity scan over ``search_ratios`` so that the
        metric drops by at most ``budget`` (absolute, in the metric's units).
    allocation: ``"uniform"`` applies the rule to every layer alike; ``"global"`` (ratio or flops_reduction
        only) turns the rule into a total FLOPs budget and spends it where it buys the most: per layer, the
        rank minimizing (relative squared output error + lambda * FLOPs), one lambda for the whole model,
        so cheap layers that matter (the classifier, the first conv) keep their rank.
    data_aware: whiten by the input-activation covariance before the SVD (minimizes the layer's output
        error instead of the weight error). ``None`` = on whenever calibration batches are given.
    min_flops_reduction: a layer is factorized only if its FLOPs shrink at least this much (0 forces it).
    speed_guard: time each factorized layer against the original on the layer's real input shape
        (interleaved, ``guard_runs`` runs; default half of ``torchfast.measure.DEFAULT_TIMING``'s, 10) and
        keep the original unless it is ``guard_min_speedup`` faster.
    exclude: qualified module names or fnmatch globs (a name covers its submodules) left as they are,
        e.g. ``("classifier", "*.attention.*")``; each must match a submodule of the model.
    ``eval_fn`` is a callable: ``to_dict`` shows its type and ``from_dict`` leaves it unset.
    """
    _transform = "decompose"

    method: str = "auto"
    rank: int | Mapping[str, int] | None = None
    ratio: float | None = None
    energy: float | None = None
    flops_reduction: float | None = None
    allocation: str = "uniform"
    data_aware: bool | None = None
    damping: float = 1e-2
    max_positions: int = 4096
    max_cov_dim: int = 8192
    hooi_iters: int = 0
    min_flops_reduction: float = 1.05
    speed_guard: bool = False
    guard_runs: int | None = None
    guard_min_speedup: float = 1.0
    threads: int | None = None
    eval_fn: Callable | None = opaque()
    budget: float | None = None
    search_ratios: tuple = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)
    progress: bool = True
    seed: int = 0
    exclude: tuple[str, ...] = ()

    def validate(self) -> None:
        n = "LowRank"
        check_choice(n, "method", self.method, METHODS)
        given = [f for f in ("rank", "ratio", "energy", "flops_reduction") if getattr(self, f) is not None]
        if len(given) > 1:
            raise ConfigError(f"{n}: give at most one of rank, ratio, energy, flops_reduction; got {', '.join(given)}")
        check_choice(n, "allocation", self.allocation, ("uniform", "global"))
        if self.allocation == "global" and given and given[0] not in ("ratio", "flops_reduction"):
            raise ConfigError(f"{n}(allocation='global') needs ratio or flops_reduction (a total FLOPs budget), "
                              f"got {given[0]}")
        if self.budget is not None and given:
            raise ConfigError(f"{n}.budget chooses the ranks itself; do not also give {given[0]}")
        if self.rank is not None:
            ranks = self.rank.items() if isinstance(self.rank, Mapping) else [(None, self.rank)]
            for layer, r in ranks:
                where = f"{n}.rank" + (f"[{layer!r}]" if layer is not None else "")
                if isinstance(r, bool) or not isinstance(r, int):
                    raise ConfigError(f"{where} must be an int, got {r!r}")
                if r < 1:
                    raise ConfigError(f"{where} must be >= 1, got {r}")
        if self.ratio is not None:
            check_range(n, "ratio", self.ratio, 0.0, 1.0, lo_inclusive=False)
        if self.energy is not None:
            check_range(n, "energy", self.energy, 0.0, 1.0, lo_inclusive=False)
        if self.flops_reduction is not None:
            check_range(n, "flops_reduction", self.flops_reduction, 1.0, None, lo_inclusive=False)
        check_flag(n, "data_aware", self.data_aware, none="auto")
        check_range(n, "damping", self.damping, 0.0, None)
        check_range(n, "max_positions", self.max_positions, 1, None)
        check_range(n, "max_cov_dim", self.max_cov_dim, 1, None)
        check_range(n, "hooi_iters", self.hooi_iters, 0, 100)
        check_range(n, "min_flops_reduction", self.min_flops_reduction, 0.0, None)
        if self.guard_runs is not None:
            check_range(n, "guard_runs", self.guard_runs, 1, None)
        check_range(n, "guard_min_speedup", self.guard_min_speedup, 0.0, None)
        if self.threads is not None:
            check_range(n, "threads", self.threads, 1, None)
        if (self.budget is None) != (self.eval_fn is None):
            raise ConfigError(f"{n}: budget and eval_fn go together (accuracy-budgeted search); "
                              f"got budget={self.budget!r}, eval_fn={self.eval_fn!r}")
        if self.eval_fn is not None and not callable(self.eval_fn):
            raise ConfigError(f"{n}.eval_fn must be callable, got {self.eval_fn!r}")
        if self.budget is not None:
            check_range(n, "budget", self.budget, 0.0, None)
        if not self.search_ratios or any(isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1
                                         for r in self.search_ratios):
            raise ConfigError(f"{n}.search_ratios must be a non-empty tuple of numbers in (0, 1], "
                              f"got {self.search_ratios!r}")

    @property
    def spec(self) -> tuple[str, object]:
        """(kind, value) of the rank rule in force."""
        for f in ("rank", "ratio", "energy", "flops_reduction"):
            v = getattr(self, f)
            if v is not None:
                return f, v
        return "ratio", 0.5
