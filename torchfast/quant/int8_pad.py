"""Zero pads before int8 convs, folded into the int8 conv in torch.ao FX graphs.

torch.ao's x86 backend config knows no pad op: ``F.pad`` / ``nn.ZeroPad2d`` come out of ``convert_fx`` as
``dequantize -> pad (fp32) -> quantize`` before the int8 conv, a round trip through float that costs ~15x the
depthwise conv it feeds. ``F.pad`` does run on quantized tensors (it writes the zero point), but slower
still. What is fast is no pad at all: a zero pad ``(before, after)`` in front of a conv with stride ``s``
equals the same conv with a symmetric padding ``P >= max(before, after)``, ``P = before (mod s)``, whose
output is cropped by ``(P - before) / s`` at the start and to the original length — exact, bit for bit,
because the int8 conv pads with the zero point too. The crop is a view of the int8 output.

``pad_backend_config`` makes the pads share their input's observer, so the quantize after the pad repeats
its input's scale and zero point; ``fold_int8_pads`` then rewrites the converted graph.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["pad_backend_config", "fold_int8_pads"]

_PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d)


def pad_backend_config(backend_config=None):
    """``backend_config`` (default: torch.ao's x86 one) plus zero-pad patterns observed like their input."""
    import torch.ao.quantization.quantize_fx  # noqa: F401 - backend_config needs torch.ao's modules loaded first
    from torch.ao.quantization.backend_config import BackendPatternConfig, DTypeConfig, ObservationType
    from torch.ao.quantization.backend_config.x86 import get_x86_backend_config

    config = get_x86_backend_config() if backend_config is None else backend_config
    dtypes = [DTypeConfig(input_dtype=torch.quint8, output_dtype=torch.quint8)]
    for pattern in (F.pad, *_PAD_MODULES):
        config.set_backend_pattern_config(BackendPatternConfig(pattern).set_observation_type(
            ObservationType.OUTPUT_SHARE_OBSERVER_WITH_INPUT).set_dtype_configs(dtypes))
    return config


def crop_conv_output(y: torch.Tensor, x: torch.Tensor, spec: tuple) -> torch.Tensor:
    """``y`` (the conv of ``x`` with enlarged padding) cut to what the padded conv gives. ``spec``: per dim
    (dim, start, before, after, span, stride), the original total pads and kernel span."""
    for dim, start, before, after, span, stride in spec:
        length = (x.size(dim) + before + after - span) // stride + 1
        y = y.narrow(dim, start, length)
    return y.contiguous(memory_format=torch.channels_last) if y.dim() == 4 else y.contiguous()


def _attr(gm: torch.fx.GraphModule, arg):
    if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
        v = gm
        for part in arg.target.split("."):
            v = getattr(v, part)
        return v
    return arg


def _number(v) -> float | None:
    if isinstance(v, torch.Tensor):
        return float(v) if v.numel() == 1 else None
    return float(v) if isinstance(v, (int, float)) else None


def _qparams(gm: torch.fx.GraphModule, node) -> tuple | None:
    """(scale, zero point) of the quantized tensor ``node`` produces, where the graph says."""
    if not isinstance(node, torch.fx.Node):
        return None
    if node.op == "call_function" and node.target in (crop_conv_output, pad_int8):   # ours keep qparams
        return _qparams(gm, node.args[0])
    if node.op == "call_function" and node.target is torch.quantize_per_tensor:
        if _attr(gm, node.args[3]) is not torch.quint8:
            return None
        return _number(_attr(gm, node.args[1])), _number(_attr(gm, node.args[2]))
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if hasattr(mod, "scale") and hasattr(mod, "zero_point"):
            return _number(mod.scale), _number(mod.zero_point)
    return None


def _zero_pad(gm: torch.fx.GraphModule, node: torch.fx.Node) -> list | None:
    """The pad list of a zero pad node (ints, or graph nodes where computed at run time), else None."""
    if node.op == "call_function" and node.target is F.pad:
        a = dict(zip(("input", "pad", "mode", "value"), node.args)) | dict(node.kwargs)
        if a.get("mode", "constant") != "constant" or a.get("value") not in (None, 0, 0.0):
            return None
        pad = a.get("pad")
    elif node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if type(mod) not in _PAD_MODULES or float(getattr(mod, "value", 0.0)) != 0.0:
            return None
        pad = mod.padding
    else:
        return None
    if not isinstance(pad, (list, tuple)) or any(isinstance(p, int) and p < 0 for p in pad):
        return None
    return list(pad)


def pad_int8(x: torch.Tensor, pad: list[int]) -> torch.Tensor:
    """Zero-pad a per-tensor quantized tensor on its integers (several times faster than ``F.pad`` on it)."""
    zp = x.q_zero_point()
    return torch._make_per_tensor_quantized_tensor(F.pad(x.int_repr(), pad, value=float(zp)), x.q_scale(), zp)


def _fbgemm_depthwise(conv) -> bool:
    """fbgemm's fast depthwise kernels take only these convs, and only with padding (k - 1) / 2."""
    k = conv.kernel_size
    return len(k) == 2 and conv.groups == conv.in_channels and conv.groups % 8 == 0 and k[0] == k[1] \
        and k[0] in (3, 5) and all(s in (1, 2) for s in conv.stride) and all(d == 1 for d in conv.dilation)


def _enlarged(conv, pad: list[int]) -> tuple[tuple, list[int], tuple] | None:
    """(new padding, the pad still needed before it (F.pad order, all zeros when none), crop spec) for
    ``conv`` absorbing ``pad`` (F.pad order), or None."""
    n = len(conv.kernel_size)
    if len(pad) > 2 * n or len(pad) % 2:
        return None
    per_dim = [(0, 0)] * n
    for i in range(len(pad) // 2):
        per_dim[n - 1 - i] = (pad[2 * i], pad[2 * i + 1])
    depthwise = _fbgemm_depthwise(conv)
    padding, rest, spec = [], [], []
    for d, ((b, a), p, k, s, dil) in enumerate(zip(per_dim, conv.padding, conv.kernel_size, conv.stride,
                                                 conv.dilation)):
        before, after = p + b, p + a
        if depthwise:                                    # keep the fast kernel: padding (k - 1) / 2, and pad
            big = (k - 1) // 2                           # the rest explicitly where that falls short
            short = before - big
            extra_b = short if short >= 0 else short % s    # the least pad that keeps the stride's phase
            extra_a = max(after - big, 0)
        else:
            big = max(before, after)
            big += (before - big) % s                    # same phase of the stride as the original grid
            extra_b = extra_a = 0
        padding.append(big)
        rest.append((extra_b, extra_a))
        start = (extra_b + big - before) // s
        if (extra_b + big, extra_a + big) != (before, after):
            spec.append((d - n, start, before, after, (k - 1) * dil + 1, s))
    flat = [v for b, a in reversed(rest) for v in (b, a)]
    return tuple(padding), flat, tuple(spec)


def _conv_after(gm: torch.fx.GraphModule, qn: torch.fx.Node, calls: dict[str, int]):
    """The int8 conv that is the only user of ``qn`` (and is called once), or None."""
    import torch.ao.nn.quantized as nnq

    users = list(qn.users)
    if len(users) != 1 or users[0].op != "call_module" or users[0].args[:1] != (qn,):
        return None
    conv = gm.get_submodule(users[0].target)
    if not isinstance(conv, (nnq.Conv1d, nnq.Conv2d)) or conv.padding_mode != "zeros" or \
            calls.get(users[0].target) != 1:
        return None
    return users[0]


def fold_int8_pads(gm: torch.fx.GraphModule) -> dict[str, int]:
    """In a converted int8 graph, remove each ``quantize(pad(x.dequantize()))`` that repeats ``x``'s own
    scale and zero point: folded into the int8 conv it feeds (enlarged padding, cropped output) when its
    amounts are constants, else the pad runs on ``x``'s integers. In place and exact; returns the counts
    ``{"folded": n, "on int8": m}``."""
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    counts = {"folded": 0, "on int8": 0}
    for pad_node in list(gm.graph.nodes):
        pad = _zero_pad(gm, pad_node) if pad_node.args else None
        if pad is None:
            continue
        dq = pad_node.args[0]
        if not (isinstance(dq, torch.fx.Node) and dq.op == "call_method" and dq.target == "dequantize"):
            continue
        users = list(pad_node.users)
        if len(users) != 1 or users[0].target is not torch.quantize_per_tensor:
            continue
        qn, src = users[0], dq.args[0]
        if _qparams(gm, src) is None or _qparams(gm, src) != _qparams(gm, qn):
            continue
        conv_node = _conv_after(gm, qn, calls)
        plan = None
        if conv_node is not None and all(isinstance(p, int) for p in pad):
            plan = _enlarged(gm.get_submodule(conv_node.target), pad)
        if plan is None:
            with gm.graph.inserting_before(qn):
                on_int = gm.graph.call_function(pad_int8, (src, pad))
            qn.replace_all_uses_with(on_int)
            counts["on int8"] += 1
        else:
            padding, rest, spec = plan
            conv = gm.get_submodule(conv_node.target)
            new = copy.deepcopy(conv)
            new.padding = padding
            new.set_weight_bias(conv.weight(), conv.bias())      # the packed weights carry the padding
            parent, _, leaf = conv_node.target.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, leaf, new)
            feed = src
            if any(rest):
                with gm.graph.inserting_before(conv_node):
                    feed = gm.graph.call_function(pad_int8, (src, rest))
            conv_node.replace_input_with(qn, feed)
            if spec:
                with gm.graph.inserting_after(conv_node):
                    crop = gm.graph.call_function(crop_conv_output, (conv_node, src, spec))
                conv_node.replace_all_uses_with(crop, delete_user_cb=lambda u: u is not crop)
            counts["folded"] += 1
        gm.graph.erase_node(qn)
        gm.graph.erase_node(pad_node)
        if not dq.users:
            gm.graph.erase_node(dq)
    if any(counts.values()):
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return counts
