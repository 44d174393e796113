"""The training loop: optimizer and learning-rate schedule, gradient-accumulated steps on the
answer-only loss (plus soft-target KL), and periodic evals that keep the best adapter, checkpoint
and stop early."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aad_core.errors import AADError
from aad_plugins.qlora.checkpoints import CHECKPOINT_DIR, out_of_patience, record_eval, save_checkpoint
from aad_plugins.qlora.console import progress_bar
from aad_plugins.qlora.data import BatchSchedule, Encoded, StepPlan, TrainingData

if TYPE_CHECKING:
    import torch

    from aad_plugins.qlora.curriculum import Curriculum


def assert_adapter_grads(model: Any) -> float:
    """Raise :class:`AADError` unless some LoRA parameter has a non-zero gradient; return the grad norm."""
    total, n_lora = 0.0, 0
    for name, p in model.named_parameters():
        if "lora_" not in name:
            continue
        n_lora += 1
        if p.grad is not None:
            total += float(p.grad.detach().float().pow(2).sum())
    if n_lora == 0 or total == 0.0 or not math.isfinite(total):
        raise AADError(
            f"The LoRA adapter got no gradient after the first training step ({n_lora} adapter tensors, "
            f"squared grad norm {total}): training would change nothing.",
            hint="On CPU use quantization = \"none\" (4-bit bitsandbytes weights on CPU can silently stop "
            "gradients); check that target_modules name linear layers of this student.",
        )
    return math.sqrt(total)


def lr_multiplier(kind: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """The factor on the learning rate of optimizer step ``s`` (0-based): linear warm-up over
    ``warmup_steps``, then constant, or a linear / cosine decay towards 0 at ``total_steps`` (as
    transformers' schedules: the last step still gets a small, non-zero rate)."""

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = min(1.0, (s - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def make_optimizer(params: list[Any], learning_rate: float, *, four_bit: bool) -> Any:
    """Paged AdamW 8-bit for a 4-bit base (QLoRA), plain AdamW otherwise."""
    if four_bit:
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=learning_rate)
    import torch

    return torch.optim.AdamW(params, lr=learning_rate)


def make_scheduler(optimizer: Any, kind: str, total_steps: int, warmup_ratio: float) -> Any:
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multiplier(kind, total_steps, max(1, int(warmup_ratio * total_steps))))


def distill_loss(model: Any, batch: dict[str, torch.Tensor], soft: list[Any], teacher: Any, *, alpha: float,
                 temperature: float) -> torch.Tensor:
    """``alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T)`` on the answer tokens; plain CE
    when no teacher distribution is known for the batch."""
    import torch

    from aad_core.models.chat_format import answer_logits
    from aad_core.models.teacher_signal import kl_topk_tail, soft_target_kl

    logits, labels, s0 = answer_logits(model, batch)
    logits = logits.float()
    mask = labels != -100
    ce = torch.nn.functional.cross_entropy(logits[mask], labels[mask])
    if alpha >= 1.0 or (teacher is None and not any(s is not None for s in soft)):
        return ce
    T = temperature
    kls = []
    if teacher is not None:
        t_lp = teacher.answer_logprobs(batch["input_ids"], batch["attention_mask"], temperature=T)[:, s0:-1]
        kls.append(soft_target_kl(t_lp[mask], logits[mask], T).mean())
    else:
        for row, sig in enumerate(soft):
            if sig is None:
                continue
            s_lp = torch.log_softmax(logits[row][mask[row]] / T, dim=-1)
            ids, lps = sig.ids.to(s_lp.device), sig.logprobs.to(s_lp.device)
            # Teacher at temperature T over its top-k plus one tail bucket, renormalised.
            tail = torch.log1p(-lps.exp().sum(-1).clamp(max=1 - 1e-6)).unsqueeze(-1)
            scaled = torch.log_softmax(torch.cat([lps, tail], dim=-1) / T, dim=-1)[:, :-1]
            kls.append(T**2 * kl_topk_tail(s_lp, ids, scaled).mean())
    if not kls:
        return ce
    return alpha * ce + (1 - alpha) * torch.stack(kls).mean()


def eval_loss(model: Any, enc: list[Encoded], pad_id: int, device: str, batch_size: int) -> float:
    """Mean cross-entropy per answer token of ``enc`` (leaves the model in eval mode)."""
    import torch

    from aad_core.models.chat_format import answer_logits, pad_batch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(enc), batch_size):
            batch = {k: v.to(device) for k, v in pad_batch(enc[i : i + batch_size], pad_id).items()}
            logits, labels, _ = answer_logits(model, batch)
            logits = logits.float()
            mask = labels != -100
            total += float(torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum"))
            count += int(mask.sum())
    return total / max(count, 1)


@dataclass
class LoopStats:
    first_step_grad_norm: float | None = None
    stopped_early: bool = False
    wall_s: float = 0.0
    tokens: int = 0  # non-padding tokens computed in this run
    padded_tokens: int = 0  # batch positions computed, padding included


@dataclass
class TrainingLoop:
    model: Any
    optimizer: Any
    scheduler: Any
    params: list[Any]
    data: TrainingData
    plan: StepPlan
    loss: Callable[[Any, dict[str, Any], list[Any]], Any]  # (model, batch, soft targets) -> loss tensor
    device: str
    pad_id: int
    seed: int
    group_by_length: bool
    eval_batch_size: int
    patience: int
    curriculum: Curriculum | None = None  # easy-to-hard phases; None = shuffled epochs over every row
    autocast_bf16: bool = False  # passes under bfloat16 autocast (float32 weights, optimizer and loss)
    schedule: BatchSchedule = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.schedule = BatchSchedule([len(e["input_ids"]) for e in self.data.train], self.plan, self.seed,
                                      group_by_length=self.group_by_length, curriculum=self.curriculum)

    def run(self, state: dict[str, Any], output_dir: Path, show_progress: bool) -> LoopStats:
        """Train from ``state["step"]`` to the planned total (or an early stop), updating ``state``."""
        total = self.plan.total_steps
        stats = LoopStats()
        self.model.train()
        started = time.perf_counter()
        progress = progress_bar(show_progress)
        with progress:
            task = progress.add_task("Training", total=total, completed=state["step"], loss=float("nan"), tps=0.0)
            while state["step"] < total:
                step_loss = self._step(state["step"], stats)
                state["step"] += 1
                state["loss_history"].append(round(step_loss, 5))
                tps = stats.tokens / max(time.perf_counter() - started, 1e-9)
                progress.update(task, advance=1, loss=step_loss, tps=tps)
                if show_progress and not progress.console.is_terminal and (
                        state["step"] % max(1, total // 20) == 0 or state["step"] == total):
                    # Logs and pipes get a plain line now and then instead of a live bar.
                    progress.console.print(f"step {state['step']}/{total}  loss {step_loss:.4f}  {tps:.0f} tok/s")
                if self.data.eval and (state["step"] % self.plan.eval_every == 0 or state["step"] == total):
                    if self._evaluate(state, output_dir):
                        stats.stopped_early = True
                        break
        stats.wall_s = time.perf_counter() - started
        return stats

    def _step(self, step: int, stats: LoopStats) -> float:
        """One optimizer step over ``accum`` micro-batches; return its loss."""
        import torch

        from aad_core.models.chat_format import pad_batch

        enc = self.data.train
        micro_batches = self.schedule.micro_batches(step)
        n_tokens = sum(sum(1 for lab in enc[i]["labels"] if lab != -100) for mb in micro_batches for i in mb)
        step_loss = 0.0
        for mb in micro_batches:
            batch = {k: v.to(self.device) for k, v in pad_batch([enc[i] for i in mb], self.pad_id).items()}
            with self._autocast():
                loss = self.loss(self.model, batch, [self.data.soft[i] for i in mb])
            # Weight each micro-batch by its share of the step's answer tokens.
            mb_tokens = int((batch["labels"][:, 1:] != -100).sum())
            (loss * mb_tokens / max(n_tokens, 1)).backward()
            step_loss += float(loss.detach()) * mb_tokens / max(n_tokens, 1)
            stats.tokens += int(batch["attention_mask"].sum())
            stats.padded_tokens += int(batch["attention_mask"].numel())
        if stats.first_step_grad_norm is None:
            stats.first_step_grad_norm = assert_adapter_grads(self.model)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss

    def _autocast(self) -> Any:
        import contextlib

        import torch

        if not self.autocast_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=torch.bfloat16)

    def _evaluate(self, state: dict[str, Any], output_dir: Path) -> bool:
        """Eval, keep the best adapter, checkpoint; True when early stopping ends the run."""
        ev = eval_loss(self.model, self.data.eval, self.pad_id, self.device, self.eval_batch_size)
        if record_eval(state, ev):
            self.model.save_pretrained(output_dir)  # the best adapter so far
        save_checkpoint(self.model, self.optimizer, self.scheduler, output_dir / CHECKPOINT_DIR, state)
        # Early stopping never ends a run before its minimum steps (the best adapter is kept anyway).
        if state["step"] >= min(self.plan.min_steps, self.plan.total_steps) and out_of_patience(state, self.patience):
            return True
        self.model.train()
        return False
