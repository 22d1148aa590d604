"""Zero padding as plain, traceable modules, and explicit pads folded into the conv that follows them.

A TF-style "same" conv pads by an amount that depends on the input size (stride 2: even and odd sizes
differ); ``SamePad2d`` computes it with integer arithmetic that ``torch.fx`` records, so a model holding
it still traces. ``PaddedConv`` is a pad followed by a plain conv that still answers ``.weight``/``.bias``.
``plan_padding`` picks the form for the pads a layer was seen applying.

A zero pad (``nn.ZeroPad2d``, ``nn.ConstantPad2d(.., 0)``, ``F.pad``) that only feeds a plain conv moves
into the conv's own ``padding`` when that is equivalent (symmetric): ``sequential_pad_folds`` for
``nn.Sequential`` neighbours, ``graph_pad_folds`` where the model traces.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SamePad2d", "PaddedConv", "same_pads", "plan_padding", "Change"]


class Change(NamedTuple):
    """One entry of what a canonicalization did: the layer's qualified name, the action, why."""
    layer: str
    action: str
    reason: str


def same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TF "SAME" padding of one spatial dim: (before, after), the extra pixel after."""
    total = max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class SamePad2d(nn.Module):
    """Zero-pads H and W as TensorFlow's "SAME" does for a conv of this kernel/stride/dilation, whatever
    the input size. Integer arithmetic only, so ``torch.fx.symbolic_trace`` records it as graph nodes."""

    def __init__(self, kernel_size: Sequence[int], stride: Sequence[int], dilation: Sequence[int] = (1, 1)):
        super().__init__()
        self.kernel_size = tuple(int(k) for k in kernel_size)
        self.stride = tuple(int(s) for s in stride)
        self.dilation = tuple(int(d) for d in dilation)
        if not len(self.kernel_size) == len(self.stride) == len(self.dilation) == 2:
            raise ValueError(f"SamePad2d takes 2 kernel sizes, strides and dilations, got kernel_size="
                             f"{self.kernel_size}, stride={self.stride}, dilation={self.dilation}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for dim in (-1, -2):  # F.pad lists the last dim first
            k, s, d = self.kernel_size[dim], self.stride[dim], self.dilation[dim]
            size = x.size(dim)
            span = (k - 1) * d + 1
            # ceil(size / s) without math.ceil, so that fx can record it
            total = ((size + s - 1) // s - 1) * s + span - size
            if span < s:  # only then can the formula go negative: clamp at 0 (int * bool, traceable)
                total = total * (total > 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}"


class PaddedConv(nn.Module):
    """``conv(pad(x))``: a padding the conv's own ``padding`` cannot express (asymmetric, or size-dependent),
    then a plain conv. Reads of the conv's attributes (``weight``, ``bias``, ``out_channels``, ...) go to
    the conv, so model code that inspects the layer keeps working."""

    def __init__(self, pad: nn.Module, conv: nn.Module):
        super().__init__()
        self.pad = pad
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pad(x))

    @property
    def weight(self) -> torch.Tensor:
        return self.conv.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.conv.bias

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if name.startswith("_") or not modules or "conv" not in modules:
                raise
            return getattr(modules["conv"], name)


def pads_text(pads: Sequence) -> str:
    return ", ".join(f"{d} {b}/{a}" for d, (b, a) in zip("HW" if len(pads) == 2 else "L", pads))


def sizes_text(sizes: Sequence) -> str:
    return ", ".join(dict.fromkeys("x".join(map(str, s)) for s in sizes))


def plan_padding(observed: Sequence[tuple], kernel: Sequence[int], conv_args: Sequence, n: int,
                 any_size: bool) -> tuple[str, object, str] | str:
    """How to express the zero pads a layer applied before its conv, from ``observed`` (pads per dim as
    (before, after), input spatial size) of every call: ("none" | "fold" | "zero" | "same", what, note),
    or why no padding module computes them. ``conv_args``: the conv's (stride, padding, dilation)."""
    pads = [p for p, _ in observed]
    sizes = [sz for _, sz in observed]
    if all(b == 0 and a == 0 for p in pads for b, a in p):
        return "none", pads[0], ""
    stride, padding, dilation = conv_args
    if isinstance(padding, str):
        return f"its forward pads the input and then calls the conv with padding={padding!r}"
    same_ok = all(p == tuple(same_pads(*a) for a in zip(sz, kernel, stride, dilation)) for p, sz in observed)
    exact_any = same_ok and all(st == 1 for st in stride)   # the same pads for every input size
    constant = all(p == pads[0] for p in pads)
    assumed = "" if exact_any else (
        f"; exact for the observed input sizes ({sizes_text(sizes)}): TF 'same' pads differ on sizes with "
        f"another remainder mod the stride" if same_ok else
        f"; the pads were the same on every observed input size ({sizes_text(sizes)}) and are assumed to stay so")
    if constant and (exact_any or not any_size):
        # constant pads: into the conv's own padding, or a constant pad module (which int8 folds into the conv)
        return ("fold" if all(b == a for b, a in pads[0]) else "zero"), pads[0], assumed
    if same_ok and n == 2:
        return "same", (tuple(kernel), tuple(stride), tuple(dilation)), ""
    if same_ok:
        return "its TF 'same' padding depends on the input size, and only 2-d convs have a SamePad2d"
    return f"its pads change with the input ({sizes_text(sizes)}) and follow no rule a padding module computes"


# ---------------------------------------------------------------- folding explicit pads
_PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d)
_CONVS = (nn.Conv1d, nn.Conv2d)


def _module_pad(mod: nn.Module) -> list[int] | None:
    """The F.pad list of a zero-padding module, or None."""
    if type(mod) not in _PAD_MODULES or float(getattr(mod, "value", 0.0)) != 0.0:
        return None
    return [int(p) for p in mod.padding]


def _folded(conv: nn.Module, pad: Sequence) -> tuple[nn.Module | None, str]:
    """A copy of a plain ``conv`` whose ``padding`` absorbs the zero ``pad`` (F.pad order), or (None, why)."""
    if type(conv) not in _CONVS:
        return None, "not followed by a plain Conv1d/Conv2d"
    n = 1 if type(conv) is nn.Conv1d else 2
    if not all(isinstance(p, int) for p in pad):
        return None, "its amounts are computed at run time"
    if len(pad) > 2 * n or len(pad) % 2:
        return None, f"pads {len(pad) // 2} dims, more than the conv's {n} spatial dims"
    if any(p < 0 for p in pad):
        return None, "negative pads crop"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None, f"the conv pads with padding={conv.padding!r}, padding_mode={conv.padding_mode!r}"
    per_dim = [(0, 0)] * n
    for i in range(len(pad) // 2):  # pad[0:2] is the last dim
        per_dim[n - 1 - i] = (pad[2 * i], pad[2 * i + 1])
    if any(b != a for b, a in per_dim):
        return None, f"asymmetric pad {list(pad)}"
    new = type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                     padding=tuple(p + b for p, (b, _) in zip(conv.padding, per_dim)), dilation=conv.dilation,
                     groups=conv.groups, bias=conv.bias is not None, device="meta")
    new.weight = conv.weight
    new.bias = conv.bias
    new.train(conv.training)
    return new, f"zero pad {list(pad)} folded into the conv's padding {tuple(new.padding)}"


def _registered_once(model: nn.Module) -> dict[int, int]:
    counts: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    return counts


def sequential_pad_folds(model: nn.Module) -> tuple[dict[str, nn.Module], list[Change]]:
    """Swaps that fold a zero-pad module into the plain conv right after it in an ``nn.Sequential``."""
    swaps: dict[str, nn.Module] = {}
    changes = []
    counts = _registered_once(model)
    for name, seq in model.named_modules():
        if type(seq) is not nn.Sequential:
            continue
        items = list(seq._modules.items())
        for (pk, pad), (ck, conv) in zip(items, items[1:]):
            amounts = _module_pad(pad)
            if amounts is None or counts[id(pad)] != 1 or counts[id(conv)] != 1:
                continue
            new, why = _folded(conv, amounts)
            pname, cname = f"{name}.{pk}" if name else pk, f"{name}.{ck}" if name else ck
            if new is None or pname in swaps or cname in swaps:
                continue
            swaps[pname], swaps[cname] = nn.Identity(), new
            changes.append(Change(pname, f"removed; folded into {cname}", why))
    return swaps, changes


def _fn_pad(node: torch.fx.Node) -> list | None:
    """The pad list of an ``F.pad(x, pad)`` node that pads with zeros, or None."""
    if node.op != "call_function" or node.target is not F.pad:
        return None
    names = ["input", "pad", "mode", "value"]
    args = dict(zip(names, node.args)) | dict(node.kwargs)
    if args.get("mode", "constant") != "constant" or args.get("value") not in (None, 0, 0.0):
        return None
    pad = args.get("pad")
    return list(pad) if isinstance(pad, (list, tuple)) else None


def graph_pad_folds(model: nn.Module, *, rewrite_functional: bool) -> tuple[dict[str, nn.Module],
                                                                              torch.fx.Graph | None, list[Change]]:
    """Pads the FX graph shows feeding only a plain conv: pad modules (swapped for ``nn.Identity``) and, when
    ``rewrite_functional``, ``F.pad`` calls in the model's own forward (removed from a returned graph).
    Nothing when the model does not trace."""
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - an untraceable model keeps its pads; Sequential neighbours are done apart
        return {}, None, []
    modules = dict(model.named_modules())
    counts = _registered_once(model)
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    swaps: dict[str, nn.Module] = {}
    changes: list[Change] = []
    erased = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in modules:
            amounts = _module_pad(modules[node.target])
            if amounts is None or counts[id(modules[node.target])] != 1 or calls[node.target] != 1:
                continue
        elif rewrite_functional and (amounts := _fn_pad(node)) is not None:
            pass
        else:
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module" or users[0].args[:1] != (node,):
            continue
        target = users[0].target
        conv = modules.get(target)
        if conv is None or target in swaps or calls.get(target) != 1 or counts[id(conv)] != 1:
            continue
        new, why = _folded(conv, amounts)
        if new is None:
            continue
        swaps[target] = new
        if node.op == "call_module":
            swaps[node.target] = nn.Identity()
            changes.append(Change(node.target, f"removed; folded into {target}", why))
        else:
            erased.append(node)
            changes.append(Change(target, "F.pad before it removed from the forward; folded into its padding", why))
    if not erased:
        return swaps, None, changes
    for node in erased:
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
    gm.graph.lint()
    return swaps, gm.graph, changes
