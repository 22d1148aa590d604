"""Refit the layers that lost input channels so they reproduce the original layer's output (least squares).

When a layer's input channels are removed, what they contributed is gone; but channels are correlated, and
the kept ones can usually stand in for much of it. For each such Conv2d / Linear the new weights solve a
ridge regression from the kept input channels (as the original model computes them on unlabeled batches)
to the original layer's output on its kept output channels: the reconstruction step of channel pruning
(He, Zhang & Sun, "Channel Pruning for Accelerating Very Deep Neural Networks", ICCV 2017; Luo et al.,
ThiNet, ICCV 2017). It costs one forward pass of the original model plus one solve per layer, no training.

Statistics are sufficient: every layer keeps only its Gram matrix X'X, the cross term X'Y and ||Y||^2, for
the fitting batches and for a held-out one. The ridge strength is picked per layer on the held-out batch,
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

from ..measure import compare_outputs, outputs
from ..modules import Batch, call_model, evaluating

__all__ = ["reconstructable", "reconstruct_layers"]

RIDGE = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)   # times the mean diagonal of the Gram matrix
MAX_ROWS = 8192                          # rows (positions x images) sampled per layer per batch
MAX_STATS_BYTES = 1 << 30                # statistics held at once; more layers take more passes


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
    cols: torch.Tensor           # columns of the unfolded input the pruned layer keeps
    rows: torch.Tensor           # output channels it keeps
    bias: bool
    gram: list = field(default_factory=lambda: [None, None])
    cross: list = field(default_factory=lambda: [None, None])
    norm: list = field(default_factory=lambda: [0.0, 0.0])

    def add(self, part: int, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.double()
        if self.bias:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        y = y.double()
        g, c = x.T @ x, x.T @ y
        self.gram[part] = g if self.gram[part] is None else self.gram[part] + g
        self.cross[part] = c if self.cross[part] is None else self.cross[part] + c
        self.norm[part] += float(y.pow(2).sum())

    def error(self, w: torch.Tensor, part: int = 1) -> float:
        """||X w - Y||^2 on ``part`` from the statistics (w: features x outputs)."""
        g, c = self.gram[part], self.cross[part]
        return float((w * (g @ w)).sum() - 2 * (w * c).sum()) + self.norm[part]

    def nbytes(self) -> int:
        d = len(self.cols) + int(self.bias)
        return 2 * 8 * (d * d + d * len(self.rows))


def _columns(m: nn.Module, keep_in: torch.Tensor) -> torch.Tensor:
    if isinstance(m, nn.Conv2d):
        kk = m.kernel_size[0] * m.kernel_size[1]
        return (keep_in[:, None] * kk + torch.arange(kk)[None, :]).reshape(-1)
    return keep_in


def _design(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs as rows of features, outputs as rows without the bias) for one call of ``m``."""
    if isinstance(m, nn.Conv2d):
        if x.dim() == 3:
            x, y = x[None], y[None]
        cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
        xs = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        ys = y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])
    else:
        xs, ys = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    if m.bias is not None:
        ys = ys - m.bias.detach()
    return xs, ys


def _collect(original: nn.Module, layers: dict[str, _Stats], fit: list[Batch], judge: list[Batch],
             gen: torch.Generator) -> None:
    mods = dict(original.named_modules())
    part = [0]

    def hook(name: str) -> Callable:
        st = layers[name]

        def run(m, args, out):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor):
                return
            xs, ys = _design(m, x.detach(), out.detach())
            if xs.shape[0] > MAX_ROWS:
                pick = torch.randperm(xs.shape[0], generator=gen)[:MAX_ROWS]
                xs, ys = xs[pick], ys[pick]
            st.add(part[0], xs[:, st.cols].float(), ys[:, st.rows].float())
        return run

    handles = [mods[n].register_forward_hook(hook(n)) for n in layers]
    try:
        with torch.no_grad():
            for part[0], batches in ((0, fit), (1, judge)):
                for b in batches:
                    call_model(original, b)
    finally:
        for h in handles:
            h.remove()


def _solve(st: _Stats, w0: torch.Tensor) -> tuple[torch.Tensor | None, float, float]:
    """(best refit weights or None, held-out error of plain slicing, of the refit)."""
    if st.gram[0] is None or st.gram[1] is None:
        return None, float("nan"), float("nan")
    base = st.error(w0)
    g = st.gram[0]
    scale = float(g.diagonal().mean()) or 1.0
    eye = torch.eye(g.shape[0], dtype=g.dtype)
    best, best_err = None, base
    for r in RIDGE:
        try:
            w = torch.linalg.solve(g + r * scale * eye, st.cross[0])
        except RuntimeError:  # singular even with the ridge: a larger one may still do
            continue
        if not torch.isfinite(w).all():
            continue
        err = st.error(w)
        if err < best_err:
            best, best_err = w, err
    if best is not None and best_err > base * (1 - 1e-3):
        best, best_err = None, base
    return best, base, best_err


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
    for name, k in sorted(keep.items()):
        o, p = omods.get(name), pmods.get(name)
        if "in" not in k or o is None or p is None or skip(name) or not (reconstructable(o) and reconstructable(p)):
            continue
        rows = k.get("out", torch.arange(o.weight.shape[0]))
        todo[name] = _Stats(_columns(o, k["in"]), rows, o.bias is not None)
    if not todo:
        return done
    gen = torch.Generator().manual_seed(seed)
    old = {n: (pmods[n].weight.detach().clone(), None if pmods[n].bias is None else pmods[n].bias.detach().clone())
           for n in todo}
    with evaluating(original, pruned):
        reference = outputs(original, judge)
        before = compare_outputs(reference, outputs(pruned, judge)).rel_err
        names = list(todo)
        while names:   # as many layers per pass as the statistics' memory allows
            chunk, used = [], 0
            while names and (not chunk or used + todo[names[0]].nbytes() <= MAX_STATS_BYTES):
                used += todo[names[0]].nbytes()
                chunk.append(names.pop(0))
            _collect(original, {n: todo[n] for n in chunk}, fit, judge, gen)
            for n in chunk:
                st, p = todo.pop(n), pmods[n]
                w, e0, e1 = _solve(st, _sliced_weights(p, st))
                energy = st.norm[1] or 1.0
                if w is not None:
                    with torch.no_grad():
                        wt = w[:len(st.cols)] if st.bias else w
                        p.weight.copy_(wt.T.reshape(p.weight.shape).to(p.weight.dtype))
                        if st.bias:
                            p.bias.add_(w[-1].to(p.bias.dtype))
                    done["layers"][n] = (e0 / energy, e1 / energy)
        after = compare_outputs(reference, outputs(pruned, judge)).rel_err
    done.update({"error before": before, "error after": after, "kept": bool(done["layers"]) and (force or after < before)})
    if not done["kept"]:
        with torch.no_grad():
            for n, (w, b) in old.items():
                pmods[n].weight.copy_(w)
                if b is not None:
                    pmods[n].bias.copy_(b)
        done["layers"] = {} if not force else done["layers"]
    return done
