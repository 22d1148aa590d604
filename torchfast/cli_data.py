"""Unlabeled inputs from files for the command line: ``--calibration PATH``.

What most users have is data without labels: a folder of images, a text file of sentences, or tensors
saved from their own pipeline. Each becomes batches shaped like the example batch of the model's
source (``torchfast.cli_models.Source``), preprocessed the way that source's model expects (its image
size, channels and normalization; its tokenizer), so calibration, data-aware factorization, fidelity
checks and distillation all run on real inputs.

- a folder: every image file in it (sorted by name), converted to the example's channels (1: grayscale,
  3: RGB), resized to its height x width, scaled to [0, 1] and normalized with the source's mean/std;
- ``.txt``: one sentence per non-empty line, tokenized by the source's tokenizer (``hf:`` / ``zoo:minilm``);
- ``.pt`` (loaded with ``weights_only=True``) / ``.npy`` (``allow_pickle=False``): a tensor of samples
  ``[N, ...]`` or of batches ``[B, N, ...]``, a list of batches, or a dict of keyword tensors ``[N, ...]``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from .modules import describe_batch

if TYPE_CHECKING:
    from .cli_models import Source

__all__ = ["ImagePrep", "load_data", "IMAGE_EXTENSIONS", "DATA_HELP"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
DATA_HELP = ("a folder of images, a .txt file of sentences (one per line) or a .pt/.npy file of input tensors")


@dataclass(frozen=True)
class ImagePrep:
    """How a source's model wants its images: per-channel mean and std after scaling pixels to [0, 1]."""
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)


def _error(msg: str) -> Exception:
    from .cli_models import SourceError
    return SourceError(f"--calibration {msg}")


def _batches(samples: Any, rows: int, count: int) -> list[Any]:
    """Split ``samples`` (a tensor or a dict of tensors, first dim = samples) into batches of ``rows``."""
    if isinstance(samples, dict):
        return [{k: v[i:i + rows] for k, v in samples.items()} for i in range(0, count, rows)]
    return [samples[i:i + rows] for i in range(0, count, rows)]


def _rows(example: Any) -> int:
    from .backends.inputs import batch_size_of
    return batch_size_of(example)


def _images(path: str, source: "Source") -> list[Any]:
    ex = source.example
    if not (isinstance(ex, torch.Tensor) and ex.dim() == 4 and ex.is_floating_point()):
        raise _error(f"{path}: a folder of images needs a model taking one image batch [N, C, H, W]; "
                     f"this one takes {describe_batch(ex)}")
    files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise _error(f"{path}: no image files in the folder (looked for {', '.join(IMAGE_EXTENSIONS)})")
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - torchvision brings Pillow
        raise _error(f"{path}: reading images needs Pillow: pip install pillow") from e
    _, c, h, w = ex.shape
    if c not in (1, 3):
        raise _error(f"{path}: images become 1 (grayscale) or 3 (RGB) channels; the model takes {c}")
    prep = source.image_prep or ImagePrep()
    mean = torch.tensor(prep.mean if len(prep.mean) == c else prep.mean[:1] * c).view(c, 1, 1)
    std = torch.tensor(prep.std if len(prep.std) == c else prep.std[:1] * c).view(c, 1, 1)
    out = []
    for f in files:
        try:
            with Image.open(os.path.join(path, f)) as im:
                im = im.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
                data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        except Exception as e:  # noqa: BLE001 - a broken file is named
            raise _error(f"{os.path.join(path, f)}: not a readable image ({type(e).__name__}: {e})") from e
        x = data.view(h, w, c).permute(2, 0, 1).float() / 255.0
        out.append(((x - mean) / std).to(ex.dtype))
    return _batches(torch.stack(out), _rows(ex), len(out))


def _sentences(path: str, source: "Source") -> list[Any]:
    if source.tokenize is None:
        raise _error(f"{path}: sentences need the model's tokenizer; only hf: and zoo:minilm models have one "
                     f"(for another model, save token tensors to a .pt file)")
    with open(path, encoding="utf-8") as fh:
        lines = [s.strip() for s in fh if s.strip()]
    if not lines:
        raise _error(f"{path}: no sentences (one per non-empty line)")
    rows = _rows(source.example)
    return [source.tokenize(lines[i:i + rows]) for i in range(0, len(lines), rows)]


def _per_sample(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return tuple(x.shape[1:])
    if isinstance(x, dict):
        return {k: _per_sample(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return tuple(_per_sample(v) for v in x)
    return type(x).__name__


def _cast(batch: Any, like: Any) -> Any:
    """Floats to the example's float dtype; integers (token ids, masks) as they are."""
    if isinstance(batch, torch.Tensor) and isinstance(like, torch.Tensor):
        return batch.to(like.dtype) if batch.is_floating_point() and like.is_floating_point() else batch
    if isinstance(batch, dict) and isinstance(like, dict):
        return {k: _cast(v, like.get(k)) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)) and isinstance(like, (tuple, list)):
        return type(batch)(_cast(b, l) for b, l in zip(batch, like))
    return batch


def _tensors(obj: Any, path: str, source: "Source") -> list[Any]:
    import numpy as np
    ex = source.example
    if isinstance(obj, np.ndarray):
        obj = torch.from_numpy(np.ascontiguousarray(obj))
    rows = _rows(ex)
    if isinstance(obj, torch.Tensor) and isinstance(ex, torch.Tensor):
        if obj.dim() == ex.dim() and obj.shape[1:] == ex.shape[1:]:
            batches = _batches(obj, rows, obj.shape[0])
        elif obj.dim() == ex.dim() + 1 and obj.shape[2:] == ex.shape[1:]:
            batches = list(obj)
        else:
            raise _error(f"{path}: a tensor of shape {tuple(obj.shape)} is neither samples [N, "
                         f"{', '.join(map(str, ex.shape[1:]))}] nor batches of them, as the model takes "
                         f"({describe_batch(ex)})")
    elif isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()) and obj:
        n = {v.shape[0] for v in obj.values()}
        if len(n) != 1:
            raise _error(f"{path}: the tensors of the dict differ in their first (sample) dimension: {sorted(n)}")
        batches = _batches(obj, rows, n.pop())
    elif isinstance(obj, (list, tuple)) and obj:
        batches = list(obj)
    else:
        raise _error(f"{path}: holds {type(obj).__name__}; expected input tensors ({DATA_HELP})")
    for i, b in enumerate(batches):
        if _per_sample(b) != _per_sample(ex):
            raise _error(f"{path}: batch {i} ({describe_batch(b) if not isinstance(b, str) else 'text'}) does not "
                         f"match the model's inputs ({describe_batch(ex)}) beyond the batch dimension")
    return [_cast(b, ex) for b in batches]


def load_data(path: str, source: "Source") -> list[Any]:
    """The unlabeled batches in ``path`` for ``source``'s model (see the module docstring)."""
    if not os.path.exists(path):
        raise _error(f"{path!r}: no such file or folder; give a number of batches or {DATA_HELP}")
    if os.path.isdir(path):
        return _images(path, source)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".txt":
        return _sentences(path, source)
    if ext in (".pt", ".pth"):
        try:
            obj = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as e:  # noqa: BLE001
            raise _error(f"{path}: cannot be read as tensors ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
        return _tensors(obj, path, source)
    if ext == ".npy":
        import numpy as np
        try:
            obj = np.load(path, allow_pickle=False)
        except Exception as e:  # noqa: BLE001
            raise _error(f"{path}: cannot be read as an array ({type(e).__name__}: {e})") from e
        return _tensors(obj, path, source)
    raise _error(f"{path}: unknown kind of data file {ext!r}; give {DATA_HELP}")


def tokenizer_fn(tokenizer: Any, seq_len: int, keys: Any = None) -> Callable[[list[str]], dict]:
    """Sentences -> the keyword batch the source's example is (its keys, padded to its sequence length).
    ``tokenizer``: a Hugging Face tokenizer, or a callable returning one (loaded on first use)."""
    def tokenize(texts: list[str]) -> dict:
        tok = tokenizer if hasattr(tokenizer, "pad") or not callable(tokenizer) else tokenizer()
        out = dict(tok(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt"))
        return {k: v for k, v in out.items() if keys is None or k in keys}
    return tokenize
