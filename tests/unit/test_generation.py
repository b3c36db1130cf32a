"""Hybrids generate with a HybridCache: cached == uncached, left-padded batches == single prompts."""
from __future__ import annotations

import pytest
import torch

from hybridize.cache import HybridCache
from hybridize.errors import HybridizeError
from hybridize.plugins_manager import get_plugin_manager
from hybridize.surgery import build_student
from hybridize.testing.models import tiny_model

VARIANTS = sorted(get_plugin_manager().registry("linear_attention"))


@pytest.fixture(scope="module")
def teacher():
    return tiny_model("llama", n_layer=3, vocab=64).double()


def student_of(teacher, name, softmax=(1,)):
    return build_student(teacher, list(softmax), name).double().eval()


def greedy(model, ids, mask=None, use_cache=True, n=12):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, use_cache=use_cache,
                              pad_token_id=0, eos_token_id=None)


@pytest.mark.parametrize("name", VARIANTS)
def test_cached_equals_uncached_single_prompt(teacher, name):
    s = student_of(teacher, name)
    ids = torch.randint(3, 64, (1, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy(s, ids), greedy(s, ids, use_cache=False))


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("softmax", [(1,), ()], ids=["hybrid", "all-linear"])
def test_left_padded_batch_equals_single_prompts(teacher, name, softmax):
    s = student_of(teacher, name, softmax)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 64, (n,), generator=g) for n in (9, 5, 2)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], mask[r, width - len(p):] = p, 1
    batch = greedy(s, ids, mask)
    for r, p in enumerate(prompts):
        single = greedy(s, p[None])
        assert torch.equal(batch[r, width:], single[0, len(p):]), f"row {r}"
    assert torch.equal(batch, greedy(s, ids, mask, use_cache=False))


def test_forward_with_default_use_cache_works(teacher):
    s = student_of(teacher, "gdn")
    out = s(torch.randint(3, 64, (2, 7)))  # use_cache defaults to True: a HybridCache is made
    assert isinstance(out.past_key_values, HybridCache)
    assert out.past_key_values.get_seq_length() == 7
    assert out.past_key_values.get_seq_length(0) == 7  # layer 0 is linear and still knows the length


def test_plain_dynamic_cache_is_refused_for_linear_layers(teacher):
    from transformers import DynamicCache

    s = student_of(teacher, "gdn")
    with pytest.raises(HybridizeError, match="HybridCache"):
        s(torch.randint(3, 64, (1, 4)), past_key_values=DynamicCache(), use_cache=True)


def test_cache_cannot_be_cropped():
    cache = HybridCache(2, [0])
    with pytest.raises(HybridizeError, match="cannot be rolled back"):
        cache.crop(3)


def test_beam_reorder_moves_state():
    cache = HybridCache(2, [0])
    cache.set_linear_state(0, {"recurrent": torch.arange(3.0)[:, None]}, 4)
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    assert cache.get_linear_state(0)["recurrent"].flatten().tolist() == [2.0, 2.0, 0.0]
