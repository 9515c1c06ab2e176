"""Training checkpoints that a later run resumes from exactly.

``<out>/checkpoints/step-NNNNNN/`` holds ``model/`` (a loadable Hugging Face checkpoint) and
``trainer.pt``: optimizer, scheduler, the torch RNG (dropout is the only randomness drawn while
training), the step, the data position (groups consumed) and the loss/dev history, plus the
configuration, so a resume with a different one is refused instead of silently diverging.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

TRAINER_FILE = "trainer.pt"
MODEL_SUBDIR = "model"


@dataclass
class TrainState:
    step: int = 0
    seen: int = 0  # groups consumed: the position in the data stream
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    dev: list[tuple[int, float]] = field(default_factory=list)  # (step, dev nDCG@10)


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:06d}"


def latest_checkpoint(out: Path) -> Path:
    found = sorted((out / "checkpoints").glob("step-[0-9]*[0-9]"))
    if not found:
        raise FileNotFoundError(f"no checkpoint under {out / 'checkpoints'} to resume from")
    return found[-1]


def save_trainer_state(
    target: Path,
    write_model: Callable[[Path], object],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainState,
    config: dict[str, Any],
) -> Path:
    """Write the checkpoint beside ``target`` and rename it into place, so an interrupted save
    never leaves a half-written checkpoint for ``--resume`` to pick up."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    write_model(partial / MODEL_SUBDIR)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "step": state.step,
            "seen": state.seen,
            "losses": state.losses,
            "dev": state.dev,
            "config": config,
        },
        partial / TRAINER_FILE,
    )
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return torch.load(checkpoint / TRAINER_FILE, weights_only=True)


def restore(
    saved: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> TrainState:
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    return TrainState(
        saved["step"], saved["seen"], list(saved["losses"]), [tuple(d) for d in saved["dev"]]
    )
