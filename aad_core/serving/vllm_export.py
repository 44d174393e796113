"""``aad export vllm OUT_DIR``: the promoted LoRA specialists as adapter folders vLLM serves on one base.

Each promoted LoRA specialist becomes ``OUT_DIR/<name>/`` with ``adapter_config.json`` (its
``base_model_name_or_path`` set to the base vLLM serves) and ``adapter_model.safetensors``, as the
``qlora`` trainer saved them (PEFT's ``save_pretrained``). ``OUT_DIR/serve.sh`` runs
``vllm serve <base> --enable-lora --max-lora-rank R --lora-modules name=path ...``; ``OUT_DIR/README.md``
holds that command, the specialists that stay local (and why) and the ``[route]`` lines that point
``specialist_backend = "openai"`` at the server (:mod:`aad_core.serving.openai_backend`).
"""

from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aad_core.errors import AADError, param_error
from aad_core.serving.openai_backend import SPECIALIST_KEY_ENV, remote_unfit

if TYPE_CHECKING:
    from aad_core.schema import Specialist
    from aad_core.workspace import Workspace

#: The values vLLM's ``--max-lora-rank`` accepts.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: vLLM's LoRA kernels run in float16 / bfloat16 only (a float32 base is served in bfloat16).
VLLM_DTYPE = "bfloat16"


@dataclass
class ExportedAdapter:
    """One specialist written as a vLLM LoRA module."""

    name: str
    version: int
    path: Path
    rank: int


@dataclass
class LocalSpecialist:
    """A promoted specialist that stays in aad's process, and why."""

    name: str
    kind: str
    reason: str


@dataclass
class VLLMExport:
    """What :func:`export_vllm` wrote."""

    out_dir: Path
    base_model: str
    adapters: list[ExportedAdapter]
    local: list[LocalSpecialist] = field(default_factory=list)
    port: int = 8001

    @property
    def max_lora_rank(self) -> int:
        """The smallest ``--max-lora-rank`` vLLM accepts that holds every adapter's rank."""
        top = max(a.rank for a in self.adapters)
        return next((r for r in VLLM_MAX_LORA_RANKS if r >= top), top)

    @property
    def command_parts(self) -> list[list[str]]:
        """The ``vllm serve`` command in groups: the program and base, each option with its value, then one
        group per LoRA module (``name=absolute path``)."""
        return [["vllm", "serve", self.base_model], ["--enable-lora"], ["--max-lora-rank", str(self.max_lora_rank)],
                ["--max-loras", str(len(self.adapters))], ["--dtype", VLLM_DTYPE], ["--port", str(self.port)],
                ["--lora-modules"], *[[f"{a.name}={a.path}"] for a in self.adapters]]

    @property
    def command(self) -> list[str]:
        """The ``vllm serve`` command line."""
        return [arg for part in self.command_parts for arg in part]

    @property
    def route_toml(self) -> str:
        """The ``aad.toml`` lines that send the LoRA specialists to the server."""
        return (f'[route]\nspecialist_backend = "openai"\n'
                f'specialist_base_url = "http://127.0.0.1:{self.port}/v1"\n')

    def to_json(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "base_model": self.base_model, "max_lora_rank": self.max_lora_rank,
                "adapters": [{"name": a.name, "version": a.version, "path": str(a.path), "rank": a.rank}
                             for a in self.adapters],
                "local": [{"name": s.name, "kind": s.kind, "reason": s.reason} for s in self.local],
                "command": shlex.join(self.command), "route_toml": self.route_toml}


def export_vllm(ws: Workspace, out_dir: Path, *, base_model: str | None = None, port: int = 8001) -> VLLMExport:
    """Write the workspace's promoted LoRA specialists into ``out_dir`` for vLLM (see the module docstring).

    ``base_model``: the base vLLM serves (default: the local folder of the student the adapters were trained
    on, the same weights; another copy of them, e.g. a path on the GPU machine, can be given)."""
    from aad_core.specialists import SpecialistRegistry

    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise param_error("port", "export_vllm", "a TCP port number (1 to 65535)", port)
    promoted = sorted(SpecialistRegistry(ws).promoted().values(), key=lambda s: s.name)
    if not promoted:
        raise AADError("No specialist is promoted: there is nothing to export.",
                       hint="Run 'aad distill' (or 'aad train' and 'aad eval'); 'aad specialists' lists them.")
    local = [LocalSpecialist(s.name, s.kind, why) for s in promoted if (why := remote_unfit(s))]
    lora = [s for s in promoted if s.name not in {x.name for x in local}]
    if not lora:
        raise AADError("No promoted specialist is a LoRA adapter vLLM can serve: "
                       + "; ".join(f"{s.name} ({s.reason})" for s in local) + ".",
                       hint="Keep [route] specialist_backend = \"local\": these answer in-process.")
    bases = sorted({s.base_model for s in lora})
    if len(bases) > 1:
        raise AADError(f"The promoted LoRA specialists have {len(bases)} base models ({', '.join(bases)}); one vLLM "
                       "server serves one base.",
                       hint="Demote the specialists of the other bases ('aad specialists demote NAME') or retrain "
                       "them on one [train] student ('aad train').")
    base = base_model or str(_resolve_base(bases[0]))
    out_dir = Path(out_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    adapters = [_write_adapter(spec, out_dir / spec.name, base) for spec in lora]
    result = VLLMExport(out_dir=out_dir, base_model=base, adapters=adapters, local=local, port=port)
    (out_dir / "serve.sh").write_text(_serve_sh(result), encoding="utf-8")
    (out_dir / "serve.sh").chmod(0o755)
    (out_dir / "README.md").write_text(_readme(result, ws), encoding="utf-8")
    return result


def _resolve_base(base_model: str) -> Path | str:
    from aad_core.models.students import resolve_student

    return resolve_student(base_model)


def _write_adapter(spec: Specialist, target: Path, base: str) -> ExportedAdapter:
    """``spec``'s adapter as a vLLM LoRA module in ``target`` (replaced if it exists)."""
    source = Path(spec.path)
    config = json.loads((source / "adapter_config.json").read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base
    config["inference_mode"] = True
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy2(source / "adapter_model.safetensors", tmp / "adapter_model.safetensors")
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    ranks = [int(config.get("r") or 8), *(int(v) for v in (config.get("rank_pattern") or {}).values())]
    return ExportedAdapter(name=spec.name, version=spec.version, path=target, rank=max(ranks))


def _serve_sh(export: VLLMExport) -> str:
    """serve.sh: the command, with the adapters found next to the script (the folder may move)."""
    parts = [shlex.join(p) for p in export.command_parts[: -len(export.adapters)]]
    parts += [f'{shlex.quote(a.name)}="$HERE/{a.name}"' for a in export.adapters]
    return ("#!/bin/sh\n"
            "# Serves aad's promoted LoRA specialists with vLLM (written by 'aad export vllm'; see README.md).\n"
            f"# Extra arguments go to 'vllm serve', e.g. --api-key KEY (then set ${SPECIALIST_KEY_ENV} for aad).\n"
            'HERE="$(cd "$(dirname "$0")" && pwd)"\n'
            "exec " + " \\\n    ".join(parts) + ' \\\n    "$@"\n')


def _readme(export: VLLMExport, ws: Workspace) -> str:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = "\n".join(f"| {a.name} | {a.version} | {a.rank} | `{a.path.name}/` |" for a in export.adapters)
    local = ("\n".join(f"| {s.name} | {s.kind} | {s.reason} |" for s in export.local)
             if export.local else "| - | - | every promoted specialist is served by vLLM |")
    command = " \\\n    ".join(shlex.join(p) for p in export.command_parts)
    return f"""# aad specialists for vLLM

Written by `aad export vllm` on {now} from the workspace `{ws.root}`.

Base model: `{export.base_model}`: the weights the adapters were trained on. vLLM must serve these
(another copy of the same weights may be named with `aad export vllm OUT_DIR --base-model PATH`).

| specialist | version | LoRA rank | folder |
|---|---|---|---|
{rows}

Stay local (aad answers them in-process, also with `specialist_backend = "openai"`):

| specialist | kind | why |
|---|---|---|
{local}

## Serve

```bash
{command}
```

or `sh serve.sh` (the same command; it finds the adapters next to itself, so the folder may be
copied to the GPU machine; extra arguments go to `vllm serve`). vLLM's LoRA kernels need float16 or
bfloat16, hence `--dtype {VLLM_DTYPE}`: its answers may differ slightly from aad's runtime, on which
`aad eval` chose each specialist's confidence threshold. `aad monitor` shows the live agreement.

## Point aad at it (aad.toml)

```toml
{export.route_toml.rstrip()}
```

If vLLM runs with `--api-key KEY`, set `{SPECIALIST_KEY_ENV}=KEY` where aad runs. Restart `aad serve`
(or the agent) to pick it up. A request the endpoint cannot answer (unreachable,
slower than `[route] specialist_timeout_s`, an HTTP error) goes to the teacher, with the reason in
its escalation trace.
"""

