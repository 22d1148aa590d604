"""What distillation matches and how: the tensors of a model output, the loss of each, and layer taps.

A classifier's logits, a pooled embedding and a sequence of hidden states each need their own loss
(softmax KL ignores a shift of the logits, cosine ignores scale, raw MSE depends on it), chosen from the
teacher's output, so ``distill(loss="auto")`` works on plain tensors, dicts and Hugging Face outputs alike.
"""
from __future__ import annotations

import difflib
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import TorchfastError
from .modules import first_tensor

__all__ = ["DistillError", "LOSSES", "targets", "loss_kind", "pair_loss", "token_mask", "Taps", "feature_pairs"]

LOSSES = ("auto", "kl", "kl+mse", "mse", "cosine", "cosine+mse")
# outputs that are embeddings / hidden states even when they are [batch, dim] like logits
_EMBEDDING_NAMES = ("last_hidden_state", "pooler_output", "pooled_output", "embeddings", "sentence_embedding",
                    "text_embeds", "image_embeds", "hidden_states")


class DistillError(TorchfastError, ValueError):
    """distill() cannot run as asked; the message names the argument, batch, layer or shape at fault."""


def _float_tensors(prefix: str, v: Any, out: dict[str, torch.Tensor]) -> None:
    if isinstance(v, torch.Tensor):
        if v.is_floating_point():
            out[prefix] = v
    elif isinstance(v, Mapping):
        for k, x in v.items():
            _float_tensors(f"{prefix}.{k}" if prefix else str(k), x, out)
    elif isinstance(v, (tuple, list)):
        for i, x in enumerate(v):
            _float_tensors(f"{prefix}.{i}" if prefix else str(i), x, out)


def targets(out: Any, output_fn: Callable[[Any], torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The tensors of a model output that the student must reproduce, by name."""
    if output_fn is not None:
        t = output_fn(out)
        if not isinstance(t, torch.Tensor):
            raise DistillError(f"output_fn returned a {type(t).__name__}, not a tensor")
        return {"output": t}
    if isinstance(out, torch.Tensor):
        return {"output": out}
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return {"logits": logits}
    found: dict[str, torch.Tensor] = {}
    if isinstance(out, (Mapping, tuple, list)):
        _float_tensors("", out, found)
    else:
        for name in _EMBEDDING_NAMES:
            _float_tensors(name, getattr(out, name, None), found)
    if not found:
        raise DistillError(f"the teacher's output ({type(out).__name__}) holds no floating-point tensor to match; "
                           f"pass output_fn=... to pick one, or loss=callable(student_out, teacher_out)")
    return found


def loss_kind(name: str, t: torch.Tensor, loss: str) -> str:
    """The loss for output ``name`` (teacher tensor ``t``) under ``loss="auto"``, else ``loss`` itself."""
    if loss != "auto":
        return loss
    if name == "logits":
        return "kl+mse"
    if t.dim() <= 1 or (t.dim() == 2 and t.shape[1] == 1):  # one value per sample: a regression
        return "mse"
    if t.dim() == 2 and t.shape[1] > 1 and name.split(".")[-1] not in _EMBEDDING_NAMES:
        norms = t.detach().float().norm(dim=1)
        if not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):  # unit rows: a normalized embedding
            return "kl+mse"
    return "cosine+mse"


def _cosine(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean cosine per sample ([batch, dim]), per token ([batch, seq, dim]), per flattened sample otherwise."""
    if s.dim() <= 1:
        s, t = s.reshape(1, -1), t.reshape(1, -1)
    elif s.dim() > 3:
        s, t = s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1)
    return F.cosine_similarity(s, t, dim=-1, eps=1e-8).mean()


def token_mask(batch: Any) -> torch.Tensor | None:
    """A dict batch's ``attention_mask`` ([batch, seq]): padding positions carry no meaning to match."""
    m = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return m if isinstance(m, torch.Tensor) and m.dim() == 2 else None


def pair_loss(kind: str, s: torch.Tensor, t: torch.Tensor, temperature: float,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Student tensor ``s`` against teacher tensor ``t``; every kind is 0 for a perfect match. A per-token
    output ([batch, seq, ...]) is compared on the tokens ``mask`` keeps only."""
    if mask is not None and s.dim() >= 3 and tuple(mask.shape) == tuple(s.shape[:2]) and mask.any():
        keep = mask.to(s.device).bool()
        s, t = s[keep], t[keep]
    s, t = s.float(), t.float()
    mse = F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-12)  # scale-free: 1.0 is "predicts zeros"
    if kind in ("kl", "kl+mse"):
        c = s.shape[-1]
        ls, lt = F.log_softmax(s.reshape(-1, c) / temperature, -1), F.log_softmax(t.reshape(-1, c) / temperature, -1)
        kl = F.kl_div(ls, lt, log_target=True, reduction="batchmean") * temperature ** 2
        # softmax ignores a shift of all logits; the MSE term keeps the logits themselves close (cosine, max error)
        return kl if kind == "kl" else kl + mse
    if kind == "mse":
        return mse
    cos = 1.0 - _cosine(s, t)
    return cos if kind == "cosine" else cos + mse


class Taps:
    """Forward hooks that keep the first output of each named layer during one call."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.seen: dict[str, torch.Tensor] = {}
        self._hooks = []
        for n in names:
            def hook(m, a, o, _n=n):
                if _n not in self.seen and not torch.is_inference_mode_enabled():
                    self.seen[_n] = first_tensor(o)
            self._hooks.append(model.get_submodule(n).register_forward_hook(hook))

    def take(self) -> dict[str, torch.Tensor]:
        seen, self.seen = self.seen, {}
        return seen

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


def feature_pairs(features: Any, student: nn.Module, teacher: nn.Module) -> list[tuple[str, str]]:
    """``[(student layer, teacher layer)]`` from names or a mapping, each checked to exist."""
    if features is None:
        return []
    if isinstance(features, str):
        raise DistillError(f"features must be a list of layer names or a dict {{student layer: teacher layer}}, "
                           f"got the string {features!r}; write features=[{features!r}]")
    pairs = list(features.items()) if isinstance(features, Mapping) else [(n, n) for n in features]
    for s_name, t_name in pairs:
        for model, name, who in ((student, s_name, "student"), (teacher, t_name, "teacher")):
            if not isinstance(name, str):
                raise DistillError(f"feature layer names must be strings, got {name!r}")
            names = [n for n, _ in model.named_modules() if n]
            if name not in names:
                close = difflib.get_close_matches(name, names, n=3)
                raise DistillError(f"the {who} ({type(model).__name__}) has no layer {name!r}"
                                   + (f"; did you mean {', '.join(map(repr, close))}?" if close else ""))
    return pairs
