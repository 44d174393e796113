"""The ``qlora`` trainer: its parameters, and ``train()``, which loads the student, adds a LoRA
adapter, runs the loop (:mod:`.loop`) on the encoded traces (:mod:`.data`), and saves the adapter
(:mod:`.checkpoints`) with its answer bank (:mod:`.answer_bank`)."""

from __future__ import annotations

import functools
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from aad_core.errors import AADError, param_error
from aad_core.plugins import Predictor, Trainer
from aad_plugins.qlora.answer_bank import fit_bank, save_bank, with_hints
from aad_plugins.qlora.checkpoints import CHECKPOINT_DIR, finish_adapter, load_checkpoint, new_state, saved_state
from aad_plugins.qlora.console import announce
from aad_plugins.qlora.curriculum import CURRICULA, Curriculum, difficulty
from aad_plugins.qlora.data import StepPlan, TrainingData, encode
from aad_plugins.qlora.loop import LoopStats, TrainingLoop, distill_loss, make_optimizer, make_scheduler

if TYPE_CHECKING:
    from aad_core.schema import Trace


class QLoRATrainer(Trainer):
    """One LoRA adapter per cluster: 4-bit NF4 QLoRA on CUDA, LoRA with float32 weights on CPU (bf16
    autocast passes where the CPU has native bf16: ``precision``) (set in ``[trainer.qlora]``).

    Parameters
    ----------
    student : str or Path
        The student: a known name, a hub id or a local path (``[train] student``).
    lora_r : int
        LoRA rank r.
    lora_alpha : int
        LoRA alpha.
    lora_dropout : float
        LoRA dropout.
    target_modules : list of str or "all-linear"
        Modules that get adapters: a list of module names, or 'all-linear' (peft: every linear layer but
        the output head, as in the QLoRA paper, which found it needed to match full fine-tuning). Measured
        on the demo's intent and ticket nodes with SmolLM2-135M, 30 steps: held-out 0.875 / 0.875 vs
        0.56 / 0.50 with ['q_proj', 'v_proj'] (an earlier run, same workspace and settings), at ~1.35x the
        time per step.
    learning_rate : float
        AdamW learning rate. 1e-3 rather than the QLoRA paper's 2e-4 (tuned for 7B-65B models): on
        Banking77 (1,000 samples, SmolLM2-135M, cosine, effective batch 16; docs/specialists.md) lr 1e-3
        gave 78.7 % test accuracy in 6 epochs where 2e-4 needed 10 epochs for 77.0 % (5e-4: 78.0 %, 2e-3
        in 4 epochs: 79.3 %), and the paper's 4-bit recipe (2e-4, 16 x 4, 3 epochs) reached 9.7 %; the
        demo's 24-step specialists were tuned at 1e-3 too.
    lr_scheduler : {"constant", "linear", "cosine"}
        Learning rate after the warm-up: a 'cosine' or 'linear' decay towards zero at the last step, or
        'constant' (as in the QLoRA paper). 'cosine' because it measured best: on Banking77 (1,000
        samples, SmolLM2-135M, 3 epochs at lr 1e-3) cosine 78.0 % vs constant 70.3 % test accuracy, linear
        78.7 % vs cosine 81.7 % at 128 tokens (benchmarks/lora_banking77.py).
    warmup_ratio : float
        Share of the steps over which the learning rate rises linearly from 0.
    group_by_length : bool
        Batch samples of similar length together (as transformers' group_by_length): less padding,
        faster steps on CPU; the batches are still shuffled.
    batch_size : int
        Micro-batch size.
    gradient_accumulation : int
        Micro-batches per optimizer step. 1 (effective batch 16) rather than the QLoRA paper's 4 (16 x 4 =
        64): every measured lr-1e-3 recipe above used 16 x 1, and a small task gets 4x the optimizer steps
        for the same compute. The effective batch never exceeds the selected samples: with fewer, the
        accumulation shrinks first, then the micro-batch.
    epochs : float
        Passes over the selected samples (more when needed to reach min_steps).
    min_steps : int
        Fewest optimizer steps per task: the epochs grow until the run makes this many (unless max_steps
        is set). A task with 9-37 selected samples otherwise trained for one step at 16 x 4 and scored 0;
        the demo's intent node reached 0.875 held-out in 30 steps (docs/specialists.md).
    max_steps : int or None
        Run exactly this many optimizer steps (overrides epochs and min_steps).
    max_length : int
        Prompt + answer tokens kept per sample (``[train] max_length``; the prompt is cut from the left).
    quantization : {"auto", "4bit", "none"}
        'auto' = 4-bit NF4 QLoRA on CUDA, LoRA on float32 weights on CPU ('none').
    precision : {"auto", "bf16", "fp32"}
        Arithmetic of the training passes without 4-bit weights. 'bf16' runs them under torch autocast
        to bfloat16 (the weights, the adapter, its gradients and AdamW's state stay float32; the loss
        is computed in float32); 'fp32' computes in float32. 'auto' = 'bf16' on a CPU with native
        bfloat16 instructions (AVX512-BF16 or AMX), else 'fp32' (CUDA keeps fp32 LoRA, or bfloat16
        compute under 4-bit). Measured on 2 cores with AVX512-BF16 (SmolLM2-135M, batch 8 x 130
        tokens): 3.9 s per step against 6.2 s; the adapters' held-out scores: docs/specialists.md.
        A run resumed from a checkpoint keeps the precision the checkpoint was trained in.
    distill_alpha : float
        alpha in alpha*CE + (1-alpha)*T^2*KL when teacher distributions exist.
    temperature : float
        Soft-target temperature T.
    early_stopping_patience : int
        Evaluations without held-out improvement before stopping; 0 = off.
    seed : int
        Seed of the run (``seed``).
    teacher : str or None
        A local Hugging Face teacher sharing the student's tokenizer, for exact soft targets; None = the
        recorded top-k log-probs where traces have them.
    device : str or None
        Torch device; None = CUDA when available, else CPU.
    eval_every : int or None
        Optimizer steps between held-out evaluations; None = once per epoch.
    max_eval_samples : int
        Held-out samples scored at each evaluation.
    keep_checkpoint : bool
        Keep the resumable checkpoint after a finished run.
    answer_hints : int
        For clusters whose answers form a closed label set (the 'classification' rule): add to every
        prompt the N distinct answers of the nearest training requests (by hint_embedder), in training
        and at serving time; 0 = off. Measured on Banking77 (1,000 samples, 77 labels, SmolLM2-135M): see
        docs/specialists.md.
    answer_candidates : int
        For clusters whose answers form a closed label set: the specialist answers with the best of the N
        distinct labels of the nearest training requests, scored by its log-prob plus a weighted vote of
        the 10 nearest requests (weight fitted on the held-out split), instead of decoding freely; 0 = off.
        Measured on Banking77: see docs/specialists.md.
    hint_embedder : str
        Embedder component that finds the nearest training requests for answer hints.
    curriculum : {"none", "easy-to-hard"}
        Order of the training samples. 'none' = shuffled epochs over every sample. 'easy-to-hard' =
        progressive distillation: the samples sorted by a difficulty computed without a model pass (mean
        percentile rank of answer tokens, JSON keys / tool-call arguments and prompt tokens), the steps
        split evenly into 3 phases over the easiest third, two thirds, then all (each phase shuffled with
        the seed); same total steps. 'none' stays the default: on a Banking77 subset (8 intents, 160
        samples, 40 steps) easy-to-hard scored 0.713 vs 0.812 held-out (docs/specialists.md, "Curriculum").
    """

    def __init__(
        self,
        student: str | Path = "smollm2-135m",
        lora_r: int = 16,
        lora_alpha: int = 32,
        lora_dropout: float = 0.05,
        target_modules: Sequence[str] | str = "all-linear",
        learning_rate: float = 1e-3,
        lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine",
        warmup_ratio: float = 0.03,
        group_by_length: bool = True,
        batch_size: int = 16,
        gradient_accumulation: int = 1,
        epochs: float = 1.0,
        min_steps: int = 30,
        max_steps: int | None = None,
        max_length: int = 384,
        quantization: Literal["auto", "4bit", "none"] = "auto",
        precision: Literal["auto", "bf16", "fp32"] = "auto",
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
        curriculum: Literal["none", "easy-to-hard"] = "none",
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
        self.min_steps = min_steps
        self.max_steps = max_steps
        self.max_length = max_length
        self.quantization = quantization
        self.precision = precision
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
        self.curriculum = curriculum

    def applies_to(self, train: Sequence[Trace]) -> tuple[bool, str]:
        """Fits a task unless most of its calls are longer than ``max_length``: the adapter would learn
        from prompts cut from the left (the system prompt and tools lost) while serving sees them whole."""
        from aad_core.models.chat_format import answer_text, prompt_text
        from aad_core.models.students import resolve_student

        if not train:
            return False, "no training trace"
        from transformers import AutoTokenizer

        from aad_core.models.quiet import quiet_loading

        with quiet_loading():
            tok = AutoTokenizer.from_pretrained(str(resolve_student(self.student)))
        sample = list(train)[:: max(1, len(train) // 64)]  # a spread of up to ~64 calls is enough for a median
        lengths = sorted(len(tok(prompt_text(tok, t.request) + answer_text(tok, t.request, t.response),
                                 add_special_tokens=False)["input_ids"]) for t in sample if t.response is not None)
        if not lengths:
            return False, "no training trace with an answer"
        median, p90 = lengths[len(lengths) // 2], lengths[(9 * (len(lengths) - 1)) // 10]
        if median > self.max_length:
            return False, (f"half its calls are longer than max_length {self.max_length} tokens (median {median}): "
                           "a LoRA specialist would learn from prompts cut from the left; raise [train] max_length "
                           f"to about {p90} (90 % of its calls) to train one")
        return True, f"a LoRA adapter fits free-form answers (median call {median} tokens <= max_length {self.max_length})"

    # -- setup -------------------------------------------------------------------------------
    def _validate(self) -> None:
        owner = type(self).__name__
        for name in ("lora_r", "lora_alpha", "batch_size", "gradient_accumulation", "max_length", "min_steps"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise param_error(name, owner, "an int >= 1", v)
        if self.quantization not in ("auto", "4bit", "none"):
            raise param_error("quantization", owner, "one of 'auto', '4bit', 'none'", self.quantization)
        if self.precision not in ("auto", "bf16", "fp32"):
            raise param_error("precision", owner, "one of 'auto', 'bf16', 'fp32'", self.precision)
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
        if self.curriculum not in CURRICULA:
            raise param_error("curriculum", owner, "one of " + ", ".join(map(repr, CURRICULA)), self.curriculum)

    def _load_base(self, device: str, four_bit: bool) -> tuple[Any, Any, str]:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from aad_core.models.quiet import quiet_loading

        with quiet_loading():  # transformers' load bars and deprecation warnings are not the user's business
            return self._load_quietly(torch, AutoModelForCausalLM, AutoTokenizer, four_bit, device)

    def _load_quietly(self, torch: Any, AutoModelForCausalLM: Any, AutoTokenizer: Any, four_bit: bool,
                      device: Any) -> tuple[Any, Any, str]:
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
        from aad_core.models.quiet import quiet_loading

        with quiet_loading():  # peft's wrap asks transformers a deprecated question (FutureWarning)
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
        import torch

        self._validate()
        if not train:
            raise AADError("No training samples were given.", hint="Run 'aad select' first; check the cluster has a train split.")
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(self.seed)
        device, four_bit = self._device()
        model, tokenizer, source = self._model(device, four_bit, show_progress)
        teacher = self._local_teacher(tokenizer, device, show_progress)

        bank, hint_note = fit_bank(train, hints=self.answer_hints, candidates=self.answer_candidates,
                                   embedder=self.hint_embedder, show=show_progress)
        raw_eval = list(eval)
        if bank is not None:
            train, eval = with_hints(bank, train, eval, self.max_eval_samples)
        data = encode(tokenizer, train, eval, max_length=self.max_length, max_eval_samples=self.max_eval_samples,
                      measure=self.curriculum != "none")
        plan = StepPlan.for_rows(len(data.train), batch_size=self.batch_size, accum=self.gradient_accumulation,
                                 epochs=self.epochs, min_steps=self.min_steps, max_steps=self.max_steps,
                                 eval_every=self.eval_every)
        if data.too_long:
            announce(f"{data.too_long} training calls longer than max_length {self.max_length} tokens left out (the "
                     "router sends such prompts to the teacher).", show_progress)
        announce(f"Step plan: {plan.describe()}.", show_progress)
        curriculum = self._curriculum(data, plan)
        if curriculum is not None:
            announce(f"Curriculum easy-to-hard: {curriculum.describe()}.", show_progress)
        ckpt = output_dir / CHECKPOINT_DIR
        saved = saved_state(ckpt) if resume else None
        # "auto" resolves on this machine; a run resumed on the same kind of device and quantisation keeps the
        # precision its checkpoint was trained in (elsewhere _bf16's own rules hold: no autocast under 4-bit)
        same_kind = saved is not None and (saved.get("device"), saved.get("four_bit")) == (device, four_bit)
        bf16 = bool(saved["autocast_bf16"]) if same_kind and "autocast_bf16" in saved else self._bf16(device, four_bit)
        loop = self._loop(model, tokenizer, data, plan, teacher, device, four_bit, curriculum, autocast_bf16=bf16)

        how = {"autocast_bf16": bf16, "device": device, "four_bit": four_bit}  # how this run trains
        state, resumed_from = {**new_state(), **how}, None
        if saved is not None:
            resumed_from = load_checkpoint(model, loop.optimizer, loop.scheduler, ckpt, state)
            state.update(how)
            announce(f"Resuming from checkpoint at step {resumed_from}"
                     f"{' (bf16 autocast, as it was trained)' if bf16 and same_kind else ''}.", show_progress)
        stats = loop.run(state, output_dir, show_progress)

        finish_adapter(model, output_dir, source, best_saved=bool(data.eval))
        vote = {} if bank is None else save_bank(bank, source, output_dir, raw_eval, device=device,
                                                 batch_size=self.batch_size, show=show_progress)
        if not self.keep_checkpoint:
            shutil.rmtree(ckpt, ignore_errors=True)
        return {
            "device": device,
            "quantization": "4bit-nf4" if four_bit else "none",
            "precision": "bf16-autocast" if loop.autocast_bf16 else ("bf16-compute" if four_bit else "fp32"),
            "base_model_path": source,
            **_run_metrics(data, plan, state, stats, resumed_from, soft_all=teacher is not None),
            "curriculum": curriculum.as_metrics() if curriculum is not None else {"kind": "none"},
            "answer_hints": bank.k if bank is not None else 0,
            "answer_candidates": bank.candidates if bank is not None else 0,
            "answer_hints_note": hint_note,
            **vote,
        }

    def _device(self) -> tuple[str, bool]:
        """The device to train on and whether the base is loaded in 4 bits."""
        import torch

        cuda = torch.cuda.is_available() and self.device in (None, "cuda") or (self.device or "").startswith("cuda")
        device = self.device or ("cuda" if cuda else "cpu")
        four_bit = self.quantization == "4bit" or (self.quantization == "auto" and device.startswith("cuda"))
        if four_bit and not device.startswith("cuda"):
            raise AADError(
                "quantization = \"4bit\" needs a CUDA GPU: 4-bit bitsandbytes weights on CPU can silently stop LoRA gradients.",
                hint="Set [trainer.qlora] quantization = \"auto\" or \"none\" (LoRA on float32 weights on CPU).",
            )
        if four_bit:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise AADError("4-bit QLoRA needs bitsandbytes.", hint="pip install bitsandbytes, or set [trainer.qlora] quantization = \"none\".") from None
        return device, four_bit

    def _bf16(self, device: str, four_bit: bool) -> bool:
        """Whether the training passes run under bfloat16 autocast (``precision``)."""
        if four_bit or self.precision == "fp32":
            return False
        if device.startswith("cuda"):
            import torch

            # 'auto' leaves CUDA's fp32 LoRA alone; an explicit 'bf16' needs a GPU that has it.
            return self.precision == "bf16" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return self.precision == "bf16" or (device == "cpu" and cpu_has_native_bf16())

    def _model(self, device: str, four_bit: bool, show: bool) -> tuple[Any, Any, str]:
        """The student with a fresh adapter, its tokenizer, and the base model's path."""
        base, tokenizer, source = self._load_base(device, four_bit)
        if four_bit:
            mode = "QLoRA: 4-bit NF4 (double quant) + paged AdamW 8-bit"
        elif self._bf16(device, four_bit):
            mode = "LoRA with float32 weights and AdamW, passes in bfloat16 (autocast)"
        else:
            mode = "LoRA in fp32 with AdamW"
        announce(f"Training on {device}: {mode}; r={self.lora_r}, alpha={self.lora_alpha}, lr={self.learning_rate}.", show)
        model = self._prepare_model(base)
        model.peft_config["default"].base_model_name_or_path = source
        return model, tokenizer, source

    def _local_teacher(self, tokenizer: Any, device: str, show: bool) -> Any:
        """The white-box teacher whose distributions the loss distils, when one is set and shares the vocabulary."""
        if not self.teacher:
            return None
        from aad_core.models.teacher_signal import LocalTeacher

        teacher = LocalTeacher(self.teacher, device=device).load(tokenizer)
        if teacher.mismatch_:
            announce(f"Local teacher vocabulary differs ({teacher.mismatch_}): training without its soft targets.", show)
            return None
        return teacher

    def _curriculum(self, data: TrainingData, plan: StepPlan) -> Curriculum | None:
        """The easy-to-hard phases of this run, or None (``curriculum = "none"``)."""
        if self.curriculum == "none":
            return None
        return Curriculum.easy_to_hard(difficulty(data.measures), plan.total_steps)

    def _loop(self, model: Any, tokenizer: Any, data: TrainingData, plan: StepPlan, teacher: Any, device: str,
              four_bit: bool, curriculum: Curriculum | None = None, *, autocast_bf16: bool = False) -> TrainingLoop:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, self.learning_rate, four_bit=four_bit)
        return TrainingLoop(
            model=model, optimizer=optimizer,
            scheduler=make_scheduler(optimizer, self.lr_scheduler, plan.total_steps, self.warmup_ratio),
            params=params, data=data, plan=plan,
            loss=functools.partial(distill_loss, teacher=teacher, alpha=self.distill_alpha, temperature=self.temperature),
            device=device, pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            seed=self.seed, group_by_length=self.group_by_length, eval_batch_size=self.batch_size,
            patience=self.early_stopping_patience, curriculum=curriculum,
            autocast_bf16=autocast_bf16,
        )

    # -- serving -----------------------------------------------------------------------------
    #: A PEFT adapter on the base student; the serving pool loads every "lora" specialist of one base
    #: into one shared SpecialistRuntime, so load_predictor is for serving one adapter on its own.
    kind = "lora"

    def load_predictor(self, specialist_dir: Path) -> Predictor:
        """The adapter in ``specialist_dir`` on its own runtime (base: the manifest's ``base_model``,
        else ``student``): a thin :class:`~aad_core.models.runtime.AdapterPredictor`."""
        import json

        from aad_core.models.runtime import AdapterPredictor, SpecialistRuntime

        folder = Path(specialist_dir)
        manifest = folder / "manifest.json"
        base = json.loads(manifest.read_text(encoding="utf-8")).get("base_model") if manifest.exists() else None
        runtime = SpecialistRuntime(base or self.student, device=self.device)
        runtime.add_adapter(folder.parent.name or "specialist", folder)
        return AdapterPredictor(runtime, folder.parent.name or "specialist")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX tiles): elsewhere torch
    emulates it, slower than float32."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    for name in probes:
        try:
            if bool(getattr(torch.cpu, name, lambda: False)()):
                return True
        except Exception:  # a private probe of another torch build: no answer means no
            continue
    return False


def _run_metrics(data: TrainingData, plan: StepPlan, state: dict[str, Any], stats: LoopStats,
                 resumed_from: int | None, *, soft_all: bool) -> dict[str, Any]:
    losses = state["loss_history"]
    return {
        "n_train": len(data.train),
        "n_too_long": data.too_long,
        "n_eval": len(data.eval),
        "steps": state["step"],
        "micro_batch": plan.micro,
        "gradient_accumulation": plan.accum,
        "effective_batch": plan.effective_batch,
        "step_plan": plan.as_metrics(),  # the planned steps; "steps" is what ran (early stopping, resume)
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "best_eval_loss": state["best_eval_loss"],
        "eval_history": state["eval_history"],
        "stopped_early": stats.stopped_early,
        "resumed_from_step": resumed_from,
        "first_step_grad_norm": stats.first_step_grad_norm,
        # Every row has soft targets when a local teacher is loaded.
        "soft_target_samples": data.soft_targets + (len(data.train) if soft_all else 0),
        "wall_s": round(stats.wall_s, 2),
        "tokens_per_s": round(stats.tokens / max(stats.wall_s, 1e-9), 1),
        "padded_tokens": stats.padded_tokens,  # batch positions computed, padding included
    }
