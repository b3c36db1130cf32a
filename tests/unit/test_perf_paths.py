"""CPU checks of the performance paths of issue 7 (their GPU counterparts are in tests/gpu/test_perf_paths.py).

- the fused chunked KL gives the checkpointed KL's value and the gradients of the hidden states,
  the output projection's weight and bias, with masks, temperatures, grad_output scaling and
  chunks that do not divide the tokens; without grad it computes only the loss;
- the padding-mask answer is computed once per forward and looked at again at the next forward;
- the short convolution's returned cache is a copy, not a view of the whole input;
- CUDA-graph decoding never engages on the CPU.
"""
from __future__ import annotations

import pytest
import torch

from hybridize.ops import decode_graphs
from hybridize.linear import PADDING_MASK, _current_padding_mask, forget_padding_mask
from hybridize.training.losses import chunked_kl
from hybridize.ops.common import ShortConvolution


def _run(impl: str, hs0, ht, lm_s, lm_t, **kw):
    hs = hs0.clone().requires_grad_(True)
    lm_s.zero_grad()
    kl = chunked_kl(hs, ht, lm_s, lm_t, impl=impl, **kw)
    (kl * 3.0).backward()
    grads = [hs.grad, lm_s.weight.grad] + ([lm_s.bias.grad] if lm_s.bias is not None else [])
    return kl.detach(), grads


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tau", [1.0, 2.5])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_kl_equals_checkpointed_kl(bias, tau, masked):
    torch.manual_seed(0)
    hs0, ht = torch.randn(2, 29, 12), torch.randn(2, 29, 12)
    lm_s, lm_t = torch.nn.Linear(12, 40, bias=bias), torch.nn.Linear(12, 40, bias=bias)
    mask = (torch.rand(2, 29) > 0.3).long() if masked else None
    kw = dict(temperature=tau, chunk_tokens=8, mask=mask)
    (kl_f, g_f), (kl_c, g_c) = _run("fused", hs0, ht, lm_s, lm_t, **kw), _run("checkpoint", hs0, ht, lm_s, lm_t, **kw)
    torch.testing.assert_close(kl_f, kl_c)
    for a, b in zip(g_f, g_c):
        torch.testing.assert_close(a, b)
    if masked:  # masked tokens get no gradient
        hs = hs0.clone().requires_grad_(True)
        chunked_kl(hs, ht, lm_s, lm_t, **kw).backward()
        assert torch.all(hs.grad[mask == 0] == 0)


def test_fused_kl_tied_weights_accumulate_both_gradients():
    """A tied lm_head (Llama-3.2-1B) gets the KL's gradient added to the embedding's."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(30, 8)
    head = torch.nn.Linear(8, 30, bias=False)
    head.weight = emb.weight
    ids, ht, lm_t = torch.randint(0, 30, (1, 11)), torch.randn(1, 11, 8), torch.nn.Linear(8, 30, bias=False)
    grads = {}
    for impl in ("fused", "checkpoint"):
        emb.zero_grad()
        chunked_kl(emb(ids), ht, head, lm_t, chunk_tokens=4, impl=impl).backward()
        grads[impl] = emb.weight.grad.clone()
    torch.testing.assert_close(grads["fused"], grads["checkpoint"])


def test_fused_kl_without_grad_is_the_loss_only():
    torch.manual_seed(0)
    hs, ht = torch.randn(1, 10, 6, requires_grad=True), torch.randn(1, 10, 6)
    lm_s, lm_t = torch.nn.Linear(6, 9), torch.nn.Linear(6, 9)
    with torch.no_grad():
        kl = chunked_kl(hs, ht, lm_s, lm_t, chunk_tokens=3)
    assert not kl.requires_grad
    torch.testing.assert_close(kl, chunked_kl(hs, ht, lm_s, lm_t, chunk_tokens=3, impl="checkpoint").detach())
    # KL(p || p) = 0 when both sides are the same model
    same = chunked_kl(ht, ht, lm_t, lm_t, chunk_tokens=4)
    assert abs(float(same.detach())) < 1e-6


def test_chunked_kl_rejects_unknown_impl():
    with pytest.raises(ValueError, match="chunked_kl field 'impl' must be 'fused' or 'checkpoint'; got 'fast'"):
        chunked_kl(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.nn.Linear(3, 4), torch.nn.Linear(3, 4), impl="fast")


def test_padding_mask_is_answered_once_per_forward_and_forgotten_between():
    mask = torch.ones(2, 5, dtype=torch.long)
    token = PADDING_MASK.set(mask)
    try:
        forget_padding_mask()
        assert _current_padding_mask(2, 5) is None  # all real tokens
        mask[0, 0] = 0  # changed in place: without forgetting, the answer of this forward stands
        assert _current_padding_mask(2, 5) is None
        forget_padding_mask()  # what the padding hook does at the next forward
        got = _current_padding_mask(2, 5)
        assert got is not None and int(got[0, 0]) == 0
        assert _current_padding_mask(2, 1) is None  # another length is another question
    finally:
        PADDING_MASK.reset(token)
        forget_padding_mask()


def test_short_convolution_cache_is_a_copy_not_a_view_of_the_input():
    conv = ShortConvolution(6, 4, conv_init="random")
    x = torch.randn(2, 50, 6)
    _, cache = conv(x, output_final_state=True)
    assert cache.shape == (2, 6, 3)
    assert cache.untyped_storage().nbytes() == cache.numel() * cache.element_size()
    torch.testing.assert_close(cache, x[:, -3:].transpose(1, 2))


def test_cuda_graph_decoding_never_engages_on_cpu():
    module = torch.nn.Linear(2, 2).eval()
    x, state = torch.zeros(1, 1, 4), {"recurrent": torch.zeros(1, 1, 2, 2)}
    with torch.no_grad():
        assert not decode_graphs.usable(module, x, state, None)
    assert decode_graphs.captured(module) == 0
