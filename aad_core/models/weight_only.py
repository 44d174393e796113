"""The weight-only product of a fast copy's Linear layers (``Int8Linear``, and the lean forward's stacked
ones): which of the layer's weights answers a product of a given width."""

from __future__ import annotations

from typing import Any


def weight_only_product(layer: Any, flat_bf16: Any) -> Any:
    """``flat_bf16`` (rows, in; bfloat16, contiguous) times ``layer``'s weights, as bfloat16 (rows, out).

    ``layer`` has ``weight_int8`` and ``scale`` (int8, one scale per output channel), ``weight_bf16`` (a
    bfloat16 copy or None) with ``bf16_from_rows``, and ``weight_int4`` (packed int4 codes or None) with
    ``int4_scales`` and ``int4_group``. Products of at least ``bf16_from_rows`` rows use the bfloat16 copy
    (oneDNN reuses each weight across rows), narrower ones the int4 codes when there are some, else int8."""
    import torch

    if layer.weight_bf16 is not None and flat_bf16.shape[0] >= layer.bf16_from_rows:
        return torch.nn.functional.linear(flat_bf16, layer.weight_bf16)
    if layer.weight_int4 is not None:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(flat_bf16, layer.weight_int4, layer.int4_group,
                                                          layer.int4_scales)
    return torch.ops.aten._weight_int8pack_mm(flat_bf16, layer.weight_int8, layer.scale)
