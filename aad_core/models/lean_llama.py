"""A lean forward pass for the fast copies of Llama-architecture students (SmolLM2).

transformers' ``LlamaForCausalLM.forward`` spends most of a one-token decoding pass on CPU outside the
matrix products: module calls, keyword plumbing, output-recording hooks, mask building and three
projections (and casts) where one would do. :class:`LeanLlamaForward` computes the same function from
the same (merged, int8) weights with fewer operations: one fused query/key/value product, one fused
gate/up product, the rotary tables once per pass, the attention mask once per pass, new key/value columns
written into room kept after the cache's (no copy of the whole cache per pass). It takes and returns
what the runtime passes to and reads from the transformers forward (``input_ids``, ``attention_mask``,
``position_ids``, the ``DynamicCache``, ``logits_to_keep``; ``.logits`` and the cache), so prefix
caches, row splicing and cropping keep working on the same cache object.

It is installed only where it applies (:func:`lean_forward`): a ``llama`` model without biases, with
SiLU, SDPA attention and the rotary module transformers built for it. Anything else keeps transformers'
forward.
"""

from __future__ import annotations

from typing import Any

from aad_core.models.weight_only import weight_only_product

__all__ = ["LeanLlamaForward", "lean_forward"]


def lean_forward(model: Any) -> LeanLlamaForward | None:
    """A :class:`LeanLlamaForward` for ``model`` (a fast copy whose Linear layers are ``Int8Linear``), or None
    when ``model`` is not a plain Llama it can compute."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) != "llama":
        return None
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return None
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "pretraining_tp", 1) != 1:
        return None
    if getattr(config, "_attn_implementation", "sdpa") not in (None, "sdpa"):  # eager attention rounds otherwise
        return None
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None or not hasattr(inner, "rotary_emb"):
        return None
    projections = ("q_proj", "k_proj", "v_proj", "o_proj")
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        if not all(hasattr(getattr(attn, p, None), "weight_int8") for p in projections):
            return None
        if not all(hasattr(getattr(mlp, p, None), "weight_int8") for p in ("gate_proj", "up_proj", "down_proj")):
            return None
    return LeanLlamaForward(model)


class _Matmul:
    """One weight-only product of several Linear layers (``Int8Linear``) for one input, their weights stacked;
    it picks its kernel as each layer's own forward does (:func:`weight_only_product`)."""

    __slots__ = ("weight_int8", "scale", "weight_bf16", "bf16_from_rows", "weight_int4", "int4_scales",
                 "int4_group", "parts", "out_features")

    def __init__(self, linears: list[Any]) -> None:
        import torch

        self.weight_int8 = torch.cat([lin.weight_int8 for lin in linears]).contiguous()
        self.scale = torch.cat([lin.scale for lin in linears]).contiguous()
        copies = [lin.weight_bf16 for lin in linears]
        self.weight_bf16 = None if any(c is None for c in copies) else torch.cat(copies).contiguous()
        self.bf16_from_rows = linears[0].bf16_from_rows
        self.out_features = int(self.weight_int8.shape[0])
        # int4 codes are packed in blocks of 64 output channels: layers that all have codes and widths that are
        # multiples of 64 stack them (and answer as separately); otherwise, if any has codes, each layer keeps
        # its own product (``parts``), concatenated
        coded = [getattr(lin, "weight_int4", None) is not None for lin in linears]
        stack = all(coded) and len({lin.int4_group for lin in linears}) == 1 \
            and all(lin.out_features % 64 == 0 for lin in linears)
        self.weight_int4 = torch.cat([lin.weight_int4 for lin in linears]).contiguous() if stack else None
        self.int4_scales = torch.cat([lin.int4_scales for lin in linears], dim=1).contiguous() if stack else None
        self.int4_group = linears[0].int4_group if stack else 0
        self.parts = list(linears) if any(coded) and not stack else []
        # The layers keep their weights as views into the stacked ones: no second copy in memory (but for the
        # small int4 scales, whose column slices are copied).
        start = 0
        for lin in linears:
            end = start + lin.out_features
            lin.weight_int8, lin.scale = self.weight_int8[start:end], self.scale[start:end]
            if self.weight_bf16 is not None:
                lin.weight_bf16 = self.weight_bf16[start:end]
            if self.weight_int4 is not None:
                lin.weight_int4 = self.weight_int4[start:end]
                lin.int4_scales = self.int4_scales[:, start:end].contiguous()
            start = end

    def __call__(self, flat_bf16: Any) -> Any:
        """``flat_bf16``: (rows, in) bfloat16, contiguous. Returns (rows, out) float32."""
        import torch

        if self.parts and not (self.weight_bf16 is not None and flat_bf16.shape[0] >= self.bf16_from_rows):
            return torch.cat([weight_only_product(lin, flat_bf16) for lin in self.parts], dim=-1).float()
        return weight_only_product(self, flat_bf16).float()


class LeanLlamaForward:
    """``model(input_ids=..., use_cache=True, logits_to_keep=..., attention_mask=..., position_ids=...,
    past_key_values=...)`` for a Llama fast copy, with fewer operations than transformers' forward (see the
    module docstring). The weights are the model's own tensors (stacked copies of the projections)."""

    def __init__(self, model: Any) -> None:
        import torch

        config = model.config
        inner = model.model
        self._config = config
        self._embed = inner.embed_tokens.weight
        self._rotary = inner.rotary_emb
        self._norm = inner.norm.weight
        self._eps = float(inner.norm.variance_epsilon)
        self._head = model.lm_head
        self._heads = int(config.num_attention_heads)
        self._kv_heads = int(config.num_key_value_heads)
        self._head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        self._scaling = self._head_dim ** -0.5
        self._layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self._layers.append((
                layer.input_layernorm.weight, float(layer.input_layernorm.variance_epsilon),
                _Matmul([attn.q_proj, attn.k_proj, attn.v_proj]), _Matmul([attn.o_proj]),
                layer.post_attention_layernorm.weight, float(layer.post_attention_layernorm.variance_epsilon),
                _Matmul([mlp.gate_proj, mlp.up_proj]), _Matmul([mlp.down_proj]),
            ))
        self._split = (self._heads * self._head_dim, self._kv_heads * self._head_dim, self._kv_heads * self._head_dim)
        self._torch = torch
        from transformers.modeling_outputs import CausalLMOutputWithPast

        self._output = CausalLMOutputWithPast
        self._cache_field = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

    def __call__(self, input_ids: Any, *, use_cache: bool = True, logits_to_keep: int = 0,
                 attention_mask: Any = None, position_ids: Any = None, past_key_values: Any = None,
                 cache: Any = None, **_: Any) -> Any:
        torch = self._torch
        from transformers import DynamicCache

        kv = cache if cache is not None else past_key_values
        if kv is None:
            kv = DynamicCache(config=self._config)
        batch, width = input_ids.shape
        past = kv.get_seq_length()
        total = past + width
        device = input_ids.device
        if position_ids is None:
            position_ids = (torch.arange(width, device=device) + past).unsqueeze(0)
        hidden = torch.nn.functional.embedding(input_ids, self._embed)
        cos, sin = self._rotary(hidden, position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        mask = self._mask(attention_mask, batch, width, past, total, device)
        heads, kv_heads, dim = self._heads, self._kv_heads, self._head_dim
        half = dim // 2
        rows = batch * width
        for index, (ln1, eps1, qkv, out_proj, ln2, eps2, gate_up, down) in enumerate(self._layers):
            x = _rms(hidden, ln1, eps1).reshape(rows, -1).to(torch.bfloat16)
            q, k, v = qkv(x).split(self._split, dim=-1)
            q = q.view(batch, width, heads, dim).transpose(1, 2)
            k = k.view(batch, width, kv_heads, dim).transpose(1, 2)
            v = v.view(batch, width, kv_heads, dim).transpose(1, 2)
            q = q * cos + torch.cat((-q[..., half:], q[..., :half]), dim=-1) * sin
            k = k * cos + torch.cat((-k[..., half:], k[..., :half]), dim=-1) * sin
            k, v = _append(kv, index, k, v)
            if mask is not None and width == 1 and heads != kv_heads:
                # transformers' route for one masked query token (pack_gqa): the query heads of each key/value
                # head as rows of one query; it rounds differently from enable_gqa
                attn = torch.nn.functional.scaled_dot_product_attention(
                    q.reshape(batch, kv_heads, heads // kv_heads, dim), k, v, attn_mask=mask,
                    scale=self._scaling).reshape(batch, heads, 1, dim)
            else:
                attn = torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, scale=self._scaling, enable_gqa=True)
            attn = attn.transpose(1, 2).reshape(rows, -1).to(torch.bfloat16)
            hidden = hidden + out_proj(attn).view(batch, width, -1)
            x = _rms(hidden, ln2, eps2).reshape(rows, -1).to(torch.bfloat16)
            gate, up = gate_up(x).chunk(2, dim=-1)
            x = (torch.nn.functional.silu(gate) * up).to(torch.bfloat16)
            hidden = hidden + down(x).view(batch, width, -1)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        hidden = _rms(hidden, self._norm, self._eps)
        return self._output(logits=self._head(hidden), **{self._cache_field: kv})

    def _mask(self, attention_mask: Any, batch: int, width: int, past: int, total: int, device: Any) -> Any:
        """The boolean attention mask of one pass (True = may attend): causal over cache columns, and the
        2D ``attention_mask``'s holes; None for one row of one token without holes."""
        torch = self._torch
        if width == 1 and (attention_mask is None or bool(attention_mask[:, :total].all())):
            return None  # as transformers: one query token that may see every column needs no mask
        cols = torch.arange(total, device=device)
        mine = torch.arange(width, device=device) + past
        mask = (cols[None, :] <= mine[:, None])[None, None]  # (1, 1, width, total)
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, :total].bool()
            # A padding column's own query sees nothing else: let it see itself, so that its (unused) output
            # and the key/value rows computed from it stay finite.
            mask = mask | (cols[None, :] == mine[:, None])[None, None]
        return mask.expand(batch, 1, width, total)


def _append(kv: Any, index: int, keys: Any, values: Any) -> tuple[Any, Any]:
    """``kv.update(keys, values, index)`` without copying the whole cache each pass: an initialised
    ``DynamicLayer`` keeps its keys and values as the leading columns of buffers with room for more, and
    new columns are written after them. A layer whose tensors were replaced since (rows selected or spliced
    in, columns compacted) gets new buffers; one that was cropped keeps its buffers (the cropped columns are
    written over). Other layers and first passes go through ``update``."""
    layers = getattr(kv, "layers", None)
    if layers is None or index >= len(layers) or type(layers[index]).__name__ != "DynamicLayer" \
            or not getattr(layers[index], "is_initialized", False):
        return kv.update(keys, values, index)
    layer = layers[index]
    layer.keys, layer._aad_keys = _grow(layer.keys, getattr(layer, "_aad_keys", None), keys)
    layer.values, layer._aad_values = _grow(layer.values, getattr(layer, "_aad_values", None), values)
    return layer.keys, layer.values


def _grow(view: Any, buffer: Any, new: Any) -> tuple[Any, Any]:
    """``view`` (batch, heads, columns, dim) with ``new``'s columns after it, as the leading columns of
    ``buffer`` (reused when ``view`` is its leading part and it has room, else a new one with room for
    more); returns (the view, the buffer)."""
    used, added = view.shape[2], new.shape[2]
    if (buffer is None or view.data_ptr() != buffer.data_ptr() or view.shape[:2] != buffer.shape[:2]
            or view.stride() != buffer.stride() or used + added > buffer.shape[2]):
        need = used + added
        buffer = view.new_empty((view.shape[0], view.shape[1], need + max(64, need // 2), view.shape[3]))
        buffer[:, :, :used] = view
    buffer[:, :, used:used + added] = new
    return buffer[:, :, :used + added], buffer


def _rms(hidden: Any, weight: Any, eps: float) -> Any:
    """LlamaRMSNorm's arithmetic (float32 throughout)."""
    import torch

    variance = hidden.pow(2).mean(-1, keepdim=True)
    return weight * (hidden * torch.rsqrt(variance + eps))
