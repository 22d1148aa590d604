"""``distill()``: win back what pruning or factorizing cost by training the smaller model to match the original.

Most users have unlabeled data at best, and a pruned or low-rank model mostly needs to relearn what its
own teacher already answers: the original model is the label. The student is trained on the user's
input batches to reproduce the teacher's outputs (KL on softened class probabilities for classifiers,
cosine + scale-free MSE on embeddings and hidden states), optionally also the outputs of matched layers.
Validation batches held out from training decide when to stop and which weights to keep, so the returned
student never has a higher validation loss than the one given. The teacher is only ever run, in eval mode, without
gradients; on failure nothing is changed.
"""
from __future__ import annotations

import copy
import inspect
import math
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .errors import TorchfastError
from .measure import fidelity, fixed_threads
from .modules import (Batch, batches_list, call_model, check_module, describe_batch, evaluating, first_tensor,
                      model_device, move_batch, restore_training_flags, training_flags)
from .report import Report
from .distill_mixup import mixable, mixed_copies
from .distill_losses import LOSSES, DistillError, Taps, feature_pairs, loss_kind, pair_loss, targets, token_mask

__all__ = ["distill", "DistillError", "LOSSES", "recoverable", "recover_options"]

DEFAULT_STEPS = 300
_LABEL_KEYS = ("labels", "label")


# ---------------------------------------------------------------- batches
def _takes_one_input(model: nn.Module) -> bool:
    """Whether ``model.forward`` cannot take a second positional input (then ``(x, y)`` pairs carry labels)."""
    try:
        inspect.signature(model.forward).bind(object(), object())
    except TypeError:
        return True
    except ValueError:  # no signature (builtins, some scripted modules)
        return False
    return False


def _labels_like(x: Any, y: Any) -> bool:
    if not (isinstance(y, torch.Tensor) and not y.is_floating_point() and y.dim() <= 1):
        return False
    lead = first_tensor(x) if not isinstance(x, torch.Tensor) else x
    return y.dim() == 0 or lead.dim() == 0 or y.shape[0] == lead.shape[0]


def _strip_labels(batch: Batch, one_input: bool) -> tuple[Batch, bool]:
    """``(inputs, labels)`` -> inputs; a dict loses its ``labels`` key. Returns (batch, whether labels were dropped)."""
    if isinstance(batch, Mapping):
        kept = {k: v for k, v in batch.items() if k not in _LABEL_KEYS}
        return kept, len(kept) != len(batch)
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, y = batch
        try:
            labels = _labels_like(x, y)
        except TypeError:  # the first item holds no tensor
            labels = False
        if labels and (one_input or not isinstance(x, torch.Tensor)):
            return x, True
    return batch, False


def _has_tensor(batch: Batch) -> bool:
    try:
        first_tensor(batch)
        return True
    except TypeError:
        return False


def _plain_tensors(batch: Batch) -> Batch:
    """Tensors made under ``torch.inference_mode()`` cannot enter autograd: use ordinary copies of those."""
    def fix(x):
        if isinstance(x, torch.Tensor):
            return x.clone() if x.is_inference() else x
        if isinstance(x, Mapping):
            return {k: fix(v) for k, v in x.items()}
        if isinstance(x, (tuple, list)):
            return type(x)(fix(v) for v in x)
        return x
    with torch.inference_mode(False):
        return fix(batch)


def _prepare(batches: Any, what: str, teacher: nn.Module) -> tuple[list[Batch], bool]:
    if batches is None:
        raise DistillError(f"distill needs {what}: an iterable of input batches (tensors, tuples of positional "
                           f"inputs, dicts of keyword inputs, or (inputs, labels) pairs whose labels are ignored)")
    try:
        bl = batches_list(batches)
    except TypeError:
        raise DistillError(f"{what} must be an iterable of batches, got {type(batches).__name__}") from None
    if not bl:
        raise DistillError(f"{what} is empty: distillation needs at least one batch of real inputs")
    one_input = _takes_one_input(teacher)
    out, stripped = [], False
    for i, b in enumerate(bl):
        if not isinstance(b, (torch.Tensor, Mapping, tuple, list)) or not _has_tensor(b):
            raise DistillError(f"{what}: batch {i} is a {type(b).__name__} holding no tensor; a batch is a tensor, "
                               f"a tuple of positional inputs or a dict of keyword inputs")
        b, s = _strip_labels(b, one_input)
        stripped |= s
        out.append(_plain_tensors(b))
    return out, stripped


# ---------------------------------------------------------------- recovery inside optimize()
def recoverable(config: Any) -> bool:
    """Stages whose fidelity distillation can win back (their layers stay trainable float modules)."""
    from .lowrank.config import LowRank
    from .prune.config import ChannelPruning
    return isinstance(config, (ChannelPruning, LowRank))


_RECOVER_KEYS = ("steps", "epochs", "lr", "loss", "temperature", "features", "feature_weight", "val_fraction",
                 "eval_every", "patience", "weight_decay", "batchnorm", "augment", "seed", "max_cache_mb", "threads")
BATCHNORM = ("auto", "frozen", "train")
AUGMENT = ("auto", "mixup", "none")


def recover_options(recover: Any) -> dict[str, Any] | None:
    """``optimize(recover=...)``: None (off), "distill" (defaults) or a dict of distill()'s keyword arguments."""
    if recover is None:
        return None
    if recover == "distill":
        return {}
    if isinstance(recover, Mapping):
        unknown = sorted(set(recover) - set(_RECOVER_KEYS))
        if unknown:
            raise DistillError(f"recover: unknown distill option(s) {unknown}; known: {', '.join(_RECOVER_KEYS)}")
        return dict(recover)
    raise DistillError(f"recover must be 'distill', a dict of distill options or None, got {recover!r}")


# ---------------------------------------------------------------- distill
def _check_args(steps, epochs, lr, loss, temperature, val_fraction, eval_every, patience, weight_decay) -> None:
    for name, v in (("steps", steps), ("epochs", epochs), ("eval_every", eval_every), ("patience", patience)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            what = "no steps to train" if name in ("steps", "epochs") else "at least 1"
            raise DistillError(f"distill: {name} must be an integer >= 1 or None, got {v!r} ({what})")
    if steps is not None and epochs is not None:
        raise DistillError(f"distill: give steps or epochs, not both (got steps={steps}, epochs={epochs})")
    for name, v, lo in (("lr", lr, 0.0), ("temperature", temperature, 0.0)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > lo or not math.isfinite(v):
            raise DistillError(f"distill: {name} must be a positive number, got {v!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise DistillError(f"distill: weight_decay must be >= 0, got {weight_decay!r}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise DistillError(f"distill: val_fraction must be in [0, 1), got {val_fraction!r}")
    if not callable(loss) and loss not in LOSSES:
        raise DistillError(f"distill: loss must be one of {', '.join(map(repr, LOSSES))} or a callable "
                           f"loss(student_out, teacher_out) -> scalar tensor; got {loss!r}")


def _run_error(model: nn.Module, who: str, i: int, b: Batch, e: Exception, where: str) -> DistillError:
    return DistillError(f"the {who} ({type(model).__name__}) fails on {where} batch {i} ({describe_batch(b)}): "
                        f"{type(e).__name__}: {e}")


def distill(student: nn.Module, teacher: nn.Module, batches: Iterable[Batch] | Batch, *,
            steps: int | None = None, epochs: int | None = None, lr: float = 1e-3,
            loss: str | Callable[[Any, Any], torch.Tensor] = "auto", temperature: float = 4.0,
            features: Sequence[str] | Mapping[str, str] | None = None, feature_weight: float = 1.0,
            validation: Iterable[Batch] | None = None, val_fraction: float = 0.2, eval_every: int | None = None,
            patience: int | None = 5, weight_decay: float = 0.0, batchnorm: str = "auto", augment: str = "auto",
            seed: int = 0,
            output_fn: Callable[[Any], torch.Tensor] | None = None,
            eval_fn: Callable[[nn.Module], float] | None = None, max_cache_mb: float = 256.0,
            threads: int | None = None, progress: bool | None = None,
            inplace: bool = False) -> tuple[nn.Module, Report]:
    """Train ``student`` to reproduce ``teacher`` on unlabeled ``batches``; return ``(student, report)``.

    ``batches``: tensors, tuples of positional inputs, dicts of keyword inputs, or ``(inputs, labels)``
    pairs (labels are ignored, as is a dict's ``labels`` key). They are held in memory; the teacher's
    outputs on them are cached (up to ``max_cache_mb``). ``validation`` (default: the last
    ``val_fraction`` of the batches, held out from training) is checked every ``eval_every`` steps; the
    weights with the lowest validation loss are kept and training stops after ``patience`` checks
    without improvement (``None``: never early), counted from a quarter of the steps on (the first updates,
    warming up, may do worse for a while). ``steps`` or ``epochs`` (one of them; default 300 steps).
    AdamW, ``lr`` warmed up over 5% of the steps then decayed along a cosine; deterministic for a given
    ``seed`` (and ``threads``:
    torch's intra-op threads while training, None leaves them; small models train fastest on 1).

    ``loss="auto"``: for classifier logits (a ``logits`` output, or a [batch, classes] tensor) the KL
    divergence of the ``temperature``-softened softmax plus a scale-free MSE of the logits (softmax alone
    lets all logits drift by a constant); cosine + scale-free MSE for embeddings and hidden states
    (``last_hidden_state``, pooled outputs, unit-norm rows, every float tensor of a dict/tuple output);
    MSE for one value per sample. Or force one of ``"kl"``, ``"kl+mse"``, ``"mse"``, ``"cosine"``,
    ``"cosine+mse"`` for every output, or give ``loss(student_out, teacher_out) -> scalar tensor``.
    ``features``: layer names (or ``{student layer: teacher layer}``) whose outputs must match too
    (scale-free MSE, weighted by ``feature_weight``); their shapes must be equal.

    ``batchnorm``: how the student's BatchNorm layers train. ``"frozen"``: in eval mode, their statistics
    fixed and their scale and shift trained, so the student trains as it will run (batch statistics of small
    batches are noisy, and running averages with a small momentum lag far behind the weights they follow).
    ``"auto"`` (default): first re-estimate the statistics on the training batches where that brings the
    student closer to the teacher on a validation batch (stale statistics after a transform), then frozen.
    ``"train"``: train mode, the statistics estimated as it trains.

    ``augment``: ``"mixup"`` trains on blends as well: each pass over the training batches takes every batch
    once as it is and once freshly blended (every sample mixed with another of its batch, new weights each
    time, ``torchfast.distill_mixup``), the teacher's outputs on the blends as targets: the
    student then matches the teacher between the given inputs too, which is what carries over to inputs it
    never saw (the validation batches are never blended). ``"auto"`` (default): mixup where every training
    batch holds only floating-point tensors (images, audio, features), none for token ids. ``"none"``: off.

    The teacher is run in eval mode without gradients and left as it was. The student trains in train
    mode (its BatchNorm layers as ``batchnorm`` says) and comes back in eval mode; ``inplace=False`` (default)
    trains a copy, ``inplace=True`` trains ``student`` itself. A failure raises DistillError and changes
    nothing. The report holds the fidelity to the teacher on the validation batches before and after.
    """
    check_module(student, "student")
    check_module(teacher, "teacher")
    if student is teacher:
        raise DistillError("student and teacher are the same module: distill a transformed copy "
                           "(prune/decompose with inplace=False) against the original")
    _check_args(steps, epochs, lr, loss, temperature, val_fraction, eval_every, patience, weight_decay)
    if not isinstance(batchnorm, str) or batchnorm not in BATCHNORM:
        raise DistillError(f"distill: batchnorm must be one of {', '.join(map(repr, BATCHNORM))}, got {batchnorm!r}")
    if not isinstance(augment, str) or augment not in AUGMENT:
        raise DistillError(f"distill: augment must be one of {', '.join(map(repr, AUGMENT))}, got {augment!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise DistillError(f"distill: threads must be an integer >= 1 or None, got {threads!r}")
    if isinstance(feature_weight, bool) or not isinstance(feature_weight, (int, float)) or feature_weight < 0:
        raise DistillError(f"distill: feature_weight must be >= 0, got {feature_weight!r}")
    pairs = feature_pairs(features, student, teacher)
    data, stripped = _prepare(batches, "batches", teacher)
    if validation is not None:
        val, _ = _prepare(validation, "validation", teacher)
        train, held = data, "the validation batches given"
    elif len(data) >= 2 and val_fraction > 0:
        k = min(len(data) - 1, max(1, round(len(data) * val_fraction)))
        train, val = data[:-k], data[-k:]
        held = f"the last {k} of the {len(data)} batches, held out from training"
    else:
        train, val = data, data
        held = "the training batches (too few to hold any out)"
    total = steps if steps is not None else (epochs * len(train) if epochs is not None else DEFAULT_STEPS)
    why_not = None if augment == "none" else \
        next((f"training batch {i}: {w}" for i, w in ((i, mixable(b)) for i, b in enumerate(train)) if w), None)
    if augment == "mixup" and why_not:
        raise DistillError(f"distill: augment='mixup' cannot blend {why_not}; use augment='none'")
    mixup = augment == "mixup" or (augment == "auto" and why_not is None)
    every = eval_every or max(1, total // 20)
    if inplace:
        shared = {p.data_ptr() for p in teacher.parameters()} & {p.data_ptr() for p in student.parameters()}
        if shared:
            raise DistillError("the student shares parameters with the teacher (a transform run with inplace=True "
                               "on the original?); training it would change the teacher: pass inplace=False")
        work = student
    else:
        work = copy.deepcopy(student)
    params = [p for p in work.parameters() if p.requires_grad and p.is_floating_point()]
    if not params:
        raise DistillError(f"the student ({type(student).__name__}) has no trainable floating-point parameters "
                           f"(a quantized model? distill before quantizing)")

    saved = {k: v.detach().clone() for k, v in work.state_dict().items()} if inplace else None
    flags = training_flags(work, teacher)
    try:
        metric_before = None
        if eval_fn is not None:
            with evaluating(work):
                metric_before = float(eval_fn(work))
        # the seed must not move the caller's random streams: fork the CPU's and those of the models' GPUs
        gpus = sorted({d.index if d.index is not None else torch.cuda.current_device()
                       for d in (model_device(work), model_device(teacher)) if d.type == "cuda"})
        with torch.inference_mode(False), torch.random.fork_rng(devices=gpus), fixed_threads(threads):
            rows, summary, before = _train(work, teacher, train, val, pairs, total, every, patience, lr,
                                           weight_decay, loss, temperature, feature_weight, seed, output_fn,
                                           max_cache_mb, progress, batchnorm, mixup)
        work.eval()
        with evaluating(teacher):
            after = fidelity(teacher, work, val, output_fn=output_fn)
        metric_after = None if eval_fn is None else float(eval_fn(work))
    except BaseException as e:
        restore_training_flags(flags)
        if saved is not None:
            work.load_state_dict(saved)
        for p in params:
            p.grad = None
        if isinstance(e, Exception) and not isinstance(e, TorchfastError):
            raise DistillError(f"distill failed: {type(e).__name__}: {e}") from e
        raise
    own = set(work.modules())
    restore_training_flags({m: f for m, f in flags.items() if m not in own})  # the teacher's, as they were
    rep = Report("distill")
    rep.summary.update(summary)
    for key, f0, f1 in (("cosine", before.cosine, after.cosine), ("top-1 agreement", before.top1_agreement,
                                                                     after.top1_agreement),
                        ("rel err", before.rel_err, after.rel_err)):
        rep.summary[f"{key} before"], rep.summary[f"{key} after"] = f0, f1
    if eval_fn is not None:
        rep.summary["metric before"], rep.summary["metric after"] = metric_before, metric_after
    rep.rows = rows
    rep.note(f"fidelity to the teacher on {len(val)} validation batch(es): {held}.")
    if stripped:
        rep.note("labels in the batches were ignored: the teacher's outputs are the only targets.")
    return work, rep


def _schedule(total: int) -> Callable[[int], float]:
    """lr factor at step k: a linear warm-up over the first 5% of the steps, then a cosine decay to 0."""
    warm = max(1, total // 20)

    def factor(k: int) -> float:
        if k < warm:
            return (k + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(k - warm, total - warm) / max(1, total - warm)))
    return factor


def _batchnorm_mode(work: nn.Module, teacher: nn.Module, train: list, val: list, mode: str) -> dict[str, Any]:
    """The student's BatchNorm layers to keep in eval mode while it trains, and what was done to them."""
    from .prune.recalibrate import batchnorms, recalibrate_batchnorm
    bns = batchnorms(work)
    done: dict[str, Any] = {"mode": mode if bns else "none", "layers": [], "re-estimated": False}
    if not bns or mode == "train":
        return done
    done["layers"] = list(bns.values())
    if mode == "auto":
        with evaluating(teacher):
            done["re-estimated"] = recalibrate_batchnorm(work, teacher, [*train, val[-1]])["kept"]
        done["mode"] = "frozen, statistics re-estimated first" if done["re-estimated"] else "frozen"
    return done


def _train(work, teacher, train, val, pairs, total, every, patience, lr, weight_decay, loss, temperature,
           feature_weight, seed, output_fn, max_cache_mb, progress, batchnorm, mixup):
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    torch.manual_seed(seed)
    order = torch.Generator().manual_seed(seed)
    s_dev, t_dev = model_device(work), model_device(teacher)
    s_taps = Taps(work, [s for s, _ in pairs])
    t_taps = Taps(teacher, [t for _, t in pairs])
    cache: dict[tuple[str, int], tuple[Any, dict]] = {}
    cached_bytes = [0]

    def teacher_out(split: str, i: int, b: Batch) -> tuple[Any, dict]:
        keep = split != "blended training"   # a fresh blend is never drawn twice
        hit = cache.get((split, i)) if keep else None
        if hit is not None:
            return hit
        try:
            with torch.no_grad():
                out = call_model(teacher, move_batch(b, t_dev))
        except Exception as e:
            raise _run_error(teacher, "teacher", i, b, e, split) from e
        feats = {k: v.detach() for k, v in t_taps.take().items()}
        raw = out
        if not callable(loss):
            raw = {k: v.detach() for k, v in targets(out, output_fn).items()}
        size = sum(v.numel() * v.element_size() for v in [*feats.values(), *(raw.values() if isinstance(raw, dict)
                                                                             else [])])
        if keep and cached_bytes[0] + size <= max_cache_mb * 2 ** 20:
            cache[(split, i)] = (raw, feats)
            cached_bytes[0] += size
        return raw, feats

    kinds: dict[str, str] = {}

    def batch_loss(split: str, i: int, b: Batch) -> torch.Tensor:
        t_out, t_feats = teacher_out(split, i, b)
        try:
            s_raw = call_model(work, move_batch(b, s_dev))
        except Exception as e:
            raise _run_error(work, "student", i, b, e, split) from e
        s_feats = s_taps.take()
        if callable(loss):
            total_loss = loss(s_raw, t_out)
            if not (isinstance(total_loss, torch.Tensor) and total_loss.numel() == 1):
                raise DistillError(f"the loss callable must return a scalar tensor, got {type(total_loss).__name__}")
        else:
            s_out = targets(s_raw, output_fn)
            mask = token_mask(b)
            parts = []
            for name, t in t_out.items():
                s = s_out.get(name)
                if s is None or s.shape != t.shape:
                    got = "nothing" if s is None else f"shape {tuple(s.shape)}"
                    raise DistillError(f"the student's output {name!r} is {got} but the teacher's is "
                                       f"{tuple(t.shape)} (batch {i}): distillation matches equal outputs")
                kind = kinds.setdefault(name, loss_kind(name, t, loss))
                parts.append(pair_loss(kind, s, t.to(s.device), temperature, mask))
            total_loss = torch.stack(parts).mean()
        if pairs:
            f_parts = []
            for s_name, t_name in pairs:
                s, t = s_feats.get(s_name), t_feats.get(t_name)
                if s is None or t is None:
                    who, n = ("student", s_name) if s is None else ("teacher", t_name)
                    raise DistillError(f"feature layer {n!r} of the {who} did not run on {split} batch {i}")
                if s.shape != t.shape:
                    raise DistillError(f"feature layers do not match: the student's {s_name!r} outputs "
                                       f"{tuple(s.shape)} but the teacher's {t_name!r} outputs {tuple(t.shape)}; "
                                       f"match layers whose outputs keep their shape (a pruned layer has fewer "
                                       f"channels, e.g. match block outputs instead)")
                f_parts.append(pair_loss("mse", s, t.to(s.device), temperature, mask))
            total_loss = total_loss + feature_weight * torch.stack(f_parts).mean()
        return total_loss

    def val_loss() -> float:
        with torch.no_grad(), evaluating(work):
            return float(sum(float(batch_loss("validation", i, b)) for i, b in enumerate(val)) / len(val))

    bar = tqdm(total=total, desc="distill", unit="step", disable=(not progress) if progress is not None else None,
               leave=False)
    try:
        with evaluating(teacher):
            best = val_loss()   # also checks both models, the outputs and the features before any training
            norms = _batchnorm_mode(work, teacher, train, val, batchnorm)   # statistics of real inputs
            if norms["re-estimated"]:
                best = val_loss()
            first = best
            best_state = {k: v.detach().clone() for k, v in work.state_dict().items()}
            with evaluating(work):
                before = fidelity(teacher, work, val, output_fn=output_fn)
            opt = torch.optim.AdamW([p for p in work.parameters() if p.requires_grad and p.is_floating_point()],
                                    lr=lr, weight_decay=weight_decay)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(total))
            rows = [{"step": 0, "train loss": None, "validation loss": best, "best": True}]
            step, best_step, stale, stopped, run = 0, 0, 0, "all steps", []
            perm: list[int] = []
            work.train()
            for m in norms["layers"]:
                m.eval()
            n, blends = len(train), 0
            while step < total:
                if not perm:   # each pass: every batch once as it is, and with mixup once freshly blended
                    perm = torch.randperm(2 * n if mixup else n, generator=order).tolist()
                i = perm.pop()
                with torch.enable_grad():
                    if i < n:
                        l = batch_loss("training", i, train[i])
                    else:
                        i -= n
                        blends += 1
                        l = batch_loss("blended training", i, mixed_copies([train[i]])[0])
                    if not torch.isfinite(l):
                        raise DistillError(f"the distillation loss is {float(l.detach())} at step {step + 1} (training "
                                           f"batch {i}): lower lr (now {lr})")
                    opt.zero_grad(set_to_none=True)
                    l.backward()
                    opt.step()
                sched.step()
                step += 1
                run.append(float(l.detach()))
                bar.update(1)
                if step % every == 0 or step == total:
                    v = val_loss()
                    improved = v < best - 1e-4 * abs(best) - 1e-12
                    rows.append({"step": step, "train loss": sum(run) / len(run), "validation loss": v,
                                 "best": improved})
                    bar.set_postfix(loss=f"{sum(run) / len(run):.4g}", val=f"{v:.4g}")
                    run = []
                    if improved:
                        best, best_step, stale = v, step, 0
                        best_state = {k: x.detach().clone() for k, x in work.state_dict().items()}
                    elif step >= total // 4:   # patience counts from a quarter of the steps: the first
                        stale += 1             # updates, warming up, may well do worse for a while
                        if patience is not None and stale >= patience and step < total:
                            stopped = f"early at step {step}: no better validation loss in {patience} checks"
                            break
    finally:
        bar.close()
        s_taps.close()
        t_taps.close()
    work.load_state_dict(best_state)
    for p in work.parameters():
        p.grad = None
    kinds_text = ", ".join(f"{k}: {v.replace('kl', f'kl (T={temperature:g})')}" for k, v in kinds.items())
    summary = {
        "loss": "callable" if callable(loss) else kinds_text,
        "features": ", ".join(s if s == t else f"{s} -> {t}" for s, t in pairs) or "none",
        "steps": step, "planned steps": total, "epochs": step / len(train), "stopped": stopped,
        "best step": best_step, "batchnorm": norms["mode"], "training batches": len(train), "validation batches": len(val),
        "augment": f"mixup ({blends} freshly blended batches)" if mixup else "none",
        "validation loss before": first, "validation loss after": best, "lr": lr, "seed": seed,
        "time (s)": time.perf_counter() - t_start,
    }
    return rows, summary, before



# ``torchfast.distill`` is both this module and the public function ``tf.distill(student, teacher, ...)``:
# importing the module binds it to ``torchfast.distill``, so the module itself is callable (as ``torchfast.prune``).
import sys as _sys
import types as _types


class _CallableModule(_types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> tuple[nn.Module, Report]:
        return distill(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
