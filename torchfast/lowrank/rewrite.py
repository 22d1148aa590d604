"""``decompose()``: find the layers, collect statistics, factorize, guard, report, swap.

Everything up to the final swap only reads the model (the accuracy-budgeted search swaps layers one
at a time and puts them back in a ``finally``), and the swap is all-or-none, so a raise leaves the
user's model as it was.
"""
from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..config import ConfigError
from ..modules import batches_list, check_module, maybe_copy, swap_modules
from ..report import Report
from ..transform import Exclusion, legacy_positional, user_stacklevel
from . import decompose as D
from .calibrate import LayerStats, collect
from .config import LowRank
from .layers import LowRankConv2d, LowRankLinear, set_weights
from .ranks import Geometry, ranks_at_budget, resolve_ranks


# weights from which a layer's cached factorization is dropped between the rank allocation and its build
LARGE_LAYER = 1_000_000
# the cached SVD whose singular values are each method's spectrum (tucker reads its mode spectra instead)
_SVD_OF = {"svd": "svd", "channel": "svd", "spatial": "spatial"}


@dataclass
class Candidate:
    method: str
    ranks: tuple[int, ...]
    module: nn.Module | None  # None once only the report needs it
    flops: int
    params: int
    weight_err: float
    output_err: float | None

    @property
    def score(self) -> float:
        return self.output_err if self.output_err is not None else self.weight_err


@dataclass
class Layer:
    """One Conv2d/Linear under consideration, with its statistics and cached decompositions."""
    name: str
    module: nn.Module
    geom: Geometry
    cov: torch.Tensor | None       # input second moment (None: no calibration or too large)
    data_aware: bool
    cfg: LowRank
    note: str = ""
    _cache: dict = field(default_factory=dict)

    def weight(self) -> torch.Tensor:
        if "W" not in self._cache:
            w = self.module.weight.detach()
            dt = D.compute_dtype(w, self.cov)
            self._cache["W"] = w.reshape(w.shape[0], -1).to(dt)
        return self._cache["W"]

    def weight4(self) -> torch.Tensor:
        return self.weight().reshape(self.module.weight.shape)

    def cov_for_fit(self) -> torch.Tensor | None:
        return self.cov.to(self.weight().dtype) if (self.data_aware and self.cov is not None) else None

    def svd(self) -> D.SVDPrep:
        if "svd" not in self._cache:
            self._cache["svd"] = D.svd_prep(self.weight(), self.cov_for_fit(), self.cfg.damping)
        return self._cache["svd"]

    def spatial_svd(self) -> D.SVDPrep:
        if "spatial" not in self._cache:
            self._cache["spatial"] = D.svd_prep(D.spatial_matrix(self.weight4()))
        return self._cache["spatial"]

    def spectra(self, method: str) -> tuple[torch.Tensor, ...]:
        with D.linalg_threads(self.module.weight):
            return self._spectra(method)

    def _spectra(self, method: str) -> tuple[torch.Tensor, ...]:
        key = _SVD_OF.get(method)
        if key is not None:
            kept = self._cache.get("spectrum", {}).get(key)
            return (kept if kept is not None else (self.svd() if key == "svd" else self.spatial_svd()).S,)
        if "modes" not in self._cache:
            self._cache["modes"] = D.mode_spectra(self.weight4())
        return self._cache["modes"]

    def build(self, method: str, ranks: tuple[int, ...]) -> Candidate:
        with D.linalg_threads(self.module.weight):
            return self._build(method, ranks)

    def _build(self, method: str, ranks: tuple[int, ...]) -> Candidate:
        m, g, W = self.module, self.geom, self.weight()
        bias = None if m.bias is None else m.bias.detach()
        if method in ("svd", "channel"):
            A, B = D.svd_factors(self.svd(), ranks[0])
            W_hat = B @ A
            if g.kind == "linear":
                new = LowRankLinear(g.cin, g.out, ranks[0], bias=bias is not None,
                                    device=m.weight.device, dtype=m.weight.dtype)
                weights = [A, B]
            else:
                new = LowRankConv2d(m, "channel", ranks)
                weights = [A.reshape(ranks[0], g.cin, g.kh, g.kw), B]
        elif method == "spatial":
            V, H = D.spatial_factors(self.spatial_svd(), ranks[0], tuple(m.weight.shape))
            if self.cov_for_fit() is not None:
                H = D.spatial_refit(V, W, self.cov_for_fit(), g.kw, self.cfg.damping)
            W_hat = D.spatial_effective(V, H)
            new, weights = LowRankConv2d(m, "spatial", ranks), [V, H]
        elif method == "tucker":
            t = D.tucker2(self.weight4(), ranks[0], ranks[1], self.cov_for_fit(), self.cfg.damping, self.cfg.hooi_iters)
            W_hat = t.W_hat
            new, weights = LowRankConv2d(m, "tucker", ranks), [t.U_in.T, t.core, t.U_out]
        else:
            raise ValueError(f"unknown method {method!r}")
        set_weights(new, weights, bias)
        new.train(m.training)
        w_err, o_err = D.errors(W, W_hat, self.cov)
        return Candidate(method, tuple(int(r) for r in ranks), new, g.flops(method, ranks), g.params(method, ranks),
                         w_err, o_err)

    def methods(self) -> tuple[str, ...]:
        gm = self.geom.methods()
        want = self.cfg.method
        if want == "auto" or self.geom.kind == "linear":
            return gm
        if want == "svd":
            return (gm[0],)
        if want not in gm:
            self.note = f"{want} does not apply to a {self.geom.kh}x{self.geom.kw} kernel; used {gm[0]}"
            return (gm[0],)
        return (want,)

    def candidates(self, kind: str, value: Any) -> list[Candidate]:
        """One candidate per applicable method: the reference method at the rule's ranks, the others at
        the largest ranks within the reference's FLOPs (so 'auto' compares them at equal cost)."""
        methods = self.methods()
        if len(methods) == 1:
            return [self.build(methods[0], resolve_ranks(self.geom, self.name, methods[0], kind, value, self.spectra))]
        ref = self.geom.methods()[0]
        ref_ranks = resolve_ranks(self.geom, self.name, ref, kind, value, self.spectra)
        budget = self.geom.flops(ref, ref_ranks)
        out = []
        for meth in methods:
            ranks = ref_ranks if meth == ref else ranks_at_budget(self.geom, meth, budget)
            out.append(self.build(meth, ranks))
        return out

    def best(self, kind: str, value: Any) -> Candidate:
        return min(self.candidates(kind, value), key=lambda c: c.score)

    def release(self, keep_spectra: bool = False) -> None:
        """Drop the cached weight copies and factorizations: kept for every layer at once they hold several
        times the model's weights (the full SVD factors, in float64 for mid-size layers), which a model
        of billions of weights cannot afford. ``keep_spectra`` keeps the singular values (a few KB) that
        a global rank allocation reads again."""
        spectrum = {**self._cache.get("spectrum", {}),
                    **{k: self._cache[k].S for k in ("svd", "spatial") if k in self._cache}} if keep_spectra else {}
        modes = self._cache.get("modes") if keep_spectra else None
        self._cache.clear()
        if spectrum:
            self._cache["spectrum"] = spectrum
        if modes is not None:
            self._cache["modes"] = modes

    def trim(self) -> None:
        """Between reading a large layer's spectrum and building its factors (a global rank allocation reads
        every layer's first), keep only the spectrum: one SVD more per large layer instead of all their
        factors in memory at once."""
        if self.module.weight.numel() >= LARGE_LAYER:
            self.release(keep_spectra=True)


# ---------------------------------------------------------------- layer discovery
def _shared_weights(model: nn.Module) -> set[int]:
    seen = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {k for k, v in seen.items() if v > 1}


def find_layers(model: nn.Module, cfg: LowRank, exclusion: Exclusion) -> tuple[dict[str, nn.Module], list[dict]]:
    """(eligible layers by name, report rows for every other Conv2d/Linear saying why it is left alone)."""
    eligible, skipped, seen_any, not_excluded = {}, [], 0, 0
    shared = _shared_weights(model)
    parents = {}
    for pname, p in model.named_modules():
        for cname, c in p.named_children():
            parents[f"{pname}.{cname}" if pname else cname] = p
    rank_map = dict(cfg.rank) if isinstance(cfg.rank, Mapping) else None
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        seen_any += 1
        g = Geometry.of(m) if not isinstance(m.weight, nn.parameter.UninitializedParameter) else None
        row = {"layer": name, "type": g.describe() if g else type(m).__name__}
        parent = parents.get(name)
        if exclusion(name):
            reason = exclusion.reason(name)
        else:
            not_excluded += 1
            reason = None
            if isinstance(parent, (LowRankLinear, LowRankConv2d)):
                reason = "already a factor of a low-rank layer"
            elif isinstance(parent, nn.MultiheadAttention):
                reason = "weights read directly by nn.MultiheadAttention"
            elif type(m).__module__.startswith("torch.ao") or type(m).__module__.startswith("torch.nn.qat"):
                reason = f"{type(m).__name__} (quantized/QAT) is not factorized"
            elif g is None:
                reason = "uninitialized (lazy) layer"
            elif isinstance(m, nn.Conv2d) and m.groups > 1:
                reason = f"grouped/depthwise conv (groups={m.groups}) is not factorized"
            elif id(m.weight) in shared:
                reason = "weight is shared with another module (tied)"
            elif rank_map is not None and name not in rank_map:
                reason = "no rank given for it in LowRank.rank"
        if reason is None:
            eligible[name] = m
        else:
            skipped.append({**row, "applied": False, "reason": reason})
    if seen_any == 0:
        raise ValueError(f"{type(model).__name__} has no Conv2d or Linear layer to factorize")
    if exclusion and not_excluded == 0:
        raise ConfigError(f"LowRank.exclude {exclusion.patterns!r} covers all {seen_any} Conv2d/Linear layers of "
                          f"{type(model).__name__}: nothing is left to factorize")
    if rank_map is not None:
        names = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
        for k in rank_map:
            if k not in names:
                raise ValueError(f"LowRank.rank names {k!r}, which is not a Conv2d/Linear layer of "
                                 f"{type(model).__name__}")
    return eligible, skipped


# ---------------------------------------------------------------- the transform
def _filter_fn_to_exclude(model: Any, kwargs: dict) -> dict:
    """The former ``filter_fn(module, name) -> bool`` becomes the names it refused, added to ``LowRank.exclude``."""
    filter_fn = kwargs.pop("filter_fn", None)
    if filter_fn is None:
        return kwargs
    warnings.warn("decompose(filter_fn=...) is replaced by LowRank(exclude=(module names or globs, ...))",
                  FutureWarning, stacklevel=user_stacklevel())
    check_module(model)
    if not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable (module, name) -> bool, got {type(filter_fn).__name__}")
    cfg = kwargs.get("config") or LowRank()
    if isinstance(cfg, LowRank):
        refused = tuple(n for n, m in model.named_modules()
                        if isinstance(m, (nn.Conv2d, nn.Linear)) and n and not filter_fn(m, n))
        kwargs["config"] = cfg.replace(exclude=cfg.exclude + refused)
    return kwargs


@legacy_positional(("config", "filter_fn", "calibration", "example_inputs", "inplace"), adapt=_filter_fn_to_exclude)
def decompose(model: nn.Module, config: LowRank | None = None, *, example_inputs: Any = None,
              calibration: Any = None, inplace: bool = False) -> tuple[nn.Module, Report]:
    """Factorize the Conv2d/Linear layers of ``model`` as ``config`` says; returns ``(model, report)``.

    calibration: batches (tensor / tuple / dict each) of real inputs: turn on data-aware factorization
        and output-error scoring. example_inputs: one batch at the real shape, for FLOPs and the speed
        guard (else the first calibration batch is used).
    inplace: ``False`` (default) factorizes a copy and leaves ``model`` exactly as it was (weights, module
        types, every submodule's train/eval flag). ``True`` swaps the factorized layers into ``model`` and
        returns it; the layers left alone keep their parameter objects. Either way a raise changes nothing.
    """
    check_module(model)
    cfg = LowRank() if config is None else config
    if not isinstance(cfg, LowRank):
        raise TypeError(f"config must be a torchfast.LowRank, got {type(cfg).__name__}")
    exclusion = Exclusion.resolve(model, cfg)
    calib = batches_list(calibration)
    data_aware = bool(calib) if cfg.data_aware is None else cfg.data_aware
    if data_aware and not calib:
        raise ConfigError("LowRank(data_aware=True) needs calibration batches: decompose(model, cfg, calibration=...)")
    if cfg.speed_guard and example_inputs is None and not calib:
        raise ValueError("LowRank(speed_guard=True) times each layer on its real input shape: "
                         "pass example_inputs (or calibration)")

    work = maybe_copy(model, inplace)
    eligible, skipped_rows = find_layers(work, cfg, exclusion)
    stats: dict[str, LayerStats] = {}
    if eligible and (example_inputs is not None or calib):
        stats = collect(work, eligible, example_inputs, calib, cfg.max_positions, cfg.max_cov_dim, cfg.seed)
    layers = []
    for name, m in eligible.items():
        st = stats.get(name, LayerStats())
        layers.append(Layer(name, m, Geometry.of(m, st.in_shape, st.out_shape), st.covariance, data_aware, cfg))

    from .select import choose  # the per-layer decision (rank rule or budgeted search, FLOPs, speed guard)
    decisions, search_summary = choose(work, layers, cfg)

    rep = _report(cfg, data_aware, layers, decisions, skipped_rows, stats)
    rep.summary.update(search_summary)
    # ---- swap (the only mutation)
    swap_modules(work, {layer.name: cand.module for layer, cand, _ in decisions if cand is not None})
    return work, rep


def _report(cfg: LowRank, data_aware: bool, layers: list[Layer], decisions, skipped_rows, stats) -> Report:
    kind, value = cfg.spec
    rep = Report("Low-rank decomposition", columns=[
        "layer", "type", "method", "rank", "params_before", "params_after", "mflops_before", "mflops_after",
        "weight_err", "output_err", "speedup", "applied", "reason"])
    p0 = p1 = f0 = f1 = 0
    known = all(l.geom.known for l in layers)
    for layer, applied, info in decisions:
        c = applied or info.get("candidate")
        g = layer.geom
        row = {"layer": layer.name, "type": g.describe(), "method": c.method if c else None,
               "rank": ",".join(map(str, c.ranks)) if c else None,
               "params_before": g.params(), "params_after": (applied.params if applied else g.params()),
               "mflops_before": g.flops() / 1e6 if g.known else None,
               "mflops_after": ((applied.flops if applied else g.flops()) / 1e6) if g.known else None,
               "weight_err": c.weight_err if c else None, "output_err": c.output_err if c else None,
               "speedup": info.get("speedup"), "applied": applied is not None,
               "reason": info.get("reason", "")}
        if c is not None and not applied:  # what the skipped factorization would have cost
            row["params_candidate"], row["mflops_candidate"] = c.params, (c.flops / 1e6 if g.known else None)
        if layer.note:
            row["reason"] = (row["reason"] + "; " if row["reason"] else "") + layer.note
        rep.add_row(**row)
        p0 += g.params(); p1 += applied.params if applied else g.params()
        f0 += g.flops(); f1 += applied.flops if applied else g.flops()
    for r in skipped_rows:
        rep.add_row(**r)
    n_applied = sum(1 for _, a, _ in decisions if a is not None)
    rep.summary.update({
        "method": cfg.method, "rule": (f"{kind}={value}" if cfg.budget is None else f"budget={cfg.budget}")
        + (", global allocation" if cfg.allocation == "global" and cfg.budget is None else ""),
        "data_aware": data_aware, "layers_factorized": n_applied, "layers_considered": len(layers),
        "layers_skipped": len(layers) - n_applied + len(skipped_rows),
        "params_before": p0, "params_after": p1, "params: x fewer": p0 / p1 if p1 else None,
    })
    if known and layers:
        rep.summary.update({"layer_mflops_before": f0 / 1e6, "layer_mflops_after": f1 / 1e6,
                            "FLOPs: x fewer": f0 / f1 if f1 else None})
    else:
        rep.note("FLOPs per layer need the layer's input shape: pass example_inputs or calibration")
    rep.note("params/FLOPs are of the Conv2d/Linear layers considered (FLOPs: 2 per multiply-add, over the "
             "example batch). output_err = relative output error on the calibration activations; "
             "weight_err = relative Frobenius error of the effective kernel.")
    miss = [n for n, s in stats.items() if s.cov_skipped]
    if miss and data_aware:
        rep.note(f"data-free for {len(miss)} layer(s) with huge inputs ({stats[miss[0]].cov_skipped}): {', '.join(miss[:5])}")
    return rep
