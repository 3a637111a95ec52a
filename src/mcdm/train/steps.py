"""The one step helper of the small models trained outside the DeepSpeed engine (the tiny VAE and UNet
of ``base_models``, SyncNet, the motion encoders): each trains in one process for a few hundred steps,
so the engine's checkpoints and ranks would only add weight. What their loops share lives here, once:

    loop = StepLoop(model.parameters(), optimizer, steps, clip_grad=1.0, desc="tiny VAE")
    for step in loop:                      # 1 .. steps, with a progress bar
        loss = loss_of(next_batch())       # the caller's own batch and loss
        loop.step(loss)                    # zero_grad, backward, clip, optimizer + scheduler step
        if step % 100 == 0:
            loop.show(psnr=...)            # numbers beside the bar; ``break`` stops early

The MCDM stages train through :func:`mcdm.train.engine.train_loop` instead (DeepSpeed, checkpoints,
resume, several ranks).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Optional

import torch
from tqdm.auto import tqdm


class StepLoop:
    """Optimizer steps over ``parameters``; the caller computes each step's loss (see the module docstring)."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], optimizer: torch.optim.Optimizer, steps: int, *,
                 scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None, clip_grad: Optional[float] = None,
                 desc: str = "training", progress: bool = True):
        self.parameters = list(parameters)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.steps, self.clip_grad = int(steps), clip_grad
        self.desc, self.progress = desc, progress
        self.losses: list[float] = []  # one per step taken
        self.bar = None

    def __iter__(self) -> Iterator[int]:
        with tqdm(total=self.steps, desc=self.desc, unit="step", dynamic_ncols=True, disable=not self.progress) as bar:
            self.bar = bar
            yield from range(1, self.steps + 1)

    def step(self, loss: torch.Tensor) -> float:
        """One optimizer step on ``loss`` (a scalar with a graph); returns its value."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(self.parameters, self.clip_grad)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        value = float(loss.detach())
        self.losses.append(value)
        self.bar.update(1)
        return value

    def show(self, **numbers) -> None:
        """Numbers beside the progress bar (e.g. the held-out metric of an evaluation step)."""
        self.bar.set_postfix(**numbers)

    def mean_loss(self, last: int) -> float:
        """Mean of the last ``last`` step losses."""
        tail = self.losses[-last:]
        return sum(tail) / max(len(tail), 1)
