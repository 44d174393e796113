"""The lean forward pass of int8 fast copies (issue 16): the same logits as transformers' Llama forward,
bit for bit, in every shape the runtime feeds it (a prompt without cache, one token, drafted tokens, a
batch with holes and explicit positions), installed only where it applies. Tiny random students, and one
real SmolLM2 test."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from test_specialist_speed import _adapter, _request, _runtime, peaked_student  # noqa: F401
from tiny_models import make_tiny_student  # noqa: F401


def _int8_copy(student: Path, bf16_from_rows: int = 0, int4_group: int = 0) -> Any:
    from transformers import AutoModelForCausalLM

    from aad_core.models.runtime import _int8_linears

    model = AutoModelForCausalLM.from_pretrained(student).eval()
    return _int8_linears(model, bf16_from_rows=bf16_from_rows, int4_group=int4_group)


def _cache_of(out: Any) -> Any:
    return next(v for k, v in out.items() if k in ("cache", "past_key_values"))


@pytest.mark.parametrize(("bf16_from_rows", "int4_group"), [(0, 0), (4, 0), (4, 32), (0, 32)])
def test_the_lean_forward_computes_transformers_logits_bit_for_bit(peaked_student: Path, bf16_from_rows: int,
                                                                   int4_group: int) -> None:
    import torch

    from aad_core.models.lean_llama import LeanLlamaForward, lean_forward
    from aad_core.models.runtime import _cache_kwarg

    reference = _int8_copy(peaked_student, bf16_from_rows, int4_group)
    lean_model = _int8_copy(peaked_student, bf16_from_rows, int4_group)
    if int4_group:  # every layer but the output layer (int8 there) holds int4 codes
        head = reference.get_output_embeddings()
        assert all((m.weight_int4 is None) == (m is head) for m in reference.modules() if hasattr(m, "weight_int4"))
    lean = lean_forward(lean_model)
    assert isinstance(lean, LeanLlamaForward)
    key = _cache_kwarg()
    torch.manual_seed(0)
    prompt = torch.randint(3, 300, (1, 20))
    with torch.no_grad():
        a, b = reference(input_ids=prompt, use_cache=True), lean(input_ids=prompt, use_cache=True)
        assert torch.equal(a.logits, b.logits)
        ca, cb = _cache_of(a), _cache_of(b)
        for width in (1, 5):  # the next token; the next token plus drafts
            step = torch.randint(3, 300, (1, width))
            x = reference(input_ids=step, use_cache=True, logits_to_keep=width, **{key: copy.deepcopy(ca)})
            y = lean(input_ids=step, use_cache=True, logits_to_keep=width, **{key: copy.deepcopy(cb)})
            assert x.logits.shape == y.logits.shape == (1, width, a.logits.shape[-1])
            assert torch.equal(x.logits, y.logits)
            for la, lb in zip(_cache_of(x).layers, _cache_of(y).layers):
                assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)
        # A batch as _lookup_decode_batch feeds it: holes in the cache (a joined row's), left and right padding.
        ba, bb = copy.deepcopy(ca), copy.deepcopy(cb)
        ba.batch_repeat_interleave(3)
        bb.batch_repeat_interleave(3)
        valid = torch.ones(3, 20, dtype=torch.bool)
        valid[1, 8:12] = False
        new = torch.tensor([[True, True, True, True, False], [False, True, True, True, True], [True] * 5])
        mask = torch.cat([valid, new], dim=1).long()
        positions = torch.tensor([[20, 21, 22, 23, 0], [0, 16, 17, 18, 19], [20, 21, 22, 23, 24]])
        step = torch.randint(3, 300, (3, 5))
        x = reference(input_ids=step, use_cache=True, logits_to_keep=5, attention_mask=mask, position_ids=positions,
                      **{key: ba})
        y = lean(input_ids=step, use_cache=True, logits_to_keep=5, attention_mask=mask, position_ids=positions,
                 **{key: bb})
        assert torch.equal(x.logits[new], y.logits[new])  # the padding columns' outputs are never read
        assert torch.isfinite(y.logits).all()
        for lb in _cache_of(y).layers:
            assert torch.isfinite(lb.keys).all() and torch.isfinite(lb.values).all()


def test_consecutive_passes_with_cropped_drafts_and_selected_rows_keep_the_cache_exact(peaked_student: Path) -> None:
    """The lean forward writes new columns into room kept after the cache's columns: passes after a crop
    (rejected drafts), a row selection (finished rows leaving) and a splice (a row joining) still see
    exactly transformers' cache."""
    import torch

    from aad_core.models.lean_llama import lean_forward
    from aad_core.models.runtime import _cache_kwarg

    reference, lean_model = _int8_copy(peaked_student), _int8_copy(peaked_student)
    lean = lean_forward(lean_model)
    key = _cache_kwarg()
    torch.manual_seed(1)
    prompt = torch.randint(3, 300, (3, 12))
    with torch.no_grad():
        ca, cb = _cache_of(reference(input_ids=prompt, use_cache=True)), _cache_of(lean(input_ids=prompt, use_cache=True))
        for step in range(8):
            rows = ca.layers[0].keys.shape[0]
            ids = torch.randint(3, 300, (rows, 3))
            x = reference(input_ids=ids, use_cache=True, logits_to_keep=3, **{key: ca})
            y = lean(input_ids=ids, use_cache=True, logits_to_keep=3, **{key: cb})
            assert torch.equal(x.logits, y.logits), step
            ca, cb = _cache_of(x), _cache_of(y)
            ca.crop(-2)  # two drafts rejected
            cb.crop(-2)
            if step == 3:  # a row leaves
                for c in (ca, cb):
                    c.batch_select_indices(torch.tensor([0, 2]))
            if step == 5:  # a row joins: its columns copied from row 0
                for c in (ca, cb):
                    for layer in c.layers:
                        layer.keys = torch.cat([layer.keys, layer.keys[:1]])
                        layer.values = torch.cat([layer.values, layer.values[:1]])
            for la, lb in zip(ca.layers, cb.layers):
                assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)
        assert cb.get_seq_length() == ca.get_seq_length() == 12 + 8


def test_a_row_decodes_with_the_same_arithmetic_alone_and_in_a_batch(peaked_student: Path) -> None:
    """Int8 weight-only products are row by row: a row's logits are the same alone and beside 5 other rows,
    through the lean forward's batch layout (with ``bf16_from_rows`` > 0 the passes of at least that many
    rows use bfloat16 copies, whose rounding depends on the pass's width)."""
    import torch

    from aad_core.models.lean_llama import lean_forward
    from aad_core.models.runtime import _cache_kwarg

    lean = lean_forward(_int8_copy(peaked_student, bf16_from_rows=0))
    key = _cache_kwarg()
    torch.manual_seed(2)
    prompts = torch.randint(3, 300, (6, 10))
    steps = torch.randint(3, 300, (6, 3))  # a token and two drafts per row: 18 rows of matmul in the batch
    with torch.no_grad():
        batch = lean(input_ids=prompts, use_cache=True)
        together = lean(input_ids=steps, use_cache=True, logits_to_keep=3, **{key: _cache_of(batch)}).logits
        for row in range(6):
            alone = lean(input_ids=prompts[row:row + 1], use_cache=True)
            assert torch.equal(alone.logits, batch.logits[row:row + 1])
            step = lean(input_ids=steps[row:row + 1], use_cache=True, logits_to_keep=3, **{key: _cache_of(alone)})
            assert torch.equal(step.logits, together[row:row + 1])


@pytest.fixture(scope="module")
def smollm2_shaped() -> Any:
    """A random 2-layer Llama with SmolLM2-135M's attention shape (576 wide, 9 query heads over 3 key/value
    heads of 64), weights scaled up so that rounding differences show in the logits."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=4096,
                         rope_theta=100000.0, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(3.0)
    return model


@pytest.mark.parametrize(("bf16_from_rows", "int4_group"), [(0, 0), (16, 0), (16, 32)])
def test_masked_one_token_passes_and_left_padded_generate_match_transformers(smollm2_shaped: Any,
                                                                            bf16_from_rows: int, int4_group: int) -> None:
    """transformers attends one masked query token through another route (its query heads packed per
    key/value head) than several tokens, and drops an all-ones mask of one token: the lean forward follows
    both, so a batch decoding one token per row with holes, and generate() over left-padded prompts, get
    transformers' logits exactly."""
    import torch

    from aad_core.models.lean_llama import lean_forward
    from aad_core.models.runtime import _cache_kwarg, _int8_linears

    reference = _int8_linears(copy.deepcopy(smollm2_shaped), bf16_from_rows=bf16_from_rows, int4_group=int4_group)
    lean_model = _int8_linears(copy.deepcopy(smollm2_shaped), bf16_from_rows=bf16_from_rows, int4_group=int4_group)
    lean_model.forward = lean_forward(lean_model)
    key = _cache_kwarg()
    torch.manual_seed(3)
    with torch.no_grad():
        prompt = torch.randint(3, 1000, (1, 30))
        ca, cb = _cache_of(reference(input_ids=prompt, use_cache=True)), _cache_of(lean_model(input_ids=prompt, use_cache=True))
        for rows in (4, 1):  # a batch with holes; one row with holes; then one row without (mask all ones)
            ba, bb = copy.deepcopy(ca), copy.deepcopy(cb)
            if rows > 1:
                ba.batch_repeat_interleave(rows)
                bb.batch_repeat_interleave(rows)
            valid = torch.ones(rows, 30, dtype=torch.bool)
            for r in range(rows):
                valid[r, 5 + r: 9 + 2 * r] = False
            for holes in (True, False):
                mask = torch.cat([valid if holes else torch.ones_like(valid), torch.ones(rows, 1, dtype=torch.bool)], 1)
                ids = torch.randint(3, 1000, (rows, 1))
                kw = {"attention_mask": mask.long(), "position_ids": mask.sum(1, keepdim=True) - 1}
                x = reference(input_ids=ids, use_cache=True, logits_to_keep=1, **kw, **{key: copy.deepcopy(ba)})
                y = lean_model(input_ids=ids, use_cache=True, logits_to_keep=1, **kw, **{key: copy.deepcopy(bb)})
                assert torch.equal(x.logits, y.logits), (rows, holes)
        rest = [torch.randint(3, 1000, (n,)).tolist() for n in (4, 9, 6)]
        ids = torch.tensor([[0] * (9 - len(r)) + r for r in rest])
        mask = torch.tensor([[0] * (9 - len(r)) + [1] * len(r) for r in rest])
        outs = [m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                           eos_token_id=None, output_logits=True, return_dict_in_generate=True)
                for m in (reference, lean_model)]
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    assert all(torch.equal(a, b) for a, b in zip(outs[0].logits, outs[1].logits))


def test_int4_layers_beside_layers_the_kernel_cannot_pack_match_transformers() -> None:
    """A key projection 8 channels wide cannot hold int4 codes (the kernel packs 16 at a time) while the query
    projection beside it does: the lean forward multiplies each as its own Int8Linear would."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from aad_core.models.lean_llama import lean_forward
    from aad_core.models.runtime import _int4_supported, _int8_linears

    if not _int4_supported():
        pytest.skip("this torch build has no CPU int4 kernel")
    torch.manual_seed(4)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=1, max_position_embeddings=256)
    base = LlamaForCausalLM(config).eval()
    reference = _int8_linears(copy.deepcopy(base), int4_group=32)
    lean_model = _int8_linears(copy.deepcopy(base), int4_group=32)
    attn = reference.model.layers[0].self_attn
    assert attn.q_proj.weight_int4 is not None and attn.k_proj.weight_int4 is None
    lean = lean_forward(lean_model)
    with torch.no_grad():
        prompt = torch.randint(3, 256, (2, 7))
        assert torch.equal(reference(input_ids=prompt).logits, lean(input_ids=prompt).logits)


def test_the_lean_forward_applies_only_to_llama_int8_copies(peaked_student: Path) -> None:
    from transformers import AutoModelForCausalLM

    from aad_core.models.lean_llama import lean_forward

    float_model = AutoModelForCausalLM.from_pretrained(peaked_student)
    assert lean_forward(float_model) is None  # no int8 layers: the "merged" path keeps transformers' forward
    biased = _int8_copy(peaked_student)
    biased.config.attention_bias = True
    assert lean_forward(biased) is None
    eager = _int8_copy(peaked_student)
    eager.config._attn_implementation = "eager"  # its attention rounds otherwise than SDPA
    assert lean_forward(eager) is None
    assert lean_forward(object()) is None


def test_the_runtime_answers_through_the_lean_forward_as_before(peaked_student: Path, tmp_path: Path) -> None:
    from test_specialist_speed import USERS, _same

    from aad_core.models.lean_llama import LeanLlamaForward

    adapter = _adapter(peaked_student, tmp_path / "a", 1)
    rt = _runtime(peaked_student, bf16_from_rows=0)
    rt.add_adapter("a", adapter)
    requests = [_request(u) for u in USERS]
    answers = [rt.generate([r], max_new_tokens=12, adapter="a")[0] for r in requests]
    assert isinstance(rt._fast["a"].forward, LeanLlamaForward)
    # The same copy through transformers' forward answers the same (prefix cache emptied: built by the lean one).
    del rt._fast["a"].forward
    rt._drop_prefixes("a")
    assert not isinstance(rt._fast["a"].forward, LeanLlamaForward)
    _same([rt.generate([r], max_new_tokens=12, adapter="a")[0] for r in requests], answers)


@pytest.mark.real_model
def test_the_lean_forward_matches_transformers_on_the_real_student() -> None:
    import torch

    from aad_core.models.lean_llama import lean_forward
    from aad_core.models.runtime import _int8_linears
    from aad_core.models.students import load_student

    model, tok = load_student("smollm2-135m", device="cpu")
    model = _int8_linears(copy.deepcopy(model).eval())
    ids = tok("Extract the order id from: my order 12345 of a blue kettle never came.", return_tensors="pt").input_ids
    with torch.no_grad():
        a = model(input_ids=ids, use_cache=True)
        lean = lean_forward(model)
        assert lean is not None
        b = lean(input_ids=ids, use_cache=True)
    assert torch.equal(a.logits, b.logits)
