"""Hybrids generate with a HybridCache: cached == uncached, left-padded batches == single prompts."""
from __future__ import annotations

import warnings

import pytest
import torch

from hybridize.model.cache import CACHE_ARG_NAMES, HybridCache, cache_arg_name
from hybridize.errors import HybridizeError
from hybridize.registry.manager import get_plugin_manager
from hybridize.model.surgery import build_student
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


CACHE = cache_arg_name(type(tiny_model("llama", n_layer=1, vocab=8).model).forward)  # this transformers' name
OTHER = next(n for n in CACHE_ARG_NAMES if n != CACHE)


def cache_of(out):
    return getattr(out, CACHE)


def test_forward_with_default_use_cache_works(teacher):
    s = student_of(teacher, "gdn")
    out = s(torch.randint(3, 64, (2, 7)))  # use_cache defaults to True: a HybridCache is made
    assert isinstance(cache_of(out), HybridCache)
    assert cache_of(out).get_seq_length() == 7
    assert cache_of(out).get_seq_length(0) == 7  # layer 0 is linear and still knows the length


@pytest.mark.parametrize("name", VARIANTS)
def test_base_model_decodes_like_the_whole_sequence(teacher, name):
    """``hybrid.model`` (what AutoModel gives) with the default use_cache: prefix then one step == full."""
    s = student_of(teacher, name)
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = s.model(ids).last_hidden_state
        first = s.model(ids[:, :7])  # config.use_cache is True: the backbone makes a HybridCache
        assert isinstance(cache_of(first), HybridCache)
        step = s.model(ids[:, 7:], **{CACHE: cache_of(first)}).last_hidden_state
    torch.testing.assert_close(step[:, -1], full[:, -1])


@pytest.mark.parametrize("arg", ["cache", "past_key_values"])
def test_cache_accepted_under_either_name(teacher, arg):
    s = student_of(teacher, "gdn")
    ids = torch.randint(3, 64, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers >= 5.24 deprecates the old name
        cache = HybridCache(3, [0, 2])
        s(ids[:, :5], use_cache=True, **{arg: cache})
        step = s(ids[:, 5:], use_cache=True, **{arg: cache}).logits[:, -1]
        full = s(ids, use_cache=False).logits[:, -1]
    torch.testing.assert_close(step, full)
    assert cache.get_seq_length() == 6


@pytest.mark.parametrize("arg", ["cache", "past_key_values"])
def test_plain_dynamic_cache_is_refused_for_linear_layers(teacher, arg):
    from transformers import DynamicCache

    s = student_of(teacher, "gdn")
    with pytest.raises(HybridizeError, match="DynamicCache, which has no recurrent state; pass hybridize's HybridCache"):
        s(torch.randint(3, 64, (1, 4)), use_cache=True, **{arg: DynamicCache()})
    with pytest.raises(HybridizeError, match="DynamicCache, which has no recurrent state"):
        s.model(torch.randint(3, 64, (1, 4)), **{arg: DynamicCache()})


def test_generate_refuses_a_plain_dynamic_cache(teacher):
    from transformers import DynamicCache

    s = student_of(teacher, "gdn")
    with pytest.raises(HybridizeError, match="DynamicCache, which has no recurrent state"):
        s.generate(torch.randint(3, 64, (1, 4)), max_new_tokens=2, do_sample=False, pad_token_id=0,
                   **{CACHE: DynamicCache()})


@pytest.mark.parametrize("how", ["state dropped", "layer reset"])
def test_linear_layer_refuses_to_continue_without_its_state(teacher, how):
    s = student_of(teacher, "gdn")
    ids = torch.randint(3, 64, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache = cache_of(s(ids[:, :5]))
        if how == "state dropped":
            cache.layers[0].state = None  # the layer saw 5 tokens but kept nothing
        else:
            cache.layers[0].reset()  # the softmax layer 1 still holds 5 tokens
        with pytest.raises(HybridizeError, match=r"layer 0 \(.*\) is asked to continue a sequence of 5 cached tokens "
                                                 r"but the cache holds no recurrent state for it"):
            s(ids[:, 5:], **{CACHE: cache})


def test_linear_layer_refuses_a_cache_under_an_unknown_name(teacher):
    s = student_of(teacher, "gdn")
    attn = s.model.layers[0].self_attn
    with pytest.raises(HybridizeError, match="as argument 'cache_params', a cache name hybridize does not know"):
        attn(torch.zeros(1, 2, 32, dtype=torch.float64), cache_params=HybridCache(3, [0, 2]))


def test_linear_layer_takes_the_cache_under_either_name(teacher):
    s = student_of(teacher, "gdn")
    attn = s.model.layers[0].self_attn.eval()
    x = torch.randn(1, 5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    outs = []
    for arg in CACHE_ARG_NAMES:
        cache = HybridCache(3, [0, 2])
        with torch.no_grad():
            outs.append(torch.cat([attn(x[:, t:t + 1], **{arg: cache})[0] for t in range(5)], 1))
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(outs[0], attn(x)[0])


def test_cache_cannot_be_cropped():
    cache = HybridCache(2, [0])
    with pytest.raises(HybridizeError, match="cannot be rolled back"):
        cache.crop(3)


def test_beam_reorder_moves_state():
    cache = HybridCache(2, [0])
    cache.set_linear_state(0, {"recurrent": torch.arange(3.0)[:, None]}, 4)
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    assert cache.get_linear_state(0)["recurrent"].flatten().tolist() == [2.0, 2.0, 0.0]
