"""Refit the layers that lost input channels so they reproduce the original layer's output (least squares).

When a layer's input channels are removed, what they contributed is gone; but channels are correlated, and
the kept ones can usually stand in for much of it. For each such Conv2d / Linear the new weights solve a
ridge regression from the kept input channels (as the original model computes them on unlabeled batches)
to the original layer's output on its kept output channels: the reconstruction step of channel pruning
(He, Zhang & Sun, "Channel Pruning for Accelerating Very Deep Neural Networks", ICCV 2017; Luo et al.,
ThiNet, ICCV 2017). Layers are refit in the order the model calls them, each on its input as the pruned
model computes it with the layers before it already refit, so a layer also corrects the error that reaches
it from upstream. No training: per layer, forward passes up to that layer and one solve.

Statistics are sufficient: a layer keeps only its Gram matrix X'X, the cross term X'Y and ||Y||^2, for the
fitting batches and for a held-out one. The ridge strength is picked per layer on the held-out batch,
and a layer is refit only where that brings its held-out error below plain slicing; the whole refit is then
kept only if the pruned model's outputs come closer to the original's on the held-out batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from ..measure import compare_outputs, outputs
from ..modules import Batch, call_model, evaluating

__all__ = ["reconstructable", "reconstruct_layers"]

RIDGE = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)   # times the mean diagonal of the Gram matrix
MAX_ROWS = 8192                          # rows (positions x images) sampled per layer per batch ...
MAX_FIT_ROWS = 65536                     # ... and over all the fitting batches
TARGET_BYTES = 2 << 30                   # the original's layer outputs kept from its one pass
MAX_FEATURES = 8192                      # wider inputs (a Gram matrix over 0.5 GB) keep their sliced weights


def reconstructable(m: nn.Module) -> bool:
    """A Conv2d / Linear computing its base op on its own weight (so its input and output are the op's)."""
    if parametrize.is_parametrized(m) or not isinstance(getattr(m, "weight", None), torch.Tensor):
        return False
    if not m.weight.is_floating_point():
        return False
    if isinstance(m, nn.Conv2d):
        return type(m).forward is nn.Conv2d.forward and m.groups == 1 and m.padding_mode == "zeros" \
            and not isinstance(m.padding, str)
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


@dataclass
class _Stats:
    """Sufficient statistics of one layer's regression, for the fitting batches and the held-out one."""
    rows: torch.Tensor           # output channels the pruned layer keeps
    bias: bool
    gram: list = field(default_factory=lambda: [None, None])
    cross: list = field(default_factory=lambda: [None, None])
    norm: list = field(default_factory=lambda: [0.0, 0.0])

    def add(self, part: int, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.bias:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        g, c = (x.T @ x).double(), (x.T @ y).double()   # float32 products of a few thousand rows, summed in float64
        self.gram[part] = g if self.gram[part] is None else self.gram[part] + g
        self.cross[part] = c if self.cross[part] is None else self.cross[part] + c
        self.norm[part] += float(y.double().pow(2).sum())

    def error(self, w: torch.Tensor, part: int = 1) -> float:
        """||X w - Y||^2 on ``part`` from the statistics (w: features x outputs)."""
        g, c = self.gram[part], self.cross[part]
        return float((w * (g @ w)).sum() - 2 * (w * c).sum()) + self.norm[part]


def _input_rows(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One call's input as rows of features (a conv's unfolded patches, channel-major like its weight)."""
    if not isinstance(m, nn.Conv2d):
        return x.reshape(-1, x.shape[-1])
    cols = F.unfold(x if x.dim() == 4 else x[None], m.kernel_size, dilation=m.dilation, padding=m.padding,
                    stride=m.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _output_rows(m: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """One call's output as rows, without the layer's bias (the regression's target)."""
    if isinstance(m, nn.Conv2d):
        y = y if y.dim() == 4 else y[None]
        ys = y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])
    else:
        ys = y.reshape(-1, y.shape[-1])
    return ys - m.bias.detach() if m.bias is not None else ys


class _Stop(Exception):
    """Raised by a capture hook once it has what it needs: the rest of the forward is not run."""


def _first_calls(model: nn.Module, names: list[str], batch: Batch, fn: Callable) -> None:
    """``fn(name, layer, input, output)`` at the first call of each of ``names`` while ``model`` runs
    ``batch``; the forward stops once all of them have run."""
    seen: set[str] = set()

    def hook(name: str) -> Callable:
        def run(m, args, out):
            x = args[0] if args else None
            if name not in seen and isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor):
                seen.add(name)
                fn(name, m, x.detach(), out.detach())
                if len(seen) == len(names):
                    raise _Stop
        return run

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            call_model(model, batch)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()


def _capture(model: nn.Module, name: str, batch: Batch) -> tuple[nn.Module, torch.Tensor, torch.Tensor] | None:
    """(layer, its input, its output) at the first call of layer ``name`` while ``model`` runs ``batch``."""
    got: list = []
    _first_calls(model, [name], batch, lambda n, m, x, y: got.append((m, x, y)))
    return got[0] if got else None


def _rows(n: int, cap: int, key: int) -> torch.Tensor | None:
    """The rows of a layer's call that enter its statistics (None: all); the same for both models' passes."""
    if n <= cap:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(key))[:cap]


class _Targets:
    """The original layers' outputs (kept channels, sampled rows) for every batch, from one pass of the
    original model, up to a memory budget; layers past it are computed again when their turn comes."""

    def __init__(self, original: nn.Module, layers: dict[str, _Stats], batches: list[Batch], cap: int,
                 seed: int, budget: int = TARGET_BYTES) -> None:
        self.original, self.layers, self.batches, self.cap, self.seed = original, layers, batches, cap, seed
        self.index = {n: i for i, n in enumerate(layers)}
        self.cache: dict[tuple[str, int], torch.Tensor] = {}
        self.left = budget
        self.uncached: set[str] = set()
        for j, b in enumerate(batches):
            _first_calls(original, list(layers), b, lambda n, m, x, y, j=j: self._keep(n, j, m, x, y))

    def _keep(self, name: str, j: int, m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        if name in self.uncached:
            return
        ys = self.rows_of(name, j, m, x, y)
        if ys.numel() * 4 > self.left:
            self.uncached.add(name)
            for k in [k for k in self.cache if k[0] == name]:
                self.left += self.cache.pop(k).numel() * 4
            return
        self.cache[name, j] = ys
        self.left -= ys.numel() * 4

    def key(self, name: str, j: int) -> int:
        return self.seed * 1_000_003 + self.index[name] * 10_007 + j

    def rows_of(self, name: str, j: int, m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ys = _output_rows(m, y)
        pick = _rows(ys.shape[0], self.cap, self.key(name, j))
        ys = ys if pick is None else ys[pick.to(ys.device)]
        return ys[:, self.layers[name].rows.to(ys.device)].float()

    def get(self, name: str, j: int) -> torch.Tensor | None:
        if name not in self.uncached:
            return self.cache.pop((name, j), None)
        got = _capture(self.original, name, self.batches[j])
        return None if got is None else self.rows_of(name, j, *got)


def _collect(pruned: nn.Module, name: str, st: _Stats, targets: _Targets, n_fit: int) -> None:
    """The statistics of layer ``name``: its input as the pruned model (refit up to it) computes it, against
    the original layer's output on the kept output channels, on the same rows."""
    for j, b in enumerate(targets.batches):
        ys = targets.get(name, j)
        got = None if ys is None else _capture(pruned, name, b)
        if got is None:
            continue
        m, x, _ = got
        xs = _input_rows(m, x)
        pick = _rows(xs.shape[0], targets.cap, targets.key(name, j))
        xs = xs if pick is None else xs[pick.to(xs.device)]
        if xs.shape[0] == ys.shape[0]:
            st.add(0 if j < n_fit else 1, xs.float(), ys)


def _solve(st: _Stats, w0: torch.Tensor) -> tuple[torch.Tensor | None, float, float]:
    """(best refit weights or None, held-out error of plain slicing, of the refit)."""
    if st.gram[0] is None or st.gram[1] is None:
        return None, float("nan"), float("nan")
    base = st.error(w0)
    g = st.gram[0]
    scale = float(g.diagonal().mean()) or 1.0
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    best, best_err = None, base
    for r in RIDGE:
        chol, info = torch.linalg.cholesky_ex(g + r * scale * eye)
        if int(info) != 0:  # not positive definite even with this ridge: a larger one may do
            continue
        w = torch.cholesky_solve(st.cross[0], chol)
        if not torch.isfinite(w).all():
            continue
        err = st.error(w)
        if err < best_err:
            best, best_err = w, err
    if best is not None and best_err > base * (1 - 1e-3):
        best, best_err = None, base
    return best, base, best_err


def _in_call_order(model: nn.Module, names: list[str], batch: Batch) -> list[str]:
    """``names`` in the order ``model`` first calls them on ``batch`` (never called: last, by name)."""
    seen: list[str] = []
    _first_calls(model, names, batch, lambda n, m, x, y: seen.append(n))
    return seen + sorted(set(names) - set(seen))


def _sliced_weights(pruned: nn.Module, st: _Stats) -> torch.Tensor:
    """The pruned layer's own weights as a regression solution (features x outputs, bias offset 0)."""
    w = pruned.weight.detach().reshape(pruned.weight.shape[0], -1).double().T
    if st.bias:
        w = torch.cat([w, w.new_zeros(1, w.shape[1])], dim=0)
    return w


def reconstruct_layers(pruned: nn.Module, original: nn.Module, keep: dict[str, dict[str, torch.Tensor]],
                       batches: list[Batch], *, skip: Callable[[str], Any] = lambda name: False,
                       force: bool = False, seed: int = 0) -> dict[str, Any]:
    """Refit, in ``pruned``, every reconstructable layer that lost input channels (``keep``: what each layer
    keeps, by name in both models). Needs two or more batches: the last is held out.

    Returns ``{"layers": {name: (held-out error before, after)}, "kept": bool, "error before": x,
    "error after": y}`` (layer errors relative to the original output's energy; model errors relative, on the
    held-out batch). ``force=True`` keeps the refit even where the whole model does not come closer.
    """
    done: dict[str, Any] = {"layers": {}, "kept": False, "error before": None, "error after": None}
    if len(batches) < 2:
        return done
    fit, judge = batches[:-1], batches[-1:]
    omods, pmods = dict(original.named_modules()), dict(pruned.named_modules())
    todo: dict[str, _Stats] = {}
    for name, k in keep.items():
        o, p = omods.get(name), pmods.get(name)
        if "in" not in k or o is None or p is None or skip(name) or not (reconstructable(o) and reconstructable(p)):
            continue
        if p.weight[0].numel() > MAX_FEATURES:
            continue
        todo[name] = _Stats(k.get("out", torch.arange(o.weight.shape[0])), o.bias is not None)
    if not todo:
        return done
    old = {n: (pmods[n].weight.detach().clone(), None if pmods[n].bias is None else pmods[n].bias.detach().clone())
           for n in todo}
    with evaluating(original, pruned):
        reference = outputs(original, judge)
        before = compare_outputs(reference, outputs(pruned, judge)).rel_err
        try:
            after = _refit(original, pruned, todo, pmods, fit, judge, seed, done["layers"], reference)
        except Exception as e:  # noqa: BLE001 - a model the refit cannot run on keeps its sliced weights
            done["failed"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            after = float("inf")
    kept = "failed" not in done and bool(done["layers"]) and (force or after < before)
    done.update({"error before": before, "error after": after, "kept": kept})
    if not kept:   # a failure part-way keeps no partial refit, even when forced
        with torch.no_grad():
            for n, (w, b) in old.items():
                pmods[n].weight.copy_(w)
                if b is not None:
                    pmods[n].bias.copy_(b)
        done["layers"] = {}
    return done


def _refit(original: nn.Module, pruned: nn.Module, todo: dict[str, _Stats], pmods: dict[str, nn.Module],
           fit: list[Batch], judge: list[Batch], seed: int, errors: dict, reference: list) -> float:
    """Refit the layers of ``todo`` in call order (writing their per-layer errors into ``errors``); returns
    the pruned model's output error on ``judge`` afterwards."""
    order = _in_call_order(original, list(todo), fit[0])   # each layer sees the ones before it refit
    cap = max(1, min(MAX_ROWS, -(-MAX_FIT_ROWS // len(fit))))
    targets = _Targets(original, {n: todo[n] for n in order}, fit + judge, cap, seed)
    for n in tqdm(order, desc="refit pruned layers", unit="layer", disable=None, leave=False):
        st, p = todo.pop(n), pmods[n]
        _collect(pruned, n, st, targets, len(fit))
        w, e0, e1 = _solve(st, _sliced_weights(p, st))
        if w is not None:
            with torch.no_grad():
                wt = w[:-1] if st.bias else w
                p.weight.copy_(wt.T.reshape(p.weight.shape).to(p.weight.dtype))
                if st.bias:
                    p.bias.add_(w[-1].to(p.bias.dtype))
            energy = st.norm[1] or 1.0
            errors[n] = (e0 / energy, e1 / energy)
    return compare_outputs(reference, outputs(pruned, judge)).rel_err
