"""The classifier kind's tuned encoder: the routing embedder (all-MiniLM-L6-v2) with its top layers
fine-tuned on the task's own labels, SetFit-style (supervised contrastive loss, then a linear head).

The lower layers stay frozen, so each training text goes through them once (their output is kept),
and each optimizer step runs only the top ``n_top`` layers forward and backward: on 1,000 Banking77
queries, 2 of MiniLM's 6 layers tuned for 6 epochs cost about 80 s of one CPU core. Only the tuned
layers are saved (``encoder.safetensors``, about 14 MB); the predictor loads the packaged model and
puts them on top.

Works for sentence-transformers models whose first module is a BERT-like transformer
(``auto_model.embeddings`` and ``auto_model.encoder.layer``) with mean pooling; :func:`unsupported`
says why another model is not tuned (the classifier then uses the router's vectors as they are).
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

ENCODER_FILE = "encoder.safetensors"
_PART_CACHE = 1024
#: Up to this many new texts are encoded on one torch thread (the serving path).
SMALL_BATCH = 16


class torch_threads:  # noqa: N801 - a context manager
    """Torch's intra-op threads set to ``threads`` inside the block (None: unchanged)."""

    def __init__(self, threads: int | None) -> None:
        self.threads = threads
        self.before: int | None = None

    def __enter__(self) -> None:
        if self.threads is not None:
            import torch

            self.before = torch.get_num_threads()
            if self.before != self.threads:
                torch.set_num_threads(self.threads)
            else:
                self.before = None

    def __exit__(self, *exc: Any) -> None:
        if self.before is not None:
            import torch

            torch.set_num_threads(self.before)


def unsupported(st_model: Any) -> str | None:
    """Why ``st_model`` (a SentenceTransformer) cannot be tuned here; None when it can."""
    try:
        first = st_model[0]
        bert = first.auto_model
        layers = bert.encoder.layer
        _ = bert.embeddings
    except (AttributeError, IndexError, TypeError, KeyError):
        return "its first module is not a BERT-like transformer (auto_model.encoder.layer)"
    if len(layers) < 2:
        return "it has fewer than 2 transformer layers"
    modes = []
    for module in list(st_model)[1:]:
        mode = getattr(module, "pooling_mode", None) or (
            "mean" if getattr(module, "pooling_mode_mean_tokens", False) else None)
        if mode is not None or type(module).__name__ == "Pooling":
            modes.append(str(mode))
    if modes and modes[0] not in ("mean", "None"):
        return f"it pools with {modes[0]!r}, not the mean of its tokens"
    return None


class TunedEncoder:
    """A SentenceTransformer's lower layers (frozen, shared) and a tunable copy of its top ``n_top`` layers.

    ``lower(texts)`` gives each text's token states after the frozen layers; ``upper(states)`` the
    unit sentence vectors through the top layers (with gradients in training); ``encode(texts)``
    both, for serving (part vectors kept in a small LRU, so a shared system prompt is encoded once).
    """

    def __init__(self, st_model: Any, n_top: int) -> None:
        self.st = st_model
        self.bert = st_model[0].auto_model
        self.tokenizer = st_model.tokenizer
        self.max_length = int(getattr(st_model, "max_seq_length", None) or 256)
        layers = self.bert.encoder.layer
        n_top = max(1, min(int(n_top), len(layers)))
        self.start = len(layers) - n_top
        self.lower_layers = list(layers[: self.start])
        self.top = copy.deepcopy(layers[self.start :])
        for p in self.bert.parameters():
            p.requires_grad_(False)
        self.bert.eval()  # the frozen layers never drop out (only the tuned copy trains)
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Any] = OrderedDict()

    # -- forward -----------------------------------------------------------------------------------
    @staticmethod
    def _additive_mask(mask: torch.Tensor) -> torch.Tensor:
        import torch

        return (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min

    @staticmethod
    def _run(layers: Sequence[Any], h: torch.Tensor, ext: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            out = layer(h, ext)
            h = out[0] if isinstance(out, tuple) else out
        return h

    def lower(self, texts: Sequence[str], batch_size: int = 64) -> list[torch.Tensor]:
        """Each text's token states after the frozen layers, ``(n_tokens, dim)``, no padding."""
        import torch

        out: list[torch.Tensor] = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                f = self.tokenizer(list(texts[i : i + batch_size]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
                kwargs = {"input_ids": f["input_ids"]}
                if "token_type_ids" in f:
                    kwargs["token_type_ids"] = f["token_type_ids"]
                h = self.bert.embeddings(**kwargs)
                h = self._run(self.lower_layers, h, self._additive_mask(f["attention_mask"]))
                for j, n in enumerate(f["attention_mask"].sum(1).tolist()):
                    out.append(h[j, :n].clone())
        return out

    def upper(self, states: Sequence[torch.Tensor], chunk: int = 16) -> torch.Tensor:
        """Unit mean-pooled vectors of ``states`` through the top layers, ``(len(states), dim)``; texts
        of similar length are batched together so little padding is computed."""
        import torch

        order = sorted(range(len(states)), key=lambda i: states[i].shape[0])
        rows: list[Any] = [None] * len(states)
        dim = states[0].shape[1]
        for c in range(0, len(order), chunk):
            ids = order[c : c + chunk]
            length = max(states[i].shape[0] for i in ids)
            h = torch.zeros(len(ids), length, dim)
            mask = torch.zeros(len(ids), length)
            for j, i in enumerate(ids):
                n = states[i].shape[0]
                h[j, :n] = states[i]
                mask[j, :n] = 1
            h = self._run(self.top, h, self._additive_mask(mask))
            pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
            pooled = torch.nn.functional.normalize(pooled, dim=1)
            for j, i in enumerate(ids):
                rows[i] = pooled[j]
        return torch.stack(rows)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors of ``texts`` through the tuned encoder (float32, ``(len(texts), dim)``)."""
        import numpy as np
        import torch

        texts = list(texts)
        with self._lock:
            known = {t: self._cache[t] for t in dict.fromkeys(texts) if t in self._cache}
            for t in known:
                self._cache.move_to_end(t)
        todo = [t for t in dict.fromkeys(texts) if t not in known]
        if todo:
            self.top.eval()
            # one request at a time: one intra-op thread (on 2 busy cores, 2 threads took 700 ms a request, 1 took 67)
            with torch_threads(1 if len(todo) <= SMALL_BATCH else None), torch.inference_mode():
                fresh = self.upper(self.lower(todo)).numpy().astype(np.float32)
            with self._lock:
                for t, v in zip(todo, fresh):
                    known[t] = v
                    self._cache[t] = v
                while len(self._cache) > _PART_CACHE:
                    self._cache.popitem(last=False)
        return np.stack([known[t] for t in texts]) if texts else np.zeros((0, 0), dtype=np.float32)

    # -- training ----------------------------------------------------------------------------------
    def fine_tune(self, part_states: dict[str, torch.Tensor], request_parts: Sequence[Sequence[str]],
                  y: np.ndarray, *, epochs: float, lr: float, classes_per_batch: int, per_class: int,
                  temperature: float, seed: int) -> dict[str, Any]:
        """Tune the top layers with a supervised contrastive loss on the requests' combined vectors
        (the sum of their parts' vectors, made unit, as the router combines them). Batches hold
        ``per_class`` requests of each of ``classes_per_batch`` classes; the steps follow the data
        (``epochs`` passes over it, at least 10), with a linear warm-up (10 %) and decay."""
        import numpy as np
        import torch

        y = np.asarray(y)
        by = {c: np.flatnonzero(y == c) for c in np.unique(y)}
        usable = [c for c, ids in by.items() if len(ids) >= 2]
        if len(usable) < 2:
            return {"tuned": False, "why": "fewer than 2 answers with 2 or more training requests"}
        per_batch = min(classes_per_batch, len(usable))
        steps = max(10, int(round(epochs * len(y) / (per_batch * per_class))))
        rng = np.random.default_rng(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for p in self.top.parameters():
                p.requires_grad_(True)
            self.top.train()
            opt = torch.optim.AdamW(self.top.parameters(), lr=lr, weight_decay=0.01)
            warm = max(1, steps // 10)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: min(1.0, (s + 1) / warm) * max(0.0, (steps - s) / steps))
            losses = []
            for _ in range(steps):
                chosen = rng.choice(usable, per_batch, replace=False)
                idx = np.concatenate([rng.choice(by[c], min(per_class, len(by[c])), replace=False) for c in chosen])
                z = self._combined([request_parts[i] for i in idx], part_states)
                labels = torch.as_tensor(y[idx])
                eye = torch.eye(len(idx), dtype=torch.bool)
                sim = (z @ z.T / temperature).masked_fill(eye, -1e9)
                pos = (labels[:, None] == labels[None, :]) & ~eye
                logp = sim - torch.logsumexp(sim, dim=1, keepdim=True)
                loss = -(logp * pos).sum(1).div(pos.sum(1).clamp(min=1)).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
            self.top.eval()
            for p in self.top.parameters():
                p.requires_grad_(False)
        with self._lock:
            self._cache.clear()
        return {"tuned": True, "steps": steps, "batch": f"{per_batch} answers x {per_class} requests",
                "loss_first": round(losses[0], 4), "loss_last": round(float(np.mean(losses[-5:])), 4)}

    def _combined(self, request_parts: Sequence[Sequence[str]], part_states: dict[str, torch.Tensor]) -> torch.Tensor:
        import torch

        texts = list(dict.fromkeys(t for parts in request_parts for t in parts))
        vecs = self.upper([part_states[t] for t in texts])
        where = {t: i for i, t in enumerate(texts)}
        rows = []
        for parts in request_parts:
            v = vecs[[where[t] for t in parts]].sum(0) if parts else torch.zeros(vecs.shape[1])
            rows.append(v)
        return torch.nn.functional.normalize(torch.stack(rows), dim=1)

    def vectors(self, request_parts: Sequence[Sequence[str]], part_states: dict[str, torch.Tensor] | None = None,
                batch_size: int = 256) -> np.ndarray:
        """Combined request vectors (inference), from kept lower states where given."""
        import numpy as np
        import torch

        out = []
        self.top.eval()
        with torch.inference_mode():
            for i in range(0, len(request_parts), batch_size):
                chunk = request_parts[i : i + batch_size]
                if part_states is None:
                    texts = list(dict.fromkeys(t for parts in chunk for t in parts))
                    states = dict(zip(texts, self.lower(texts))) if texts else {}
                else:
                    states = part_states
                if not any(chunk):
                    out.append(np.zeros((len(chunk), self.bert.config.hidden_size), dtype=np.float32))
                    continue
                out.append(self._combined(chunk, states).numpy().astype(np.float32))
        return np.concatenate(out) if out else np.zeros((0, self.bert.config.hidden_size), dtype=np.float32)

    # -- saving ------------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {f"{self.start + i}.{k}": v.detach().contiguous().clone()
                   for i, layer in enumerate(self.top) for k, v in layer.state_dict().items()}
        save_file(tensors, str(path), metadata={"format": "aad-classifier-encoder-1", "start": str(self.start)})

    def load(self, path: Path) -> None:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        for i, layer in enumerate(self.top):
            prefix = f"{self.start + i}."
            layer.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        self.top.eval()
        with self._lock:
            self._cache.clear()
