"""Fine-tuning a cross-encoder on training groups, resumable step for step.

Writes under ``out``: ``checkpoints/step-NNNNNN/`` (see checkpoints.py), ``final/`` (the final
checkpoint, the input of ``crossrank export``), ``history.json`` and ``report.png``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedModel, get_linear_schedule_with_warmup

from crossrank.model.tokenization import PairTokenizer
from crossrank_train.checkpoints import (
    MODEL_SUBDIR,
    TrainState,
    checkpoint_dir,
    load_trainer_state,
    restore,
    save_trainer_state,
)
from crossrank_train.encoding import encode_groups
from crossrank_train.evaluate import EvalSet, measure, rerank
from crossrank_train.groups import Group, read_groups
from crossrank_train.losses import LOSSES, group_loss, needs_teacher
from crossrank_train.models import (
    load_cross_encoder,
    read_provenance,
    save_checkpoint,
    tokenizer_file,
    uses_token_types,
)
from crossrank_train.provenance import git_commit
from crossrank_train.report import write_report
from crossrank_train.scoring import TorchScorer

log = logging.getLogger(__name__)

FINAL_SUBDIR = "final"
# Settings that do not change the trajectory, so a resumed run may differ in them.
RESUMABLE_CHANGES = {"out", "resume", "save_every", "eval_every"}


@dataclass
class TrainConfig:
    model: Path  # Hugging Face checkpoint directory to start from
    groups: Path  # training groups JSONL (crossrank mine)
    out: Path
    loss: str = "lce"
    negatives: int = 7  # per group; groups with more are cut to their first ones
    batch_groups: int = 4  # groups per forward pass: (1 + negatives) pairs each
    accumulation: int = 1  # forward passes per optimizer step
    steps: int = 0  # optimizer steps; 0: as many as `epochs` takes
    epochs: float = 1.0
    lr: float = 2e-5
    head_lr: float = 0.0  # learning rate of the parameters a fresh head adds; 0: `lr`
    # learning rate of the fresh parameters a model declares inside its base (the gated model's
    # cross-attention gates); 0: `head_lr`
    gate_lr: float = 0.0
    weight_decay: float = 0.01
    warmup: float = 0.1  # fraction of the steps with a linearly rising learning rate
    max_grad_norm: float = 1.0
    pos_weight: float = 0.0  # bce: weight of positives; 0 balances them: `negatives`
    distill_weight: float = 0.0  # bce/lce: weight of a MarginMSE term on the groups' teacher scores
    # every dropout layer's probability while training; None: as the model is configured. With a
    # self-teacher, 0 makes the distillation term exactly 0 at step 0 rather than dropout noise.
    dropout: float | None = None
    bf16: bool = False
    seed: int = 0
    max_query_tokens: int = 64
    max_length: int = 512
    save_every: int = 0  # steps between checkpoints; 0: only at the end
    eval_every: int = 0  # steps between dev evaluations; 0: only at the end
    resume: Path | None = None  # a checkpoint directory to continue from

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; expected one of {LOSSES}")
        if self.distill_weight < 0 or (self.distill_weight and self.loss == "margin-mse"):
            raise ValueError("distill_weight: a weight >= 0 of MarginMSE beside bce or lce")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ValueError(f"dropout: a probability in [0, 1), not {self.dropout}")

    def as_record(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


@dataclass
class TrainResult:
    model: Path  # the final checkpoint
    state: TrainState
    report: Path


class GroupStream:
    """The groups in a fresh seeded order each epoch, read as one stream. The number of groups
    consumed is the whole data position: the order of every epoch follows from (seed, epoch)."""

    def __init__(self, groups: list[Group], seed: int, seen: int) -> None:
        self.groups = groups
        self.seed = seed
        self.seen = seen
        self._epoch = -1
        self._epoch_order = np.arange(0)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._epoch_order = epoch, rng.permutation(len(self.groups))
        return self._epoch_order

    def take(self, count: int) -> list[Group]:
        batch = []
        for position in range(self.seen, self.seen + count):
            epoch, offset = divmod(position, len(self.groups))
            batch.append(self.groups[self._order(epoch)[offset]])
        self.seen += count
        return batch


def bf16_supported() -> bool:
    # torch has no public query; these are the instructions its CPU bf16 kernels need to be
    # faster than fp32 rather than emulated.
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def _optimizer(model: PreTrainedModel, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with three learning rates and no weight decay on biases, norms and scalars (the
    parameters of fewer than 2 dims): ``lr`` for the pretrained base model, ``head_lr`` for every
    parameter outside it, ``gate_lr`` for those a model names in ``fresh_parameters`` (the gated
    model's cross-attention gates: scalars that must travel far from 0 in a few hundred steps,
    while the head's 384-wide weights would swing the logits at that rate). Without ``gate_lr``
    those train with the head, as runs from before it did."""
    base = model.base_model_prefix + "."
    fresh = tuple(getattr(model, "fresh_parameters", ()))
    rates = {"base": config.lr, "head": config.head_lr or config.lr, "gate": config.gate_lr}

    def role(name: str) -> str:
        is_fresh = any(part in name for part in fresh)
        if is_fresh and config.gate_lr:
            return "gate"
        return "head" if is_fresh or not name.startswith(base) else "base"

    # Groups in a fixed order (a resumed run's optimizer state is matched to them by position).
    groups = []
    for kind, lr in rates.items():
        for decays in (True, False):
            chosen = [
                p
                for name, p in model.named_parameters()
                if p.requires_grad and role(name) == kind and (p.ndim > 1) == decays
            ]
            if chosen:
                decay = config.weight_decay if decays else 0.0
                groups.append({"params": chosen, "lr": lr, "weight_decay": decay})
    return torch.optim.AdamW(groups, lr=config.lr)


def _check_resumable(saved: dict[str, Any], now: dict[str, Any]) -> None:
    """``saved`` and ``now``: a run's settings record (``_run_record``)."""
    # A setting newer than the checkpoint was trained at its default.
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    saved = {**defaults, **saved}
    changed = sorted(k for k, v in saved.items() if k not in RESUMABLE_CHANGES and now.get(k) != v)
    if changed:
        raise ValueError(
            "cannot resume: the checkpoint was trained with different settings: "
            + ", ".join(f"{k}={saved[k]!r} (now {now.get(k)!r})" for k in changed)
        )


def _run_record(config: TrainConfig, groups: list[Group]) -> dict[str, Any]:
    """The settings a resume must match: the config and how many groups it trains on (a dev set
    that leaves out other groups would change the data order)."""
    return {**config.as_record(), "training_groups": len(groups)}


def _check_groups(groups: list[Group], config: TrainConfig) -> None:
    if not groups:
        raise ValueError(f"{config.groups} holds no training groups")
    if needs_teacher(config.loss, config.distill_weight) and any(
        g.teacher_scores is None or len(g.teacher_scores) != len(g.passages) for g in groups
    ):
        raise ValueError(
            f"{config.loss} with distillation needs teacher scores for every passage of every "
            f"group in {config.groups}; score them with `crossrank teach` (or mine with --teacher)"
        )


def _without_dev_queries(groups: list[Group], dev: EvalSet) -> list[Group]:
    """The groups whose query is not one of the dev set's: a dev set drawn from a training
    source (e.g. its first queries) stays held out without a split file of its own."""
    held_out = set(dev.queries.values())
    kept = [g for g in groups if g.query not in held_out]
    if groups and not kept:
        raise ValueError("every training group's query is a dev query: nothing is left to train on")
    if len(kept) < len(groups):
        log.info("left out %d groups whose query is a dev query", len(groups) - len(kept))
    return kept


def _dev_ndcg(scorer: TorchScorer, dev: EvalSet) -> float:
    return measure(dev.qrels, rerank(scorer, dev))["nDCG@10"]


def train(config: TrainConfig, dev: EvalSet | None = None) -> TrainResult:
    torch.manual_seed(config.seed)
    groups = read_groups(config.groups, config.negatives)
    if dev is not None:
        groups = _without_dev_queries(groups, dev)
    _check_groups(groups, config)
    saved = load_trainer_state(config.resume) if config.resume else None
    if saved is not None:
        _check_resumable(saved["config"], _run_record(config, groups))
    tokenizer_path = tokenizer_file(config.model)
    model = load_cross_encoder(config.resume / MODEL_SUBDIR if config.resume else config.model)
    if config.dropout is not None:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = config.dropout
    tokenizer = PairTokenizer(tokenizer_path, config.max_query_tokens, config.max_length)
    token_types = uses_token_types(model)
    bf16 = config.bf16 and bf16_supported()
    if config.bf16 and not bf16:
        log.warning("this CPU has no native bf16 (AVX512-BF16/AMX): training in fp32")

    per_step = config.batch_groups * config.accumulation
    steps = config.steps or math.ceil(config.epochs * len(groups) / per_step)
    optimizer = _optimizer(model, config)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup * steps), steps)
    state = restore(saved, optimizer, scheduler) if saved is not None else TrainState()
    stream = GroupStream(groups, config.seed, state.seen)
    pos_weight = config.pos_weight or float(config.negatives)
    scorer = TorchScorer(model, tokenizer, name="dev")
    provenance = {
        "base_model": read_provenance(config.model).get("base_model", str(config.model)),
        "data": str(config.groups),
        "training_groups": len(groups),
        "loss": config.loss,
        "max_query_tokens": config.max_query_tokens,
        "max_length": config.max_length,
        "bf16": bf16,
        "git_commit": git_commit(),
        "config": config.as_record(),
    }

    def write_model(target: Path) -> Path:
        record = {**provenance, "steps": state.step, "groups_seen": state.seen}
        if state.losses:
            recent = state.losses[-min(len(state.losses), 20) :]
            record["final_loss"] = float(np.mean(recent))
        if state.dev:
            record["dev_ndcg@10"] = state.dev[-1][1]
        return save_checkpoint(model, tokenizer_path, target, record)

    config.out.mkdir(parents=True, exist_ok=True)
    report = config.out / "report.png"
    title = f"{config.loss} from {Path(provenance['base_model']).name}"
    model.train()
    progress = tqdm(total=steps, initial=state.step, desc="training", unit="step")
    while state.step < steps:
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(config.accumulation):
            batch = stream.take(config.batch_groups)
            inputs = encode_groups(tokenizer, batch, token_types)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(**inputs).logits[:, 0].view(len(batch), -1)
            teacher = (
                torch.tensor([g.teacher_scores for g in batch])
                if needs_teacher(config.loss, config.distill_weight)
                else None
            )
            loss = group_loss(config.loss, logits, teacher, pos_weight, config.distill_weight)
            (loss / config.accumulation).backward()
            step_loss += loss.item() / config.accumulation
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        state.step += 1
        state.seen = stream.seen
        state.losses.append(step_loss)
        progress.update()
        progress.set_postfix(loss=f"{step_loss:.4f}")
        last = state.step == steps
        due = last or (config.eval_every and state.step % config.eval_every == 0)
        if dev is not None and due:
            state.dev.append((state.step, _dev_ndcg(scorer, dev)))
            log.info("step %d: dev nDCG@10 %.4f", state.step, state.dev[-1][1])
        if last or (config.save_every and state.step % config.save_every == 0):
            save_trainer_state(
                checkpoint_dir(config.out, state.step),
                write_model,
                optimizer,
                scheduler,
                state,
                _run_record(config, groups),
            )
            write_report(report, state, title)
    progress.close()
    final = write_model(config.out / FINAL_SUBDIR)
    history = {"losses": state.losses, "dev_ndcg@10": state.dev}
    (config.out / "history.json").write_text(json.dumps(history) + "\n")
    write_report(report, state, title)
    return TrainResult(final, state, report)
