"""S1 capture: the background writer that every capture path (LangChain, LlamaIndex, the router)
hands its traces to. See :class:`CaptureWriter`."""

from aad_core.capture.writer import CaptureWriter

__all__ = ["CaptureWriter"]
