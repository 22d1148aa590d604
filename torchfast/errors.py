"""The one base class of every error torchfast raises on purpose, so callers can tell "torchfast refused,
and said why" (``except torchfast.TorchfastError``) from a bug."""
from __future__ import annotations

__all__ = ["TorchfastError"]


class TorchfastError(Exception):
    """Raised by torchfast with a message naming the module, input, value or setting at fault."""
