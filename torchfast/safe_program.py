"""Check an ExportedProgram's JSON before torch deserializes it: its strings reach Python code.

In torch 2.14 ``torch.export.load`` and ``ExportedProgram.module()`` do more than read data from
``models/<name>.json``:

- symbolic shapes (``expr_str``) go through ``sympy.sympify``, which ``eval``s the string;
- input names, ``forward_arg_names``, parameter/buffer paths and keyword names are written unescaped
  into the Python source of the generated ``forward``, which is ``exec``ed;
- ``guards_code`` strings are ``exec``ed as the body of the input-check function;
- pytree contexts (``in_spec``/``out_spec``) import the modules named by enum and defaultdict entries;
- node targets are looked up by ``getattr`` under ``torch`` (checked here to be operators before that
  lookup, as torch's verifier checks them after it).

So a crafted JSON runs code without any pickle. :func:`check_program` admits what ``torch.export.save``
writes: plain names, srepr-printed sympy expressions, shape guards on ``L[...]`` inputs, and targets that
resolve to torch operators; anything else raises :class:`ProgramCheckError` naming the field.
"""
from __future__ import annotations

import ast
import functools
import json
import math
import re
import sys
from typing import Any

from .errors import TorchfastError

__all__ = ["ProgramCheckError", "check_program", "check_example_inputs"]

# Names (ModuleDict keys may hold "-" or spaces). Generated source quotes what is no identifier, and a
# name without quotes, backslashes, brackets, "=" or ":" can only make that source fail to compile.
_NAME = re.compile(r"[A-Za-z0-9_. \-]*\Z")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_SYMBOL = re.compile(r"[a-z]+[0-9]+\Z")           # s0, u12, ...: torch's shape symbols
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\Z")
_EXPR_CHARS = re.compile(r"[A-Za-z0-9_ ().,'+\-*/%<>=!~&|\[\]]*\Z")
_DATA = {"as_string", "as_strings", "as_float", "as_floats", "torch_version", "metadata"}  # never turned into code
_SYMPY_CALLS = {
    "Symbol", "Dummy", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs", "floor",
    "ceiling", "sign", "sqrt", "exp", "log", "Equality", "Unequality", "StrictLessThan", "LessThan",
    "StrictGreaterThan", "GreaterThan", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "Xor", "ITE",
    "Piecewise", "ExprCondPair", "Tuple", "BooleanTrue", "BooleanFalse"}
_SYMPY_NAMES = {"oo", "zoo", "nan", "true", "false", "pi", "E", "I"}
_TENSOR_METHODS = {"size", "stride", "storage_offset", "dim", "numel"}
_OPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.BitAnd, ast.BitOr, ast.BitXor,
        ast.USub, ast.UAdd, ast.Not, ast.Invert, ast.And, ast.Or, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt,
        ast.GtE)


class ProgramCheckError(TorchfastError, ValueError):
    """A field of the program JSON that would run code (or is not what torch.export.save writes)."""

    def __init__(self, field: str, why: str):
        self.field, self.why = field, why
        super().__init__(f"field {field}: {why}")


def check_program(doc: Any) -> None:
    """Raise :class:`ProgramCheckError` unless every string of ``doc`` (a parsed model JSON) is inert."""
    _walk(doc, "")


def check_example_inputs(obj: Any, field: str = "example_inputs") -> None:
    """Dict keys of the saved example inputs become guard source text (``L['key']``): plain names only."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, int) and not (isinstance(k, str) and re.fullmatch(r"[A-Za-z0-9_. \-]*", k)):
                raise ProgramCheckError(f"{field}[{k!r}]", "a key with quotes or other characters that end up "
                                                           "in generated guard code")
            check_example_inputs(v, f"{field}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_example_inputs(v, f"{field}[{i}]")


def _walk(node: Any, path: str) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            where = f"{path}.{k}" if path else str(k)
            if not isinstance(k, str) or not _NAME.match(k):
                raise ProgramCheckError(where, "a key that is not a plain name")
            if k in _DATA:
                continue
            if k == "expr_str":
                _check_expr(v, where, _sympy_node)
            elif k == "guards_code":
                for i, g in enumerate(v if isinstance(v, list) else [v]):
                    _check_expr(g, f"{where}[{i}]", _guard_node)
            elif k in ("in_spec", "out_spec"):
                _check_treespec(v, where, names_only=k == "in_spec")
            elif k in ("target", "as_operator"):
                _check_target(v, where)
            else:
                _walk(v, where)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _walk(v, f"{path}[{i}]")
    elif isinstance(node, str) and not _NAME.match(node):
        raise ProgramCheckError(path, f"{node[:80]!r} is not a plain name")


def _check_expr(s: Any, where: str, check_node) -> None:
    if not isinstance(s, str) or not _EXPR_CHARS.match(s):
        raise ProgramCheckError(where, f"{str(s)[:80]!r} holds characters no shape expression has")
    try:
        tree = ast.parse(s, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ProgramCheckError(where, f"{s[:80]!r} is not an expression") from None
    try:
        check_node(tree.body)
    except ProgramCheckError as e:
        raise ProgramCheckError(where, f"{s[:80]!r}: {e.why}") from None
    except RecursionError:
        raise ProgramCheckError(where, "expression nested too deeply") from None


def _bad(node: ast.AST) -> ProgramCheckError:
    return ProgramCheckError("", f"{ast.unparse(node)[:60]!r} is not allowed there")


def _operators(node: ast.AST, check) -> bool:
    """Arithmetic, comparison and logic: check the operands, True when ``node`` was one."""
    if isinstance(node, ast.BinOp) and isinstance(node.op, _OPS):
        check(node.left), check(node.right)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, _OPS):
        check(node.operand)
    elif isinstance(node, ast.BoolOp):
        for v in node.values:
            check(v)
    elif isinstance(node, ast.Compare) and all(isinstance(o, _OPS) for o in node.ops):
        for v in (node.left, *node.comparators):
            check(v)
    else:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _sympy_calls() -> set[str]:
    import sympy
    import torch.utils._sympy.functions as fns
    return _SYMPY_CALLS | {n for n, o in vars(fns).items() if isinstance(o, type) and issubclass(o, sympy.Basic)}


def _sympy_node(node: ast.AST) -> None:
    """What ``sympy.srepr`` prints: calls of sympy classes, numbers, Symbol('name', assumption=True)."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, bool):
        return
    if isinstance(node, ast.Name) and (node.id in _SYMPY_NAMES or _SYMBOL.match(node.id)):
        return
    if isinstance(node, ast.Tuple):
        for e in node.elts:
            _sympy_node(e)
        return
    if _operators(node, _sympy_node):
        return
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _sympy_calls()):
        raise _bad(node)
    name, args = node.func.id, node.args
    if name in ("Symbol", "Dummy", "Float"):   # the only calls that take a string (sympify would eval others)
        pattern = _IDENT if name != "Float" else _NUMBER
        if not args or not (isinstance(args[0], ast.Constant) and isinstance(args[0].value, str)
                            and pattern.match(args[0].value)):
            raise _bad(node)
        args = args[1:]
        for kw in node.keywords:
            if not (kw.arg and _IDENT.match(kw.arg) and isinstance(kw.value, ast.Constant)
                    and type(kw.value.value) in (bool, int)):
                raise _bad(node)
    elif node.keywords:
        raise _bad(node)
    for a in args:
        _sympy_node(a)


@functools.lru_cache(maxsize=None)
def _guard_names() -> set[str]:
    from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP
    return set(SYMPY_INTERP)


def _guard_node(node: ast.AST) -> None:
    """Shape guards: ``L['x'].size()[0] <= 64``, arithmetic, and the numeric helpers torch execs them with."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, bool):
        return
    if isinstance(node, ast.Name) and node.id in ("L", "inf"):
        return
    if _operators(node, _guard_node):
        return
    if isinstance(node, ast.Subscript):
        key = node.slice
        if isinstance(key, ast.UnaryOp) and isinstance(key.op, ast.USub):
            key = key.operand
        if not (isinstance(key, ast.Constant) and (type(key.value) is int
                                                   or isinstance(key.value, str) and _IDENT.match(key.value))):
            raise _bad(node)
        return _guard_node(node.value)
    if isinstance(node, ast.Attribute):   # a field of a dataclass input: L['x'].field
        if not _IDENT.match(node.attr) or node.attr.startswith("_"):
            raise _bad(node)
        return _guard_node(node.value)
    if isinstance(node, ast.Call) and not node.keywords:
        f = node.func
        if isinstance(f, ast.Name) and f.id in _guard_names():
            pass
        elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "math":
            if f.attr.startswith("_") or not callable(getattr(math, f.attr, None)):
                raise _bad(node)
        elif isinstance(f, ast.Attribute) and f.attr in _TENSOR_METHODS:
            _guard_node(f.value)
        else:
            raise _bad(node)
        for a in node.args:
            _guard_node(a)
        return
    raise _bad(node)


@functools.lru_cache(maxsize=None)
def _sym_op_names() -> set[str]:
    try:
        from torch._export.serde.serialize import _SYM_OPS
    except ImportError:
        import operator
        _SYM_OPS = {operator.mul, operator.add, operator.sub, operator.floordiv, operator.mod, operator.truediv}
    return {f"{op.__module__}.{op.__name__}" for op in _SYM_OPS} | {"_operator.getitem"}


def _check_target(t: Any, where: str) -> None:
    """A node may call a torch operator or one of the symbolic-int helpers, not any function under ``torch``."""
    if not isinstance(t, str) or not _NAME.match(t):
        raise ProgramCheckError(where, f"{str(t)[:80]!r} is not an operator name")
    why = _target_problem(t)
    if why:
        raise ProgramCheckError(where, why)


@functools.lru_cache(maxsize=4096)
def _target_problem(t: str) -> str | None:
    import torch
    if t in _sym_op_names():
        return None
    parts = t.split(".")
    if parts[:2] != ["torch", "ops"] or len(parts) not in (4, 5):
        return f"{t!r} is not a torch operator (torch.ops.NAMESPACE.OP.OVERLOAD)"
    obj: Any = torch.ops
    for p in parts[2:]:
        try:
            obj = getattr(obj, p)
        except (AttributeError, RuntimeError):
            return None  # unknown here: torch fails to resolve it too, and a name is not callable
    if not isinstance(obj, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)):
        return f"{t!r} resolves to {type(obj).__name__}, not an operator"
    return None


def _check_treespec(spec: Any, where: str, names_only: bool) -> None:
    try:
        _, tree = json.loads(spec)
    except (TypeError, ValueError):
        raise ProgramCheckError(where, "not a serialized pytree spec") from None
    todo = [tree]
    while todo:
        node = todo.pop()
        if not isinstance(node, dict):
            raise ProgramCheckError(where, "not a serialized pytree spec")
        typ, ctx = node.get("type"), node.get("context")
        if typ is not None and (not isinstance(typ, str) or not _NAME.match(typ)):
            raise ProgramCheckError(where, f"pytree type {str(typ)[:80]!r} is not a plain name")
        if ctx is not None:
            try:
                parsed = json.loads(ctx)
            except (TypeError, ValueError):
                raise ProgramCheckError(where, "a pytree context that is not JSON") from None
            _check_context(parsed, where, names_only, typ)
        todo.extend(node.get("children_spec") or [])


def _check_context(ctx: Any, where: str, names_only: bool, typ: str | None) -> None:
    """Enum members and defaultdict factories name a module that torch imports: only ones already imported."""
    if isinstance(ctx, dict):
        if "__enum__" in ctx:
            module, _, attrs = str(ctx.get("fqn", "")).partition(":")
            _resolve(module, attrs, where, enum=True)
        if typ == "collections.defaultdict" and "default_factory_module" in ctx:
            _resolve(str(ctx["default_factory_module"]), str(ctx.get("default_factory_name", "")), where, enum=False)
        items = list(ctx.keys()) + list(ctx.values())
    elif isinstance(ctx, list):
        items = ctx
    else:
        items = [ctx]
    for v in items:
        if isinstance(v, (dict, list)):
            _check_context(v, where, names_only, None)
        elif names_only and isinstance(v, str) and not _NAME.match(v):
            raise ProgramCheckError(where, f"input key {v[:80]!r} is not a plain name (it is written into the "
                                           f"generated forward source)")


def _resolve(module: str, attrs: str, where: str, enum: bool) -> None:
    from enum import Enum
    obj: Any = sys.modules.get(module)
    for p in attrs.split(".") if obj is not None else ():
        obj = None if p.startswith("_") else getattr(obj, p, None)
    if not (isinstance(obj, type) and (issubclass(obj, Enum) or not enum)):
        raise ProgramCheckError(where, f"pytree context names {module}:{attrs}"[:200] + f", which is not "
                                       f"{'an Enum' if enum else 'a class'} of an already imported module")
