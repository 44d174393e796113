"""The workspace's specialist registry: ``.aad/specialists/<name>/<version>/``.

Each version folder holds what its trainer saved — a standard PEFT adapter (``adapter_model.safetensors``,
``adapter_config.json``) for kind ``lora``, ``classifier.npz`` for kind ``classifier``, ... — and
``manifest.json``: kind and trainer, cluster id and centroid, base model, the trace ids trained on,
hyper-parameters, metrics, seed, library versions, and whether the specialist is promoted (and why).
Versions are integers counting up from 1; nothing is overwritten.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import re
import shutil
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aad_core.errors import AADError
from aad_core.schema import Specialist

if TYPE_CHECKING:
    from aad_core.plugins.components import Predictor
    from aad_core.workspace import Workspace

MANIFEST = "manifest.json"

log = logging.getLogger(__name__)
_unreadable_logged: set[Path] = set()  # manifests already reported as unreadable (logged once each)
_unreadable_lock = threading.Lock()


def specialist_name(cluster_id: int, label: str) -> str:
    """``c<id>-<label-slug>``, e.g. ``c3-card-arrival``."""
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:40].strip("-")
    return f"c{cluster_id}-{slug}" if slug else f"c{cluster_id}"


#: The libraries whose versions change a specialist's weights or answers (LoRA: torch, transformers, peft;
#: classifier: scikit-learn's head, numpy, the sentence-transformers MiniLM; both: safetensors files).
STAMPED_LIBRARIES = ("torch", "transformers", "peft", "scikit-learn", "numpy", "sentence-transformers", "safetensors")


def library_versions() -> dict[str, str | None]:
    from aad_core import __version__

    out: dict[str, str | None] = {"aad": __version__}
    for dist in STAMPED_LIBRARIES:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


class SpecialistRegistry:
    """Versioned specialists of one workspace."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws

    @property
    def root(self) -> Path:
        return self.ws.specialists_dir

    def _versions(self, name: str) -> list[int]:
        folder = self.root / name
        if not folder.is_dir():
            return []
        return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / MANIFEST).exists())

    @staticmethod
    def _from_manifest(path: Path) -> Specialist:
        data = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        fields = set(Specialist.model_fields)
        known = {k: v for k, v in data.items() if k in fields}
        known["path"] = str(path)
        return Specialist(**known)

    def manifest(self, spec: Specialist) -> dict[str, Any]:
        """The full manifest of a specialist (everything, not only the :class:`Specialist` fields)."""
        return json.loads((Path(spec.path) / MANIFEST).read_text(encoding="utf-8"))

    def save(
        self,
        *,
        cluster_id: int,
        label: str,
        adapter_dir: Path,
        base_model: str,
        centroid: list[float] | None = None,
        selection: list[str] | None = None,
        hyperparameters: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        seed: int = 0,
        name: str | None = None,
        move: bool = True,
        kind: str = "lora",
        trainer: str | None = None,
    ) -> Specialist:
        """Store the specialist in ``adapter_dir`` (what a trainer of ``kind`` saved) as the next version
        of ``name`` and write its manifest."""
        from aad_core import __version__
        from aad_core.plugins import get_plugin_manager

        adapter_dir = Path(adapter_dir)
        if kind == "lora" and not (adapter_dir / "adapter_config.json").exists():
            raise AADError(f"{adapter_dir} holds no PEFT adapter (adapter_config.json is missing).",
                           hint="Pass the folder the trainer saved into.")
        if not adapter_dir.is_dir() or not any(adapter_dir.iterdir()):
            raise AADError(f"{adapter_dir} holds no trained {kind} specialist (the folder is empty or missing).",
                           hint="Pass the folder the trainer saved into.")
        name = name or specialist_name(cluster_id, label)
        version = (self._versions(name) or [0])[-1] + 1
        target = self.root / name / str(version)
        target.parent.mkdir(parents=True, exist_ok=True)
        while target.exists():  # a concurrent save took this number
            version += 1
            target = self.root / name / str(version)
        tmp = target.with_name(f".{version}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        (shutil.move if move else shutil.copytree)(str(adapter_dir), str(tmp))
        shutil.rmtree(tmp / ".checkpoint", ignore_errors=True)
        now = datetime.now(timezone.utc)
        manifest = {
            "name": name,
            "kind": kind,
            "trainer": trainer,
            "cluster_id": int(cluster_id),
            "label": label,
            "version": version,
            "base_model": str(base_model),
            "path": str(target),
            "promoted": False,
            "promotion_reason": None,
            "metrics": metrics or {},
            "created_at": now.isoformat(),
            "aad_version": __version__,
            "centroid": list(centroid or []),
            "selection": list(selection or []),
            "hyperparameters": hyperparameters or {},
            "seed": seed,
            "versions": library_versions(),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str), encoding="utf-8")
        tmp.rename(target)
        spec = self._from_manifest(target)
        get_plugin_manager().hooks.specialist_trained(spec)
        return spec

    def list(self) -> list[Specialist]:
        """Every version of every specialist, by name then version."""
        if not self.root.is_dir():
            return []
        out = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for v in self._versions(folder.name):
                spec = self._readable(folder / str(v))
                if spec is not None:
                    out.append(spec)
        return out

    def _readable(self, path: Path) -> Specialist | None:
        """The specialist of ``path``, or None when its manifest cannot be read (damaged by hand or a
        disk fault): that version is left out, logged once, and the other specialists keep serving."""
        try:
            return self._from_manifest(path)
        except (OSError, ValueError, TypeError, AttributeError) as err:  # JSONDecodeError, ValidationError: ValueErrors
            with _unreadable_lock:
                first = path not in _unreadable_logged
                _unreadable_logged.add(path)
            log.log(logging.ERROR if first else logging.DEBUG,
                    "specialist %s v%s is left out: its %s cannot be read (%s: %s); 'aad train' writes a new "
                    "version", path.parent.name, path.name, path / MANIFEST, type(err).__name__,
                    str(err).splitlines()[0] if str(err) else "")
            return None

    def get(self, name: str, version: int | None = None) -> Specialist:
        versions = self._versions(name)
        if not versions:
            known = sorted({s.name for s in self.list()})
            raise AADError(f"No specialist named {name!r} in {self.root}.",
                           hint=f"Known: {', '.join(known) or 'none'}; run 'aad train' to create one.")
        v = versions[-1] if version is None else int(version)
        if v not in versions:
            raise AADError(f"Specialist {name!r} has no version {v}; it has {versions}.", hint=f"Use one of {versions}.")
        return self._from_manifest(self.root / name / str(v))

    def latest(self, cluster_id: int) -> Specialist | None:
        """The newest specialist trained for ``cluster_id`` (by creation time), or None."""
        candidates = [s for s in self.list() if s.cluster_id == int(cluster_id)]
        return max(candidates, key=lambda s: (s.created_at, s.version)) if candidates else None

    def promoted(self) -> dict[int, Specialist]:
        """{cluster id: its promoted specialist} (the highest promoted version when a cluster has
        several): what calibration calibrates, the router serves and the engine loads."""
        out: dict[int, Specialist] = {}
        for spec in self.list():
            if spec.promoted and (spec.cluster_id not in out or spec.version > out[spec.cluster_id].version):
                out[spec.cluster_id] = spec
        return out

    def set_promoted(self, name: str, version: int, promoted: bool, reason: str, *,
                     gate: dict[str, Any] | None = None) -> Specialist:
        """Promote or demote one version, with the reason; ``gate``: the verdict of the risk-coverage gate
        that judged this very version (its mode, confidence signal and threshold), kept with it so that it
        serves with its own threshold whatever later versions are judged (a rollback, a refused retrain)."""
        spec = self.get(name, version)
        path = Path(spec.path) / MANIFEST
        data = json.loads(path.read_text(encoding="utf-8"))
        data["promoted"], data["promotion_reason"] = bool(promoted), reason
        if gate is not None:
            data["gate"] = gate
        data["promoted_at"] = datetime.now(timezone.utc).isoformat()
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
        tmp.replace(path)
        return self._from_manifest(path.parent)


def load_predictor(spec: Specialist, ws: Workspace | None) -> Predictor:
    """A specialist of a kind other than "lora", ready to answer: its trainer component (built from
    ``ws``'s config, with ``workspace=ws``) loads it with ``load_predictor``. Kind "lora" specialists
    are served by :class:`aad_core.models.runtime.SpecialistRuntime`, one base for many adapters."""
    from aad_core.plugins import get_registry
    from aad_core.plugins.params import build_component

    name = spec.trainer or _trainer_of_kind(spec.kind)
    if ws is None:
        trainer = get_registry().create("trainer", name)
    else:
        trainer = build_component("trainer", name, ws.config, workspace=ws)
    if getattr(trainer, "kind", "lora") != spec.kind:
        raise AADError(f"Specialist {spec.name!r} is of kind {spec.kind!r}, but trainer {name!r} trains kind "
                       f"{getattr(trainer, 'kind', 'lora')!r}.",
                       hint="Install the plugin that trained it, or train the specialist again ('aad train').")
    return trainer.load_predictor(Path(spec.path))


def _trainer_of_kind(kind: str) -> str:
    """The name of the first registered trainer whose factory declares ``kind`` (manifests without a trainer name)."""
    from aad_core.plugins import get_registry

    registry = get_registry()
    for name in registry.names("trainer"):
        if getattr(registry.get("trainer", name).factory, "kind", "lora") == kind:
            return name
    raise AADError(f"No installed trainer serves specialists of kind {kind!r}.",
                   hint="Install the plugin that trained it ('aad plugins' lists the trainers), or train again.")
