"""Upstream deprecation warnings (TorchScript, torch.ao.quantization) said once, in our words."""
from __future__ import annotations

import contextlib
import warnings

_said: set[str] = set()


@contextlib.contextmanager
def quiet_deprecations(topic: str, message: str):
    """Silence upstream deprecation chatter inside the block; emit ``message`` once per process instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*(TorchScript|torch.jit|deprecated).*")
        yield
    if topic not in _said:
        _said.add(topic)
        warnings.warn(message, UserWarning, stacklevel=3)
