"""Keep users' output clean: PyTorch's AO APIs warn on every call; torchfast says it once, in its own words.

``torch.ao.quantization`` is deprecated upstream in favour of torchao, but its x86/fbgemm eager and FX
kernels are still the fastest int8 CPU path measured here. torchfast's configs do not depend on which
PyTorch API implements a scheme, so when the implementation moves users' code does not.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator

__all__ = ["QuantBackendNotice", "quiet", "import_torchao"]


class QuantBackendNotice(UserWarning):
    """One-time notice that a scheme runs on an API PyTorch has deprecated."""


_SAID: set[str] = set()
_REWORDED = {
    "torch.ao": ("torchfast: this scheme runs on torch.ao.quantization (x86/fbgemm int8 kernels), which PyTorch "
                 "has deprecated in favour of torchao; torchfast's configs stay the same when the implementation "
                 "moves. (shown once)"),
    "torchscript": ("torchfast: TorchScript is in maintenance mode upstream; it remains the loadable-without-"
                    "torchfast format for eager int8 models. (shown once)"),
}
_PATTERNS = ("deprecated", "will be removed", "torch.ao.quantization", "maintenance mode", "torchscript",
             "torch.jit", "is an enum subclass", "please migrate")


@contextlib.contextmanager
def quiet(api: str = "torch.ao") -> Iterator[None]:
    """Swallow deprecation chatter from ``api`` inside the block; re-word it once per process.

    Warnings that do not look like deprecation chatter are re-emitted unchanged, so real problems
    (an observer that never saw data, a trace that specialised on a value) still reach the user.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    said_deprecation = False
    for w in caught:
        text = str(w.message).lower()
        if issubclass(w.category, (DeprecationWarning, FutureWarning)) or any(p in text for p in _PATTERNS):
            said_deprecation = True
            continue
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if said_deprecation and api not in _SAID and api in _REWORDED:
        _SAID.add(api)
        warnings.warn_explicit(_REWORDED[api], QuantBackendNotice, "torchfast", 0)


def import_torchao():
    """Import torchao without the registration chatter it logs through torch's pytree logger."""
    loggers = [logging.getLogger(n) for n in ("torch.utils._pytree", "torchao")]
    old = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                import torchao  # noqa: F401
                import torchao.quantization  # noqa: F401
            except ImportError as e:
                raise ImportError("this scheme needs torchao: pip install 'torchfast[quant]'") from e
    finally:
        for lg, lv in zip(loggers, old):
            lg.setLevel(lv)
    return torchao
