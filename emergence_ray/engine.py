"""The math: one training epoch and one evaluation pass, in plain torch.

Both take a model and an iterable of `{"image": (N,C,H,W) float, "label": (N,) int}` batches
and import nothing from Ray, so they run the same under Ray Train, in a benchmark or a test.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

Batch = dict[str, torch.Tensor]


@dataclass
class Totals:
    """Sums over a pass; add them across workers, then read the means."""

    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0
    seconds: float = 0.0
    nonfinite_step: int = -1  # train_epoch: first step whose loss was NaN / inf; -1 = none
    predictions: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)
    probabilities: list[torch.Tensor] = field(default_factory=list)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1, self.count)

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.count)


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _with_last(batches: Iterable[Batch]) -> Iterator[tuple[Batch, bool]]:
    """Each batch with whether it is the epoch's last (an accumulation group ends there)."""
    it = iter(batches)
    try:
        current = next(it)
    except StopIteration:
        return
    for following in it:
        yield current, False
        current = following
    yield current, True


def train_epoch(model: nn.Module, batches: Iterable[Batch], optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler | None, device: torch.device,
                label_smoothing: float = 0.0, bf16: bool = False,
                on_step: Callable[[int], None] | None = None, grad_accum_steps: int = 1,
                grad_clip: float | None = None, mix: Callable | None = None,
                after_update: Callable[[], None] | None = None) -> Totals:
    """One pass over `batches`. Recipe switches (all off by default):

    - `grad_accum_steps`: one optimizer (and scheduler) step per that many batches, on the mean of
      their losses; under DDP (`model.no_sync`) gradients are all-reduced only on the last one.
      A shorter last group is rescaled to its own mean.
    - `grad_clip`: clip the global gradient norm before each optimizer step.
    - `mix(images, labels) -> (images, soft labels)`: MixUp / CutMix on the batch (the loss takes
      the soft labels; accuracy is counted against the original labels).
    - `after_update()`: called after each optimizer step (the EMA of the weights updates there).
    """
    model.train()
    totals = Totals()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    nonfinite = torch.full((), -1, device=device, dtype=torch.long)  # on device: no sync per step
    params = [p for group in optimizer.param_groups for p in group["params"]]
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    in_group = 0
    for step, (batch, last) in enumerate(_with_last(batches)):
        x = batch["image"].to(device, non_blocking=True)
        y = batch["label"].to(device, non_blocking=True)
        target = y
        if mix is not None:
            x, target = mix(x, y)
        in_group += 1
        update = in_group == grad_accum_steps or last
        sync = contextlib.nullcontext() if update or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(device, bf16):
                logits = model(x)
                loss = F.cross_entropy(logits, target, label_smoothing=label_smoothing)
            (loss / grad_accum_steps).backward()
        if update:
            if in_group != grad_accum_steps:  # a short last group: the mean over its own batches
                for p in params:
                    if p.grad is not None:
                        p.grad.mul_(grad_accum_steps / in_group)
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()
            if after_update is not None:
                after_update()
            in_group = 0
        # accumulate on device: no host sync per batch
        loss_sum += loss.detach() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        nonfinite.masked_fill_((nonfinite < 0) & ~torch.isfinite(loss.detach()), step)
        totals.count += len(y)
        if on_step is not None:
            on_step(step)
    totals.loss_sum = float(loss_sum)
    totals.correct = int(correct)
    totals.nonfinite_step = int(nonfinite)
    totals.seconds = time.perf_counter() - start
    return totals


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], device: torch.device, bf16: bool = False,
             collect: bool = False) -> Totals:
    """Mean cross-entropy and accuracy; with `collect`, also every prediction, label and
    probability vector (for reports and batch inference)."""
    model.eval()
    totals = Totals()
    start = time.perf_counter()
    for batch in batches:
        x = batch["image"].to(device, non_blocking=True)
        with autocast(device, bf16):
            logits = model(x).float()
        pred = logits.argmax(1)
        if "label" in batch:
            y = batch["label"].to(device)
            totals.loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            totals.correct += int((pred == y).sum())
            if collect:
                totals.labels.append(y.cpu())
        totals.count += len(x)
        if collect:
            totals.predictions.append(pred.cpu())
            totals.probabilities.append(logits.softmax(1).cpu())
    totals.seconds = time.perf_counter() - start
    return totals
