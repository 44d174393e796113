"""Trainer ``qlora``: one LoRA adapter per cluster, QLoRA (4-bit NF4) on CUDA, fp32 LoRA on CPU.

Paper defaults (r=16, alpha=32, dropout 0.05, lr 2e-4, effective batch 16 x 4 = 64). The loss is
cross-entropy on the answer tokens; when the teacher's distributions are known (a local white-box
teacher, or recorded top-k log-probs that align with the student's tokens) it is
``alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T)``.

Every run checks that the adapter received non-zero gradients after its first step: a 4-bit base
on CPU can silently train nothing (see FIELD-NOTES), and a run that learns nothing must not be
saved as a specialist.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aad_core import hookimpl
from aad_core.plugins.components import Trainer
from aad_core.errors import AADError, param_error

if TYPE_CHECKING:
    import torch

    from aad_core.schema import Trace

log = logging.getLogger(__name__)
CHECKPOINT_DIR = ".checkpoint"
#: Held-out requests scored to fit the answer bank's vote weight (each costs one forward pass per candidate).
MAX_VOTE_FIT_SAMPLES = 200


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


class QLoRATrainer(Trainer):
    def __init__(
        self,
        student: str | Path = "smollm2-135m",
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.05,
        target_modules: Sequence[str] | str = "all-linear",
        learning_rate: float = 2e-4,
        lr_scheduler: str = "cosine",
        warmup_ratio: float = 0.03,
        group_by_length: bool = True,
        batch_size: int = 16,
        gradient_accumulation: int = 4,
        epochs: float = 1.0,
        max_steps: int | None = None,
        max_length: int = 384,
        quantization: str = "auto",
        distill_alpha: float = 0.5,
        temperature: float = 2.0,
        early_stopping_patience: int = 2,
        seed: int = 0,
        teacher: str | None = None,
        device: str | None = None,
        eval_every: int | None = None,
        max_eval_samples: int = 64,
        keep_checkpoint: bool = False,
        answer_hints: int = 0,
        answer_candidates: int = 0,
        hint_embedder: str = "minilm",
    ) -> None:
        self.student = student
        self.lora_r = lora_r
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        self.target_modules = target_modules
        self.learning_rate = learning_rate
        self.lr_scheduler = lr_scheduler
        self.warmup_ratio = warmup_ratio
        self.group_by_length = group_by_length
        self.batch_size = batch_size
        self.gradient_accumulation = gradient_accumulation
        self.epochs = epochs
        self.max_steps = max_steps
        self.max_length = max_length
        self.quantization = quantization
        self.distill_alpha = distill_alpha
        self.temperature = temperature
        self.early_stopping_patience = early_stopping_patience
        self.seed = seed
        self.teacher = teacher
        self.device = device
        self.eval_every = eval_every
        self.max_eval_samples = max_eval_samples
        self.keep_checkpoint = keep_checkpoint
        self.answer_hints = answer_hints
        self.answer_candidates = answer_candidates
        self.hint_embedder = hint_embedder

    # -- setup -------------------------------------------------------------------------------
    def _validate(self) -> None:
        owner = type(self).__name__
        for name in ("lora_r", "lora_alpha", "batch_size", "gradient_accumulation", "max_length"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise param_error(name, owner, "an int >= 1", v)
        if self.quantization not in ("auto", "4bit", "none"):
            raise param_error("quantization", owner, "one of 'auto', '4bit', 'none'", self.quantization)
        if self.lr_scheduler not in ("constant", "linear", "cosine"):
            raise param_error("lr_scheduler", owner, "one of 'constant', 'linear', 'cosine'", self.lr_scheduler)
        if not (0 <= self.warmup_ratio < 1):
            raise param_error("warmup_ratio", owner, "a float in [0, 1)", self.warmup_ratio)
        for name in ("answer_hints", "answer_candidates"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
                raise param_error(name, owner, "an int >= 0 (0 = off)", getattr(self, name))
        if not (0 <= self.distill_alpha <= 1):
            raise param_error("distill_alpha", owner, "a float in [0, 1]", self.distill_alpha)
        if not self.epochs > 0:
            raise param_error("epochs", owner, "a float > 0", self.epochs)
        if self.max_steps is not None and not (isinstance(self.max_steps, int) and self.max_steps >= 1):
            raise param_error("max_steps", owner, "None or an int >= 1", self.max_steps)

    def _answer_hints(self, train: Sequence[Trace], show: bool) -> tuple[Any, str]:
        """The fitted answer bank when hints or candidates are on and the answers form a label set."""
        if not (self.answer_hints or self.answer_candidates):
            return None, "off"
        from aad_core.models.answer_bank import AnswerHints, hints_apply

        ok, why = hints_apply(train)
        if not ok:
            self._announce(f"Answer hints off for this cluster: {why}.", show)
            return None, why
        bank = AnswerHints(k=self.answer_hints, embedder=self.hint_embedder, candidates=self.answer_candidates).fit(train)
        uses = ([f"each prompt lists the {bank.k} labels of its nearest training requests"] if bank.k else []) + (
            [f"answers are chosen among the {bank.candidates} nearest labels"] if bank.candidates else [])
        self._announce(f"Answer bank: {'; '.join(uses)} ({len(bank.answers_)} requests, "
                       f"{len(set(bank.answers_))} labels, embedder {bank.embedder}).", show)
        return bank, why

    def _fit_vote_weight(self, bank: Any, source: str, output_dir: Path, heldout: Sequence[Trace], device: str,
                         show: bool) -> dict[str, Any]:
        """Fit the bank's vote weight on held-out requests with the saved (best) adapter."""
        from aad_core.models.answer_bank import fit_vote_weight
        from aad_core.formats.answers import answer_string
        from aad_core.models.runtime import SpecialistRuntime

        sample = [t for t in heldout if t.response is not None][:MAX_VOTE_FIT_SAMPLES]
        if not sample:
            bank.vote_weight = 1.0
            return {"vote_weight": 1.0, "vote_fit": "no held-out requests: weight 1.0"}
        # A fresh runtime rather than the training model: it scores the best adapter (not the last
        # step's) on the full-precision base exactly as serving will load it, hints and all.
        runtime = SpecialistRuntime(source, device=device, batch_size=self.batch_size, warmup=False)
        runtime.add_adapter("fit", output_dir)
        scored = runtime.candidate_scores([t.request for t in sample], adapter="fit")
        bank.vote_weight, acc = fit_vote_weight(scored, [answer_string(t) for t in sample])
        self._announce(f"Vote weight {bank.vote_weight:g}: {acc:.1%} exact on {len(sample)} held-out requests.", show)
        return {"vote_weight": bank.vote_weight, "vote_fit_accuracy": acc, "vote_fit_samples": len(sample)}

    def _announce(self, message: str, show: bool) -> None:
        log.info(message)
        if show:
            from rich.console import Console

            Console(stderr=True).print(message, highlight=False)

    def _load_base(self, device: str, four_bit: bool) -> tuple[Any, Any, str]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from aad_core.models.students import resolve_student

        source = str(resolve_student(self.student))
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if four_bit:
            from peft import prepare_model_for_kbit_training
            from transformers import BitsAndBytesConfig

            bnb = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
            model = AutoModelForCausalLM.from_pretrained(source, quantization_config=bnb, device_map={"": device})
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(device)
        return model, tokenizer, source

    def _prepare_model(self, base: Any) -> Any:
        """Wrap the base model with a fresh LoRA adapter (a subclass may override)."""
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
            target_modules=self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules),
            bias="none", task_type="CAUSAL_LM",
        )
        return get_peft_model(base, config)

    # -- training ----------------------------------------------------------------------------
    def train(
        self,
        train: Sequence[Trace],
        eval: Sequence[Trace],
        output_dir: Path,
        *,
        show_progress: bool = True,
        resume: bool = True,
    ) -> dict[str, Any]:
        import numpy as np
        import torch

        from aad_core.models.chat_format import encode_trace
        from aad_core.models.teacher_signal import from_logprobs

        self._validate()
        if not train:
            raise AADError("No training samples were given.", hint="Run 'aad select' first; check the cluster has a train split.")
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(self.seed)
        cuda = torch.cuda.is_available() and self.device in (None, "cuda") or (self.device or "").startswith("cuda")
        device = self.device or ("cuda" if cuda else "cpu")
        four_bit = self.quantization == "4bit" or (self.quantization == "auto" and device.startswith("cuda"))
        if four_bit and not device.startswith("cuda"):
            raise AADError(
                "quantization = \"4bit\" needs a CUDA GPU: 4-bit bitsandbytes weights on CPU can silently stop LoRA gradients.",
                hint="Set [train] quantization = \"auto\" or \"none\" (fp32 LoRA on CPU).",
            )
        if four_bit:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise AADError("4-bit QLoRA needs bitsandbytes.", hint="pip install bitsandbytes, or set [train] quantization = \"none\".") from None

        base, tokenizer, source = self._load_base(device, four_bit)
        mode = "QLoRA: 4-bit NF4 (double quant) + paged AdamW 8-bit" if four_bit else "LoRA in fp32 with AdamW (no 4-bit on CPU)"
        self._announce(f"Training on {device}: {mode}; r={self.lora_r}, alpha={self.lora_alpha}, lr={self.learning_rate}.", show_progress)
        model = self._prepare_model(base)
        model.peft_config["default"].base_model_name_or_path = source

        teacher = None
        if self.teacher:
            from aad_core.models.teacher_signal import LocalTeacher

            teacher = LocalTeacher(self.teacher, device=device).load(tokenizer)
            if teacher.mismatch_:
                self._announce(f"Local teacher vocabulary differs ({teacher.mismatch_}): training without its soft targets.", show_progress)
                teacher = None

        bank, hint_note = self._answer_hints(train, show_progress)
        raw_eval = list(eval)
        if bank is not None:
            train = bank.apply_to_training(train)
            kept = list(eval)[: self.max_eval_samples]
            eval = [t.model_copy(update={"request": r}) for t, r in zip(kept, bank.apply([t.request for t in kept]))]
        train_enc = [encode_trace(tokenizer, t, self.max_length) for t in train]
        soft = []
        for t, e in zip(train, train_enc):
            answer_ids = [i for i, lab in zip(e["input_ids"], e["labels"]) if lab != -100]
            sig = from_logprobs(tokenizer, answer_ids, t.teacher_logprobs) if t.teacher_logprobs else None
            soft.append(sig if sig is not None and sig.kind == "top-k" else None)
        eval_enc = [encode_trace(tokenizer, t, self.max_length) for t in list(eval)[: self.max_eval_samples]]

        micro = min(self.batch_size, len(train_enc))
        accum = self.gradient_accumulation
        micro_per_epoch = math.ceil(len(train_enc) / micro)
        steps_per_epoch = max(1, math.ceil(micro_per_epoch / accum))
        total_steps = self.max_steps or max(1, math.ceil(steps_per_epoch * self.epochs))
        eval_every = self.eval_every or steps_per_epoch

        params = [p for p in model.parameters() if p.requires_grad]
        if four_bit:
            import bitsandbytes as bnb

            optimizer = bnb.optim.PagedAdamW8bit(params, lr=self.learning_rate)
        else:
            optimizer = torch.optim.AdamW(params, lr=self.learning_rate)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_multiplier(self.lr_scheduler, total_steps, max(1, int(self.warmup_ratio * total_steps))))

        state = {"step": 0, "best_eval_loss": None, "bad_evals": 0, "eval_history": [], "loss_history": [], "tokens": 0}
        ckpt = output_dir / CHECKPOINT_DIR
        resumed_from = None
        if resume and (ckpt / "trainer_state.json").exists():
            resumed_from = self._load_checkpoint(model, optimizer, scheduler, ckpt, state)
            self._announce(f"Resuming from checkpoint at step {resumed_from}.", show_progress)

        @functools.lru_cache(maxsize=1)  # asked for at every step; computed once per epoch
        def batches_for_epoch(epoch: int) -> list[list[int]]:
            rng = np.random.default_rng(self.seed + epoch)
            order = rng.permutation(len(train_enc)).tolist()
            if not self.group_by_length:
                return [order[i : i + micro] for i in range(0, len(order), micro)]
            # As transformers' group_by_length: sort shuffled mega-batches by length so that a
            # micro-batch pads little, then shuffle the micro-batches.
            mega = micro * 50
            order = [i for m in range(0, len(order), mega)
                     for i in sorted(order[m : m + mega], key=lambda j: -len(train_enc[j]["input_ids"]))]
            batches = [order[i : i + micro] for i in range(0, len(order), micro)]
            return [batches[k] for k in rng.permutation(len(batches))]

        from aad_core.models.chat_format import pad_batch

        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        model.train()
        grad_norm_first = None
        stopped_early = False
        started = time.perf_counter()
        tokens_this_run = padded_this_run = 0
        progress = _progress(show_progress)
        with progress:
            task = progress.add_task("Training", total=total_steps, completed=state["step"], loss=float("nan"), tps=0.0)
            while state["step"] < total_steps:
                epoch, within = divmod(state["step"], steps_per_epoch)
                micro_batches = batches_for_epoch(epoch)[within * accum : (within + 1) * accum]
                n_tokens = sum(sum(1 for lab in train_enc[i]["labels"] if lab != -100) for mb in micro_batches for i in mb)
                step_loss = 0.0
                for mb in micro_batches:
                    batch = {k: v.to(device) for k, v in pad_batch([train_enc[i] for i in mb], pad_id).items()}
                    loss = self._loss(model, batch, [soft[i] for i in mb], teacher)
                    # Weight each micro-batch by its share of the step's answer tokens.
                    mb_tokens = int((batch["labels"][:, 1:] != -100).sum())
                    (loss * mb_tokens / max(n_tokens, 1)).backward()
                    step_loss += float(loss.detach()) * mb_tokens / max(n_tokens, 1)
                    tokens_this_run += int(batch["attention_mask"].sum())
                    padded_this_run += int(batch["attention_mask"].numel())
                if grad_norm_first is None:
                    grad_norm_first = assert_adapter_grads(model)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                state["loss_history"].append(round(step_loss, 5))
                tps = tokens_this_run / max(time.perf_counter() - started, 1e-9)
                progress.update(task, advance=1, loss=step_loss, tps=tps)
                if show_progress and not progress.console.is_terminal and (
                        state["step"] % max(1, total_steps // 20) == 0 or state["step"] == total_steps):
                    # Logs and pipes get a plain line now and then instead of a live bar.
                    progress.console.print(f"step {state['step']}/{total_steps}  loss {step_loss:.4f}  {tps:.0f} tok/s")
                if eval_enc and (state["step"] % eval_every == 0 or state["step"] == total_steps):
                    ev = self._eval_loss(model, eval_enc, pad_id, device)
                    state["eval_history"].append({"step": state["step"], "loss": round(ev, 5)})
                    if state["best_eval_loss"] is None or ev < state["best_eval_loss"] - 1e-4:
                        state["best_eval_loss"], state["bad_evals"] = ev, 0
                        model.save_pretrained(output_dir)  # the best adapter so far
                    else:
                        state["bad_evals"] += 1
                    self._save_checkpoint(model, optimizer, scheduler, ckpt, state)
                    if self.early_stopping_patience and state["bad_evals"] >= self.early_stopping_patience:
                        stopped_early = True
                        break
                    model.train()
        wall = time.perf_counter() - started
        if not eval_enc:
            model.save_pretrained(output_dir)
        if not (output_dir / "adapter_config.json").exists():
            model.save_pretrained(output_dir)
        cfg = json.loads((output_dir / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = source
        (output_dir / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        vote: dict[str, Any] = {}
        if bank is not None:
            bank.save(output_dir)
            if bank.candidates:
                vote = self._fit_vote_weight(bank, source, output_dir, raw_eval, device, show_progress)
                bank.save(output_dir)
        if not self.keep_checkpoint:
            shutil.rmtree(ckpt, ignore_errors=True)
        losses = state["loss_history"]
        return {
            "device": device,
            "quantization": "4bit-nf4" if four_bit else "none",
            "base_model_path": source,
            "n_train": len(train_enc),
            "n_eval": len(eval_enc),
            "steps": state["step"],
            "micro_batch": micro,
            "gradient_accumulation": accum,
            "train_loss_first": losses[0] if losses else None,
            "train_loss_last": losses[-1] if losses else None,
            "best_eval_loss": state["best_eval_loss"],
            "eval_history": state["eval_history"],
            "stopped_early": stopped_early,
            "resumed_from_step": resumed_from,
            "first_step_grad_norm": grad_norm_first,
            "soft_target_samples": sum(1 for s in soft if s is not None) + (len(train_enc) if teacher else 0),
            "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens_this_run / max(wall, 1e-9), 1),
            "padded_tokens": padded_this_run,  # batch positions computed, padding included
            "answer_hints": bank.k if bank is not None else 0,
            "answer_candidates": bank.candidates if bank is not None else 0,
            "answer_hints_note": hint_note,
            **vote,
        }

    def _loss(self, model: Any, batch: dict[str, torch.Tensor], soft: list[Any], teacher: Any) -> torch.Tensor:
        import torch

        from aad_core.models.chat_format import answer_logits
        from aad_core.models.teacher_signal import kl_topk_tail, soft_target_kl

        logits, labels, s0 = answer_logits(model, batch)
        logits = logits.float()
        mask = labels != -100
        ce = torch.nn.functional.cross_entropy(logits[mask], labels[mask])
        if self.distill_alpha >= 1.0 or (teacher is None and not any(s is not None for s in soft)):
            return ce
        T = self.temperature
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
        return self.distill_alpha * ce + (1 - self.distill_alpha) * torch.stack(kls).mean()

    def _eval_loss(self, model: Any, enc: list[dict[str, list[int]]], pad_id: int, device: str) -> float:
        import torch

        from aad_core.models.chat_format import answer_logits, pad_batch

        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(enc), self.batch_size):
                batch = {k: v.to(device) for k, v in pad_batch(enc[i : i + self.batch_size], pad_id).items()}
                logits, labels, _ = answer_logits(model, batch)
                logits = logits.float()
                mask = labels != -100
                total += float(torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum"))
                count += int(mask.sum())
        return total / max(count, 1)

    # -- checkpoints -------------------------------------------------------------------------
    def _save_checkpoint(self, model: Any, optimizer: Any, scheduler: Any, ckpt: Path, state: dict[str, Any]) -> None:
        import torch

        tmp = ckpt.with_name(ckpt.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": torch.get_rng_state()}, tmp / "optimizer.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        shutil.rmtree(ckpt, ignore_errors=True)
        tmp.rename(ckpt)

    def _load_checkpoint(self, model: Any, optimizer: Any, scheduler: Any, ckpt: Path, state: dict[str, Any]) -> int:
        import torch
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))
        saved = torch.load(ckpt / "optimizer.pt", weights_only=False)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        state.update(json.loads((ckpt / "trainer_state.json").read_text()))
        return int(state["step"])


def _progress(enabled: bool):  # -> rich.progress.Progress
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:.0f} tok/s"), TimeElapsedColumn(),
        disable=not enabled,
    )


@hookimpl
def aad_register_trainers(register: Any) -> None:
    register(
        "qlora",
        QLoRATrainer,
        description="LoRA r16/a32 per cluster; 4-bit NF4 QLoRA + paged AdamW 8-bit on CUDA, fp32 LoRA on CPU; "
        "answer-only CE, + soft-target KL when teacher distributions exist",
    )
