"""A transform that raises changes nothing in the user's model; with ``inplace=False`` it never does.

"Nothing" is checked three ways: every state_dict tensor (values and dtype), every module's type, and
every module's own train/eval flag. The model mixes flags on purpose (training, with a frozen
BatchNorm and a block in eval), since restoring only the root's flag would lose them.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

import torchfast as tf
from torchfast.modules import ExampleInputError, state_snapshot, swap_modules

X = torch.randn(4, 3, 8, 8)
BAD_X = torch.randn(4, 5, 8, 8)   # wrong channel count for the first conv


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.block = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.post = nn.Identity()
        self.fc1 = nn.Linear(16, 32)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(32, 16)

    def forward(self, x):
        x = self.post(self.block(torch.relu(self.bn(self.conv(x)))))
        return self.fc2(self.drop(torch.relu(self.fc1(x.mean((2, 3))))))


class FailsOnSecondCall(nn.Module):
    """Identity on its first call, then raises: a model that breaks half-way through a transform."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls >= 2:
            raise RuntimeError("layer 'post' fails on its second call")
        return x


def mixed(flaky: bool = False) -> Net:
    """Trained-looking BatchNorm statistics, then training mode with a frozen BN and an eval block."""
    torch.manual_seed(0)
    m = Net().train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(8, 3, 8, 8))
    m.bn.eval()
    m.block.eval()
    m.block[1].train()   # a training module inside an eval block
    if flaky:
        m.post = FailsOnSecondCall()
    return m


def fingerprint(m: nn.Module):
    return (state_snapshot(m), {n: type(s) for n, s in m.named_modules()},
            {n: s.training for n, s in m.named_modules()})


def assert_untouched(m: nn.Module, before) -> None:
    state, types, flags = before
    now_state, now_types, now_flags = fingerprint(m)
    assert now_types == types
    assert now_flags == flags
    assert now_state.keys() == state.keys()
    for k, v in state.items():
        assert now_state[k].dtype == v.dtype, k
        assert torch.equal(now_state[k], v), k


def calls_on_second(monkeypatch, owner, name: str) -> None:
    """Make ``owner.name`` raise from its second call on (the first call works)."""
    real = getattr(owner, name)
    seen = []

    def flaky(*a, **k):
        seen.append(1)
        if len(seen) >= 2:
            raise RuntimeError(f"{name} fails half-way")
        return real(*a, **k)
    monkeypatch.setattr(owner, name, flaky)


# ---------------------------------------------------------------- the all-or-none swap
def test_swap_modules_is_all_or_none():
    class Refuses(nn.Sequential):
        def __setattr__(self, name, value):
            if name == "1" and isinstance(value, nn.Identity):
                raise RuntimeError("refused")
            super().__setattr__(name, value)

    m = nn.Sequential(Refuses(nn.Linear(2, 2), nn.Linear(2, 2)), nn.Linear(2, 2))
    old = [m[0][0], m[0][1], m[1]]
    with pytest.raises(RuntimeError, match="refused"):
        swap_modules(m, {"1": nn.Identity(), "0.0": nn.Identity(), "0.1": nn.Identity()})
    assert [m[0][0], m[0][1], m[1]] == old
    with pytest.raises(KeyError, match="'0.7'"):
        swap_modules(m, {"1": nn.Identity(), "0.7": nn.Identity()})
    assert m[1] is old[2]


# ---------------------------------------------------------------- decompose
def test_decompose_copy_leaves_argument_untouched():
    m = mixed()
    before = fingerprint(m)
    out, rep = tf.decompose(m, tf.LowRank(ratio=0.5, min_flops_reduction=0), example_inputs=X, calibration=[X])
    assert_untouched(m, before)
    assert out is not m and rep.summary["layers_factorized"] > 0


@pytest.mark.parametrize("inplace", [True, False])
def test_decompose_failures_change_nothing(inplace, monkeypatch):
    m = mixed(flaky=True)   # shape batch, then the calibration batch: fails on the second
    before = fingerprint(m)
    with pytest.raises(ExampleInputError, match="calibration batch 0.*second call"):
        tf.decompose(m, tf.LowRank(ratio=0.5), example_inputs=X, calibration=[X], inplace=inplace)
    assert_untouched(m, before)

    m = mixed()
    before = fingerprint(m)
    with pytest.raises(ExampleInputError, match=r"calibration batch 0 \(input 0: \(4, 5, 8, 8\)"):
        tf.decompose(m, tf.LowRank(ratio=0.5), calibration=[BAD_X], inplace=inplace)
    assert_untouched(m, before)

    import torchfast.lowrank.rewrite as rw
    monkeypatch.setattr(rw, "_report", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("report fails")))
    with pytest.raises(RuntimeError, match="report fails"):
        tf.decompose(m, tf.LowRank(ratio=0.5, min_flops_reduction=0), example_inputs=X, inplace=inplace)
    assert_untouched(m, before)


# ---------------------------------------------------------------- prune
def test_prune_copy_untouched_and_inplace_keeps_each_flag():
    m = mixed()
    before = fingerprint(m)
    out, rep = tf.prune(m, tf.ChannelPruning(amount=0.5), example_inputs=X)
    assert_untouched(m, before)
    assert out is not m and rep.summary["layers rebuilt"] > 0
    # rebuilt layers take the flag of the layer they replace; the rest keep theirs
    assert fingerprint(out)[2] == before[2]

    out, _ = tf.prune(m, tf.ChannelPruning(amount=0.5), example_inputs=X, inplace=True)
    assert out is m and m.bn.num_features == 4
    assert fingerprint(m)[2] == before[2]


@pytest.mark.parametrize("inplace", [True, False])
def test_prune_failures_change_nothing(inplace):
    m = mixed(flaky=True)   # traced once, then the pruned copy's check run fails
    before = fingerprint(m)
    with pytest.raises(tf.prune.PruneError, match="second call"):
        tf.prune(m, tf.ChannelPruning(amount=0.5), example_inputs=X, inplace=inplace)
    assert_untouched(m, before)

    m = mixed()
    before = fingerprint(m)
    with pytest.raises(Exception, match="conv"):
        tf.prune(m, tf.ChannelPruning(amount=0.5), example_inputs=BAD_X, inplace=inplace)
    assert_untouched(m, before)


# ---------------------------------------------------------------- sparsify
def test_sparsify_copy_untouched_and_inplace_keeps_batchnorm_statistics():
    cfg = tf.UnstructuredSparse(amount=0.9, runs=3)
    m = mixed()
    before = fingerprint(m)
    out, _ = tf.sparsify(m, cfg, example_inputs=X)
    assert_untouched(m, before)
    assert out is not m

    out, _ = tf.sparsify(m, cfg, example_inputs=X, inplace=True)
    assert out is m and fingerprint(m)[2] == before[2]
    state = state_snapshot(m)
    for k in ("bn.running_mean", "block.1.running_var", "bn.num_batches_tracked"):
        assert torch.equal(state[k], before[0][k]), k   # capturing layer inputs runs in eval


@pytest.mark.parametrize("inplace", [True, False])
def test_sparsify_failures_change_nothing(inplace, monkeypatch):
    import torchfast.prune.sparse as sp
    m = mixed()
    before = fingerprint(m)
    with pytest.raises(ExampleInputError, match=r"\(4, 5, 8, 8\)"):
        tf.sparsify(m, tf.UnstructuredSparse(amount=0.9, runs=3), example_inputs=BAD_X, inplace=inplace)
    assert_untouched(m, before)

    calls_on_second(monkeypatch, sp, "magnitude_mask")   # fc1 decided, fc2 fails
    with pytest.raises(RuntimeError, match="half-way"):
        tf.sparsify(m, tf.UnstructuredSparse(amount=0.9, runs=3), example_inputs=X, inplace=inplace)
    assert_untouched(m, before)


# ---------------------------------------------------------------- quantize
@pytest.mark.parametrize("inplace", [True, False])
def test_int8_dynamic(inplace, monkeypatch):
    import torchfast.quant.dynamic as dyn
    m = mixed()
    before = fingerprint(m)
    out, _ = tf.quantize(m, tf.Int8Dynamic(keep_slower=True), example_inputs=X, inplace=False)
    assert_untouched(m, before)
    assert not out.training

    with pytest.raises(ExampleInputError, match=r"Net fails on the example inputs \(input 0: \(4, 5, 8, 8\)"):
        tf.quantize(m, tf.Int8Dynamic(), example_inputs=BAD_X, inplace=inplace)
    assert_untouched(m, before)

    calls_on_second(monkeypatch, dyn, "time_layer")   # fc1 timed and chosen, fc2 fails
    with pytest.raises(RuntimeError, match="half-way"):
        tf.quantize(m, tf.Int8Dynamic(backend="torch.ao"), example_inputs=X, inplace=inplace)
    assert_untouched(m, before)


def test_int8_static(monkeypatch):
    import torch.ao.quantization.quantize_fx as qfx
    m = mixed()
    before = fingerprint(m)
    out, _ = tf.quantize(m, tf.Int8Static(calibration=[X, X], progress=False), example_inputs=X)
    assert_untouched(m, before)
    assert not out.training

    with pytest.raises(tf.quant.CalibrationError, match=r"batch 1.*\(4, 5, 8, 8\)"):
        tf.quantize(m, tf.Int8Static(calibration=[X, BAD_X], progress=False), example_inputs=X)
    assert_untouched(m, before)

    monkeypatch.setattr(qfx, "convert_fx", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("convert fails")))
    with pytest.raises(RuntimeError, match="convert fails"):
        tf.quantize(m, tf.Int8Static(calibration=[X], progress=False), example_inputs=X)
    assert_untouched(m, before)


@pytest.mark.parametrize("inplace", [True, False])
def test_half_precision(inplace, monkeypatch):
    import torchfast.quant.half as half
    m = mixed()
    before = fingerprint(m)
    # the cast is timed on a copy with the fp32 model as baseline: in place, nothing is cast before it wins
    out, rep = tf.quantize(m, tf.HalfPrecision(keep_slower=True), example_inputs=X, inplace=inplace)
    assert rep.rows[0]["applied"] and out(X).dtype == torch.float32
    if not inplace:
        assert_untouched(m, before)
    else:
        assert all(p.dtype == torch.bfloat16 for p in m.parameters())

    m = mixed()
    before = fingerprint(m)
    monkeypatch.setattr(half, "compare_latency", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("timing fails")))
    with pytest.raises(RuntimeError, match="timing fails"):
        tf.quantize(m, tf.HalfPrecision(keep_slower=True), example_inputs=X, inplace=inplace)
    assert_untouched(m, before)


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="WeightOnly needs torchao")
@pytest.mark.parametrize("inplace", [True, False])
def test_weight_only(inplace, monkeypatch):
    import torchao.quantization as ao
    m = mixed()
    before = fingerprint(m)
    tf.quantize(m, tf.WeightOnly(bits=8), example_inputs=X)
    assert_untouched(m, before)

    calls_on_second(monkeypatch, ao, "quantize_")   # fc1 quantized, fc2 fails
    with pytest.raises(RuntimeError, match="half-way"):
        tf.quantize(m, tf.WeightOnly(bits=8), example_inputs=X, inplace=inplace)
    assert_untouched(m, before)


# ---------------------------------------------------------------- compile
@pytest.mark.parametrize("backend", ["eager", "torchscript", "export"])
def test_compile_failures_restore_every_flag(backend, monkeypatch):
    m = mixed()
    before = fingerprint(m)
    with pytest.raises(ExampleInputError, match=r"Net does not run on example_inputs.*\(4, 5, 8, 8\)"):
        tf.compile(m, BAD_X, backend=backend)
    assert_untouched(m, before)
    with pytest.raises(tf.backends.BackendError, match=rf"backend '{backend}' failed to compile Net.*\(4, 5, 8, 8\)"):
        tf.compile(m, BAD_X, backend=backend, verify=False)
    assert_untouched(m, before)

    impl = tf.backends.get_backend(backend).load()
    monkeypatch.setattr(impl, "build", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("build fails")))
    with pytest.raises(tf.backends.BackendError, match="build fails"):
        tf.compile(m, X, backend=backend)
    assert_untouched(m, before)


def test_compile_layer_failing_half_way_and_success():
    m = mixed(flaky=True)   # the eager reference call works, the first warm-up call fails
    before = fingerprint(m)
    with pytest.raises(tf.backends.BackendError, match="second call"):
        tf.compile(m, X, backend="eager")
    assert_untouched(m, before)

    m = mixed()
    before = fingerprint(m)
    fast = tf.compile(m, X, backend="torchscript")
    torch.testing.assert_close(fast(X), m(X))
    assert not m.training            # documented: compile leaves the model in eval on success
    assert fingerprint(m)[0].keys() == before[0].keys()
    assert all(torch.equal(v, before[0][k]) for k, v in fingerprint(m)[0].items())


# ---------------------------------------------------------------- optimize
def test_optimize_leaves_argument_untouched():
    m = mixed()
    before = fingerprint(m)
    res = tf.optimize(m, X, [tf.LowRank(ratio=0.5, min_flops_reduction=0), tf.Int8Dynamic(keep_slower=True)],
                      tolerance=tf.Tolerance.off(), runs=2, warmup=1, progress=False)
    assert_untouched(m, before)
    assert res.transformed is not m
    with pytest.raises(ExampleInputError, match=r"\(4, 5, 8, 8\)"):
        tf.optimize(m, BAD_X, [tf.Int8Dynamic()], runs=2, warmup=1, progress=False)
    assert_untouched(m, before)
