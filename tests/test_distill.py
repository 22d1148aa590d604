"""tf.distill: a pruned/factorized student learns the teacher's outputs from unlabeled batches; optimize() uses it."""
import copy

import pytest
import torch
from torch import nn

import torchfast as tf
from torchfast.distill import DistillError
from torchfast.measure import fidelity
from torchfast.modules import state_snapshot, training_flags

FAST = dict(steps=120, threads=1, progress=False)   # one thread: tiny models, shared cores


def _teacher():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 48), nn.BatchNorm1d(48), nn.ReLU(), nn.Dropout(0.1), nn.Linear(48, 48), nn.ReLU(),
                      nn.Linear(48, 10))
    with torch.no_grad():  # BatchNorm statistics of real use, not the defaults
        m.train()(torch.randn(256, 16))
    return m.eval()


def _batches(n=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(32, 16, generator=g) for _ in range(n)]


def _pruned(teacher, amount=0.6):
    student, _ = tf.prune(teacher, tf.ChannelPruning(amount=amount), example_inputs=torch.randn(8, 16))
    return student


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_distill_improves_fidelity_and_never_touches_the_teacher():
    teacher = _teacher()
    student = _pruned(teacher)
    data, held = _batches(), _batches(3, seed=7)
    before = fidelity(teacher, student, held).cosine
    teacher.train()
    teacher[1].eval()                      # mixed per-submodule flags must come back as they were
    student[3].train()
    t_state, t_flags = state_snapshot(teacher), training_flags(teacher)
    s_state, s_flags = state_snapshot(student), training_flags(student)

    out, rep = tf.distill(student, teacher, data, **FAST)

    assert _same(t_state, state_snapshot(teacher)) and training_flags(teacher) == t_flags
    assert all(p.grad is None for p in teacher.parameters())
    assert _same(s_state, state_snapshot(student)) and training_flags(student) == s_flags   # trained a copy
    assert out is not student and not any(m.training for m in out.modules())
    after = fidelity(teacher.eval(), out, held).cosine
    assert before < 0.97 and after > before + 0.02, (before, after)   # on batches it never saw
    assert rep.summary["cosine after"] > rep.summary["cosine before"]
    assert rep.summary["validation loss after"] < rep.summary["validation loss before"]
    assert rep.summary["validation batches"] == 2 and rep.summary["training batches"] == 8
    assert "kl (T=4)+mse" in rep.summary["loss"] and rep.rows[0]["step"] == 0
    assert "held out from training" in rep.notes[0]


def test_deterministic_with_a_seed_and_the_global_rng_is_left_alone():
    teacher = _teacher()
    student = _pruned(teacher)
    rng = torch.get_rng_state()
    a, _ = tf.distill(student, teacher, _batches(), seed=3, **FAST)
    assert torch.equal(rng, torch.get_rng_state())
    b, _ = tf.distill(student, teacher, _batches(), seed=3, **FAST)
    c, _ = tf.distill(student, teacher, _batches(), seed=4, **FAST)
    assert _same(state_snapshot(a), state_snapshot(b))
    assert not _same(state_snapshot(a), state_snapshot(c))


def test_inplace_trains_the_student_itself_and_a_failure_changes_nothing():
    teacher = _teacher()
    student = _pruned(teacher)
    out, rep = tf.distill(student, teacher, _batches(), inplace=True, steps=30, threads=1, progress=False)
    assert out is student and not student.training and rep.summary["steps"] == 30
    before, flags = state_snapshot(student), training_flags(student)

    def exploding(s, t):
        return s.sum() * float("nan")
    with pytest.raises(DistillError, match="loss is nan at step 1"):
        tf.distill(student, teacher, _batches(), inplace=True, loss=exploding, steps=5, threads=1, progress=False)
    assert _same(before, state_snapshot(student)) and training_flags(student) == flags
    with pytest.raises(DistillError, match="shares parameters with the teacher"):
        tf.distill(nn.Sequential(teacher[0]), teacher, _batches(), inplace=True, **FAST)


def test_clear_errors_before_any_training():
    teacher = _teacher()
    student = _pruned(teacher)
    s_state = state_snapshot(student)
    with pytest.raises(DistillError, match="needs batches"):
        tf.distill(student, teacher, None)
    with pytest.raises(DistillError, match="batches is empty"):
        tf.distill(student, teacher, [])
    with pytest.raises(DistillError, match="batch 1 is a str"):
        tf.distill(student, teacher, [torch.randn(4, 16), "text"])
    with pytest.raises(DistillError, match=r"teacher \(Sequential\) fails on validation batch 0 \(input 0: \(4, 7\)"):
        tf.distill(student, teacher, [torch.randn(4, 7)] * 3, **FAST)
    with pytest.raises(DistillError, match="steps must be an integer >= 1.*no steps"):
        tf.distill(student, teacher, _batches(), steps=0)
    with pytest.raises(DistillError, match="epochs must be"):
        tf.distill(student, teacher, _batches(), epochs=0)
    with pytest.raises(DistillError, match="steps or epochs, not both"):
        tf.distill(student, teacher, _batches(), steps=3, epochs=1)
    with pytest.raises(DistillError, match="loss must be one of"):
        tf.distill(student, teacher, _batches(), loss="l1")
    with pytest.raises(DistillError, match="same module"):
        tf.distill(teacher, teacher, _batches())
    # feature layers: unknown names are named with a suggestion; shapes must agree (pruned layers shrink)
    with pytest.raises(DistillError, match=r"student \(Sequential\) has no layer '5x'; did you mean '5'"):
        tf.distill(student, teacher, _batches(), features=["5x"], **FAST)
    with pytest.raises(DistillError, match=r"student's '0' outputs \(32, 20\) but the teacher's '0' outputs \(32, 48"):
        tf.distill(student, teacher, _batches(), features=["0"], **FAST)
    frozen = copy.deepcopy(student).requires_grad_(False)
    with pytest.raises(DistillError, match="no trainable floating-point parameters"):
        tf.distill(frozen, teacher, _batches(), **FAST)
    wrong = nn.Sequential(nn.Linear(16, 5))
    with pytest.raises(DistillError, match=r"student's output 'output' is shape \(32, 5\) but the teacher's is \(32"):
        tf.distill(wrong, teacher, _batches(), **FAST)
    assert _same(s_state, state_snapshot(student))


class _Encoder(nn.Module):
    """Keyword inputs, a dict output of hidden states and a pooled embedding, like a Hugging Face encoder."""

    def __init__(self, width=24):
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.block = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))

    def forward(self, x, mask=None):
        h = self.embed(x)
        h = h + self.block(h)
        if mask is not None:
            h = h * mask.unsqueeze(-1)
        return {"last_hidden_state": h, "pooler_output": h.mean(1)}


def test_dict_batches_hidden_states_labels_ignored_and_matched_features():
    torch.manual_seed(0)
    teacher = _Encoder().eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.block.parameters():
            p.add_(0.3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    batches = [{"x": torch.randn(6, 5, 8, generator=g), "mask": torch.ones(6, 5), "labels": torch.arange(6)}
               for _ in range(8)]
    out, rep = tf.distill(student, teacher, batches, features={"block.1": "block.1"}, **FAST)
    assert rep.summary["loss"] == "last_hidden_state: cosine+mse, pooler_output: cosine+mse"
    assert rep.summary["features"] == "block.1"
    assert rep.summary["cosine after"] > rep.summary["cosine before"]
    assert any("labels in the batches were ignored" in n for n in rep.notes)

    # padding positions (attention_mask 0) carry nothing to match
    from torchfast.distill_losses import pair_loss, token_mask
    t = torch.randn(2, 4, 8)
    s = t.clone()
    s[:, 3] += 5.0
    mask = token_mask({"x": t, "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])})
    assert pair_loss("cosine+mse", s, t, 4.0, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert pair_loss("cosine+mse", s, t, 4.0).item() > 0.1

    # (inputs, labels) pairs from a DataLoader: the labels are dropped for a one-input model
    teacher = _teacher()
    pairs = [(x, torch.randint(0, 10, (32,))) for x in _batches(4)]
    _, rep = tf.distill(_pruned(teacher), teacher, pairs, steps=10, threads=1, progress=False)
    assert any("labels in the batches were ignored" in n for n in rep.notes)


def test_lowrank_student_with_factorized_layers():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 6)).eval()
    g = torch.Generator().manual_seed(2)
    data = [torch.randn(8, 3, 8, 8, generator=g) for _ in range(6)]
    student, _ = tf.decompose(teacher, tf.LowRank(ratio=0.25, min_flops_reduction=0, progress=False),
                              example_inputs=data[0])
    assert "LowRank" in type(student[2]).__name__
    out, rep = tf.distill(student, teacher, data, features=["3"], steps=60, threads=1, progress=False)
    assert rep.summary["validation loss after"] <= rep.summary["validation loss before"]
    assert rep.summary["features"] == "3"


def test_optimize_recovers_a_pruned_stage_that_would_be_rolled_back():
    teacher = _teacher()
    x, calib = _batches(1, seed=5)[0], _batches(12)
    tol = tf.Tolerance(min_cosine=0.94, max_metric_drop=None)
    kw = dict(calibration=calib, tolerance=tol, runs=2, warmup=1, progress=False)
    prune = tf.ChannelPruning(amount=0.6, reconstruct=False)   # the least-squares refit alone would recover it
    before = state_snapshot(teacher)
    off = tf.optimize(teacher, x, [prune], recover=None, **kw)
    assert off.report.rows[1]["applied"] is False and "rolled back" in off.report.rows[1]["note"]
    on = tf.optimize(teacher, x, [prune], recover={"steps": 200, "threads": 1}, **kw)
    row = on.report.rows[1]
    assert row["applied"] is True, row["note"]
    assert row["cosine before recovery"] < 0.94 <= row["cosine"]
    assert row["cosine before recovery"] == pytest.approx(off.report.rows[1]["cosine"])
    assert "distilled 200 steps without labels" in row["note"]
    assert on.report.summary["distilled (kept)"] == "ChannelPruning(amount=0.6, reconstruct=False) (yes)"
    assert any(c.title == "distill" for c in on.report.children[0].children)
    assert _same(before, state_snapshot(teacher))
    assert sum(p.numel() for p in on.transformed.parameters()) < sum(p.numel() for p in teacher.parameters())
    bare = tf.optimize(teacher, x, [prune], tolerance=tol, runs=2, warmup=1, progress=False)
    assert "with calibration batches, optimize would distill it" in bare.report.rows[1]["note"]
    with pytest.raises(DistillError, match="unknown distill option"):
        tf.optimize(teacher, x, [prune], recover={"step": 3}, **kw)
    refit = tf.optimize(teacher, x, [tf.ChannelPruning(amount=0.6)], recover=None, **kw)
    assert refit.report.rows[1]["applied"] is True, refit.report.rows[1]["note"]   # no training at all


def _stats(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}


def test_batchnorm_frozen_trains_the_student_as_it_runs_and_auto_reestimates_stale_statistics():
    teacher = _teacher()
    student = _pruned(teacher)
    with torch.no_grad():   # statistics that no longer fit the layer feeding them
        student[1].running_mean += 1.0
        student[1].running_var *= 4.0
    stale = _stats(student)
    frozen, rep = tf.distill(student, teacher, _batches(), batchnorm="frozen", **FAST)
    assert rep.summary["batchnorm"] == "frozen" and _same(stale, _stats(frozen))   # statistics never moved
    trained, rep = tf.distill(student, teacher, _batches(), batchnorm="train", **FAST)
    assert rep.summary["batchnorm"] == "train" and not _same(stale, _stats(trained))
    auto, rep = tf.distill(student, teacher, _batches(), **FAST)
    assert rep.summary["batchnorm"] == "frozen, statistics re-estimated first"
    fresh = _stats(auto)
    assert not _same(stale, fresh)
    # re-estimated once, then fixed: distilling the result again on the same batches keeps its statistics
    again, rep = tf.distill(auto, teacher, _batches(), **FAST)
    assert rep.summary["batchnorm"] == "frozen" and _same(fresh, _stats(again))
    held = _batches(3, seed=7)
    assert fidelity(teacher, auto, held).cosine > fidelity(teacher, student, held).cosine
    with pytest.raises(DistillError, match="batchnorm must be one of 'auto', 'frozen', 'train', got 'eval'"):
        tf.distill(student, teacher, _batches(), batchnorm="eval", **FAST)
    assert _same(stale, _stats(student))


def test_mixup_blends_pairs_of_samples_of_a_batch_the_same_way_across_its_inputs():
    from torchfast.distill_mixup import mixable, mixed_copies
    eye = torch.eye(8)
    torch.manual_seed(0)
    (one,), (a, b) = mixed_copies([eye]), mixed_copies([(eye, 2 * eye)])[0]
    for m in (one, a):   # each row: w * e_i + (1 - w) * e_j, 0 <= w <= 1
        assert (m >= 0).all() and torch.allclose(m.sum(1), torch.ones(8)) and ((m > 0).sum(1) <= 2).all()
    torch.testing.assert_close(b, 2 * a)   # one weight and one partner per sample, for every input
    assert mixable(torch.randn(4, 3)) is None and mixable({"x": torch.randn(4, 3), "y": torch.randn(4)}) is None
    assert "non-floating-point" in mixable((torch.zeros(4, 3, dtype=torch.long),))
    assert "batch dimension" in mixable((torch.randn(4, 3), torch.randn(5, 3)))


def test_augment_auto_blends_float_inputs_and_leaves_token_ids_alone():
    teacher = _teacher()
    data, student = _batches(), _pruned(teacher)
    seen = []
    hook = teacher.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    _, rep = tf.distill(student, teacher, data, **FAST)
    hook.remove()
    blended = [x for x in seen if not any(x.shape == b.shape and torch.equal(x, b) for b in data)]
    n = len(blended)
    # each pass over the 8 training batches: every one once as it is, once freshly blended (never cached)
    assert rep.summary["augment"] == f"mixup ({n} freshly blended batches)" and rep.summary["training batches"] == 8
    assert n >= rep.summary["steps"] // 2 - 8 and n > 8
    assert len({tuple(x.flatten()[:4].tolist()) for x in blended}) == n   # no blend drawn twice
    _, rep = tf.distill(_pruned(teacher), teacher, _batches(), augment="none", **FAST)
    assert rep.summary["augment"] == "none"

    torch.manual_seed(0)
    words = nn.Sequential(nn.Embedding(50, 8), nn.Flatten(), nn.Linear(32, 10)).eval()
    student = copy.deepcopy(words)
    with torch.no_grad():
        student[2].weight.mul_(0.5)
    ids = [torch.randint(0, 50, (16, 4), generator=torch.Generator().manual_seed(i)) for i in range(5)]
    _, rep = tf.distill(student, words, ids, **FAST)
    assert rep.summary["augment"] == "none"
    s_state = state_snapshot(student)
    with pytest.raises(DistillError, match="augment='mixup' cannot blend training batch 0: it holds non-floating"):
        tf.distill(student, words, ids, augment="mixup", **FAST)
    with pytest.raises(DistillError, match="augment must be one of 'auto', 'mixup', 'none', got 'cutmix'"):
        tf.distill(student, words, ids, augment="cutmix", **FAST)
    assert _same(s_state, state_snapshot(student))


def test_patience_counts_from_a_quarter_of_the_steps():
    teacher = _teacher()
    # an lr too small to move anything: no check ever improves on the start
    _, rep = tf.distill(_pruned(teacher), teacher, _batches(), steps=100, eval_every=5, patience=2, lr=1e-12,
                        threads=1, progress=False)
    assert rep.summary["steps"] == 30 and rep.summary["best step"] == 0, rep.summary   # checks at 25 and 30
    assert rep.summary["stopped"] == "early at step 30: no better validation loss in 2 checks"
