"""Quiet model loads: aad's own loads of a student or an embedder print nothing in the user's process.

transformers draws "Loading weights" / "Writing model shards" progress bars on stderr and, like torch
and sentence-transformers, warns (``FutureWarning``, ``DeprecationWarning``) about things aad cannot
change. :func:`quiet_loading` silences them *for the duration of one of aad's loads only*:

* progress bars: a transformers tqdm hook (``transformers.utils.logging.set_tqdm_hook``) that hands
  out an empty bar to the threads inside ``quiet_loading`` and passes every other thread's bars (and
  any hook the application installed) through unchanged; the previous hook is restored when the
  last quiet load ends;
* the ``transformers`` and ``sentence_transformers`` loggers: raised to ERROR while a quiet load runs,
  then set back to the level they had;
* Python warnings of the categories above and UserWarnings raised by those libraries:
  ``warnings.catch_warnings`` around the load.

Nothing is silenced when aad's log level is DEBUG (``AAD_LOG_LEVEL=DEBUG`` or ``aad --verbose
--verbose``): a user who asks to see everything does. Plugins that load models (the public plugin API
includes :mod:`aad_core.models`) use it the same way::

    from aad_core.models.quiet import quiet_loading

    with quiet_loading():
        model = AutoModel.from_pretrained(path)
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["quiet_loading"]

#: Third-party loggers whose records below ERROR are held back during a quiet load.
NOISY_LOGGERS = ("transformers", "sentence_transformers")
_NOISY_MODULES = r"(transformers|sentence_transformers|torch|huggingface_hub|accelerate|peft|bitsandbytes|onnx|onnxruntime)(\.|$)"

_state = threading.local()
_lock = threading.Lock()
_depth = 0  # quiet loads running in this process (any thread)
_saved: dict[str, Any] = {}


def _thread_quiet() -> bool:
    return getattr(_state, "depth", 0) > 0


def _hook(factory: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """transformers' tqdm hook while a quiet load runs: an empty bar in quiet threads, else as before."""
    if _thread_quiet():
        from transformers.utils.logging import EmptyTqdm

        return EmptyTqdm(*args, **kwargs)
    previous = _saved.get("hook")
    return previous(factory, args, kwargs) if previous is not None else factory(*args, **kwargs)


def _enter_process() -> None:
    """First quiet load of the process: install the tqdm hook and raise the noisy loggers' levels."""
    try:
        from transformers.utils import logging as hf_logging

        setter = getattr(hf_logging, "set_tqdm_hook", None)
        if setter is not None:
            _saved["hook"] = setter(_hook)
            _saved["hook_installed"] = True
    except ImportError:  # no transformers: nothing of theirs to silence
        pass
    levels = {}
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        levels[name] = logger.level
        if logger.getEffectiveLevel() < logging.ERROR:
            logger.setLevel(logging.ERROR)
    _saved["levels"] = levels


def _exit_process() -> None:
    """Last quiet load ended: put back the tqdm hook and the logger levels found at the first one."""
    if _saved.pop("hook_installed", False):
        from transformers.utils import logging as hf_logging

        hf_logging.set_tqdm_hook(_saved.get("hook"))
    _saved.pop("hook", None)
    for name, level in _saved.pop("levels", {}).items():
        logging.getLogger(name).setLevel(level)


def _asked_for_everything() -> bool:
    return logging.getLogger("aad_core").getEffectiveLevel() <= logging.DEBUG


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence third-party progress bars, log records below ERROR and warnings while aad loads a model."""
    global _depth
    if _asked_for_everything():
        yield
        return
    with _lock:
        if _depth == 0:
            _enter_process()
        _depth += 1
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=_NOISY_MODULES)
            yield
    finally:
        _state.depth -= 1
        with _lock:
            _depth -= 1
            if _depth == 0:
                _exit_process()
