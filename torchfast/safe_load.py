"""Check a model file before torch reads it, so that a default ``torchfast.load`` runs nothing from the file.

What torch 2.14 runs while loading, and what is done about it here:

ExportedProgram (``.pt2``, ``torch.export.load``; torch/export/pt2_archive/_package.py, _export/serde):

- ``data/sample_inputs/<model>.pt``, legacy ``data/weights/<model>.pt`` / ``data/constants/<model>.pt`` and
  the 2.7 format's ``serialized_*.pt`` (read when the current format fails with a RuntimeError):
  ``torch.load(weights_only=True)``, *falling back to a full unpickle* when that fails.
- weights and tensor constants marked ``use_pickle`` in ``*_config.json``: ``torch.load(weights_only=False)``.
- ``data/constants/opaque_obj_*``: ``pickle.loads``.
- ``data/aotinductor/``: compiled shared libraries, loaded (dlopen) by AOTIModelPackageLoader.
- ``models/<model>.json``: strings that become Python source (see :mod:`torchfast.safe_program`).

Every pickle above must load with torch's own weights-only unpickler (``torch._weights_only_unpickler``:
tensors, containers, primitives and the globals ``torch.serialization.add_safe_globals`` admits) — torch then
takes its weights-only path, or unpickles bytes that admit nothing more; native code is refused; the JSON is
checked. ``data/constants/custom_obj_*`` (torchbind objects, e.g. TensorRT engines) go through TorchScript's
C++ unpickler, which only rebuilds classes registered in this process: allowed.

TorchScript (``.pt``, ``torch.jit.load``): ``data.pkl`` / ``constants.pkl`` are read by the C++ unpickler,
which resolves a fixed set of torch names and the archive's own TorchScript classes, never a Python global
(torch/csrc/jit/serialization/unpickler.cpp, ``readGlobal``). ``code/`` is TorchScript, compiled, not
Python; but a TorchScript ``__setstate__`` runs during loading and can call any torch op (``torch.from_file``
creates files), so an archive whose code defines one is refused.

``torch.save`` / pre-zip legacy files: ``torch.load(weights_only=True)`` is the check.

The file is read once and torch is given those bytes, so what was checked is what is loaded.
"""
from __future__ import annotations

import io
import os
import re
import zipfile
from typing import Any

from .safe_program import ProgramCheckError, check_example_inputs, check_program
from .errors import TorchfastError

__all__ = ["UnsafeArtifactError", "check_archive", "open_zip", "load_tensors"]


class UnsafeArtifactError(TorchfastError, RuntimeError):
    """A part of a model file that loading would run, refused because ``allow_pickle`` is False."""

    def __init__(self, path: Any, member: str, why: str):
        self.path, self.member, self.why = str(path), member, why
        super().__init__(f"{path}: refusing to load {member!r}: {why}. Loading it could run code from the file: "
                         f"pass allow_pickle=True only for files you trust.")


def open_zip(path: Any, data: bytes, strict: bool = True) -> zipfile.ZipFile | None:
    """The zip in ``data`` (None if it is not one). ``strict``: member names that two zip readers could see
    differently (duplicates, NUL bytes) are refused, since torch's reader is not Python's."""
    if not zipfile.is_zipfile(io.BytesIO(data)):
        return None
    zf = zipfile.ZipFile(io.BytesIO(data))
    seen: set[str] = set()
    for info in zf.infolist() if strict else ():
        if info.orig_filename != info.filename or info.filename in seen:
            raise UnsafeArtifactError(path, info.orig_filename, "a duplicate or NUL-containing member name "
                                                                "(torch could read a different member than checked)")
        seen.add(info.filename)
    return zf


def check_archive(path: Any, zf: zipfile.ZipFile, kind: str) -> None:
    """Raise :class:`UnsafeArtifactError` for the first part of a TorchScript/ExportedProgram zip that loading
    would run."""
    if kind == "exported_program":
        _check_exported_program(path, zf)
    elif kind == "torchscript":
        for name in zf.namelist():
            if _leaf(name).startswith("code/") and b"__setstate__" in zf.read(name):
                raise UnsafeArtifactError(path, name, "its TorchScript defines __setstate__, which torch.jit.load "
                                                      "runs while loading (TorchScript can call any torch op, "
                                                      "e.g. torch.from_file, which creates files; torch.jit.freeze "
                                                      "leaves none)")
            leaf = _leaf(name)
            if leaf in ("data.pkl", "constants.pkl") or leaf.startswith("code/") and leaf.endswith(".debug_pkl"):
                _check_torchscript_pickle(path, name, zf.read(name))


# What TorchScript's C++ unpickler resolves itself (unpickler.cpp readGlobal); __torch__.* are the
# archive's TorchScript classes and torchbind classes. Anything else it refuses, so it is refused here first,
# with a clear message.
_TS_MODULES = {"__main__", "torch", "torch._utils", "torch._tensor", "torch.jit._pickle", "builtins",
               "collections", "torch.distributed.rpc"}


def _check_torchscript_pickle(path: Any, name: str, data: bytes) -> None:
    import pickletools
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                module = str(arg).split(" ", 1)[0]
                if module not in _TS_MODULES and module.split(".", 1)[0] != "__torch__":
                    raise UnsafeArtifactError(path, name, f"it names the Python global {arg!r}, which is no "
                                                          f"TorchScript class")
            elif op.name in ("STACK_GLOBAL", "INST", "OBJ", "EXT1", "EXT2", "EXT4"):
                raise UnsafeArtifactError(path, name, f"it uses the pickle opcode {op.name}, which TorchScript "
                                                      f"archives do not")
    except UnsafeArtifactError:
        raise
    except Exception as e:  # truncated or not a pickle at all
        raise UnsafeArtifactError(path, name, f"it is not a readable pickle ({type(e).__name__}: {e})"[:300]) from None


def load_tensors(path: Any, data: bytes, zf: zipfile.ZipFile | None, map_location: Any = None) -> Any:
    """``torch.load(weights_only=True)``, its refusal reported as the pickle member and the global it needed."""
    member = next((n for n in zf.namelist() if _leaf(n) == "data.pkl"), "data.pkl") if zf else "pickle stream"
    return _weights_only(path, member, data, map_location, "it holds Python objects beyond tensors")


def _leaf(name: str) -> str:
    """The name inside the archive's root folder (torch's readers strip it)."""
    return name.split("/", 1)[1] if "/" in name else name


def _reason(e: Exception) -> str:
    msg = str(e)
    m = re.search(r"WeightsUnpickler error: (.*?)(?:\.\s|\n|$)", msg)
    return (m.group(1) if m else msg.strip().splitlines()[0] if msg.strip() else type(e).__name__)[:240]


def _weights_only(path: Any, member: str, data: bytes, map_location: Any = None,
                  why: str = "it needs a full unpickle") -> Any:
    import torch
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as e:  # torch's refusal, or bytes that are no torch.save file at all
        raise UnsafeArtifactError(path, member, f"{why} ({_reason(e)})") from None


def _restricted_pickle(path: Any, member: str, data: bytes) -> None:
    """A raw pickle that torch gives to ``pickle.loads``: admitted only if the weights-only unpickler takes it."""
    import warnings
    from torch import _weights_only_unpickler
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # its note on pickle protocols newer than 2
            _weights_only_unpickler.Unpickler(io.BytesIO(data), encoding="utf-8").load()
    except Exception as e:
        named = _globals_named(data)
        why = f"it names {', '.join(named[:3])}" if named else _reason(e)
        raise UnsafeArtifactError(path, member, f"torch would pickle.loads this opaque object ({why})") from None


def _globals_named(data: bytes) -> list[str]:
    """The globals a pickle imports, for the error message (GLOBAL, and STACK_GLOBAL's two pushed strings)."""
    import pickletools
    found, strings = [], []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:
        pass
    return found


def _check_exported_program(path: Any, zf: zipfile.ZipFile) -> None:
    import json
    from torch.export.pt2_archive import constants as C
    names = zf.namelist()
    pickled: set[str] = set()
    inert: set[str] = set()       # raw tensor bytes and torchbind objects, as their configs declare them
    models = {_leaf(n)[len(C.MODELS_DIR):].rsplit(".", 1)[0] for n in names if _leaf(n).startswith(C.MODELS_DIR)}
    for name in names:
        leaf = _leaf(name)
        if leaf.startswith(C.AOTINDUCTOR_DIR):
            raise UnsafeArtifactError(path, name, "it is AOTInductor-compiled native code (a shared library "
                                                  "that loading would dlopen)")
        if leaf.startswith(C.MODELS_DIR) or leaf == "serialized_exported_program.json":
            try:
                check_program(json.loads(zf.read(name)))
            except ProgramCheckError as e:
                raise UnsafeArtifactError(path, name, f"{e.field} would become Python code: {e.why}") from None
            except (ValueError, RecursionError):
                raise UnsafeArtifactError(path, name, "it is not the JSON torch.export.save writes") from None
        elif leaf.startswith((C.WEIGHTS_DIR, C.CONSTANTS_DIR)) and leaf.endswith("_config.json"):
            base = C.WEIGHTS_DIR if leaf.startswith(C.WEIGHTS_DIR) else C.CONSTANTS_DIR
            root = name[: len(name) - len(leaf)]
            try:
                entries = json.loads(zf.read(name))["config"].values()
                refs = [(str(e["path_name"]), bool(e.get("use_pickle"))) for e in entries]
            except (ValueError, KeyError, TypeError, AttributeError):
                raise UnsafeArtifactError(path, name, "it is not the payload config torch.export.save writes") from None
            for ref, use_pickle in refs:
                if not re.fullmatch(r"[A-Za-z0-9_.]+", ref) or ".." in ref:
                    raise UnsafeArtifactError(path, name, f"payload path {ref[:80]!r} leaves its folder")
                member = root + os.path.join(base, ref)
                if base == C.CONSTANTS_DIR and ref.startswith(C.OPAQUE_OBJ_FILENAME_PREFIX) and member in names:
                    _restricted_pickle(path, member, zf.read(member))
                    inert.add(member)
                elif use_pickle and not (base == C.CONSTANTS_DIR and ref.startswith(C.CUSTOM_OBJ_FILENAME_PREFIX)):
                    pickled.add(member)
                else:
                    inert.add(member)
    legacy = {f"{d}{m}.pt" for d in (C.WEIGHTS_DIR, C.CONSTANTS_DIR) for m in models}
    for name in names:   # whatever else torch may hand to torch.load: checked as a pickle
        leaf = _leaf(name)
        if leaf in legacy or leaf.startswith(C.SAMPLE_INPUTS_DIR) or (
                leaf.startswith("serialized_") and leaf != "serialized_exported_program.json") or (
                leaf.startswith((C.WEIGHTS_DIR, C.CONSTANTS_DIR)) and not leaf.endswith("_config.json")
                and name not in inert):
            pickled.add(name)
    for member in sorted(pickled & set(names)):
        obj = _weights_only(path, member, zf.read(member), "cpu")
        if _leaf(member).startswith((C.SAMPLE_INPUTS_DIR, "serialized_example_inputs")):
            try:
                check_example_inputs(obj)
            except ProgramCheckError as e:
                raise UnsafeArtifactError(path, member, f"{e.field} would become Python code: {e.why}") from None
