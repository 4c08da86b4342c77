"""The math: one training epoch and one evaluation pass, in plain torch.

Both take a model and an iterable of `{"image": (N,C,H,W) float, "label": (N,) int}` batches
and import nothing from Ray, so they run the same under Ray Train, in a benchmark or a test.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from collections.abc import Callable, Iterable

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


def train_epoch(model: nn.Module, batches: Iterable[Batch], optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler | None, device: torch.device,
                label_smoothing: float = 0.0, bf16: bool = False,
                on_step: Callable[[int], None] | None = None) -> Totals:
    model.train()
    totals = Totals()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    nonfinite = torch.full((), -1, device=device, dtype=torch.long)  # on device: no sync per step
    start = time.perf_counter()
    for step, batch in enumerate(batches):
        x = batch["image"].to(device, non_blocking=True)
        y = batch["label"].to(device, non_blocking=True)
        with autocast(device, bf16):
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
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
