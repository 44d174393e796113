"""Teacher-generated training data (``aad augment``) and prompt search (``aad prompt-search``).

Both need a live teacher: ``[teacher]`` in aad.toml (an OpenAI-compatible endpoint) or, in Python, a
function of a :class:`~aad_core.schema.ChatRequest` (or ``aad_langchain.langchain_teacher(chat_model)``)
passed as ``teacher=``. Only a task's training calls are ever paraphrased or shown as examples; the
traces made here never reach a held-out split (:func:`aad_core.pipeline.curate.place_augmented`).
"""

from __future__ import annotations

from aad_core.pipeline.augment.run import CHECKS, AugmentResult, run_augment
from aad_core.pipeline.augment.search import SearchResult, run_prompt_search
from aad_core.pipeline.augment.teacher import Teacher, resolve_teacher

__all__ = ["CHECKS", "AugmentResult", "SearchResult", "Teacher", "resolve_teacher", "run_augment", "run_prompt_search"]
