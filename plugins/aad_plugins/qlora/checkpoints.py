"""The run's state on disk: the resumable checkpoint (adapter, optimizer, scheduler, RNG, counters),
the best adapter so far with the early-stopping count, and the final adapter's config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

CHECKPOINT_DIR = ".checkpoint"


def new_state() -> dict[str, Any]:
    """The counters a checkpoint saves (``trainer_state.json``)."""
    return {"step": 0, "best_eval_loss": None, "bad_evals": 0, "eval_history": [], "loss_history": [], "tokens": 0}


def record_eval(state: dict[str, Any], loss: float) -> bool:
    """Add an eval loss at the current step; True when it beats the best so far (which resets the bad-eval count)."""
    state["eval_history"].append({"step": state["step"], "loss": round(loss, 5)})
    if state["best_eval_loss"] is None or loss < state["best_eval_loss"] - 1e-4:
        state["best_eval_loss"], state["bad_evals"] = loss, 0
        return True
    state["bad_evals"] += 1
    return False


def out_of_patience(state: dict[str, Any], patience: int) -> bool:
    """Whether early stopping ends the run (``patience`` 0 = never)."""
    return bool(patience) and state["bad_evals"] >= patience


def saved_state(ckpt: Path) -> dict[str, Any] | None:
    """The counters of the checkpoint in ``ckpt`` (None when there is none), read before the model is built:
    a resumed run keeps the precision it was trained in."""
    path = ckpt / "trainer_state.json"
    return json.loads(path.read_text()) if path.exists() else None


def save_checkpoint(model: Any, optimizer: Any, scheduler: Any, ckpt: Path, state: dict[str, Any]) -> None:
    import torch

    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state()}, tmp / "optimizer.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(state))
    shutil.rmtree(ckpt, ignore_errors=True)
    tmp.rename(ckpt)


def load_checkpoint(model: Any, optimizer: Any, scheduler: Any, ckpt: Path, state: dict[str, Any]) -> int:
    """Restore a checkpoint into the model, optimizer, scheduler, RNG and ``state``; return its step."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)  # tensors and plain values only: no pickle
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"])
    state.update(json.loads((ckpt / "trainer_state.json").read_text()))
    return int(state["step"])


def finish_adapter(model: Any, output_dir: Path, source: str, *, best_saved: bool) -> None:
    """Save the last adapter unless evals already saved the best one, and record ``source`` as its base model."""
    if not best_saved or not (output_dir / "adapter_config.json").exists():
        model.save_pretrained(output_dir)
    cfg = json.loads((output_dir / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = source
    (output_dir / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
