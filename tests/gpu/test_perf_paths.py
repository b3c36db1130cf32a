"""GPU checks of the fast paths (run through the device machine): each against the path it replaces.

- the fused chunked KL (gradients in the forward, torch.compile-d elementwise part) vs the
  checkpointed autograd KL, values and gradients;
- fla's short-convolution and gated-norm kernels vs their torch forms, values and gradients;
- a GDN / GLA module on fla's kernels end to end vs the torch reference (bf16);
- CUDA-graph decoding (hybridize.ops.decode_graphs) vs eager decoding: the same greedy tokens and states.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # collected on CPU machines, never run there
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from hybridize.ops import decode_graphs  # noqa: E402
from hybridize.training import losses  # noqa: E402
from hybridize.ops.common import GatedRMSNorm, ShortConvolution  # noqa: E402
from hybridize.registry.manager import get_plugin_manager  # noqa: E402

VARIANTS = sorted(get_plugin_manager().registry("linear_attention"))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_fused_kl_matches_checkpointed(dtype, tol, tau):
    g = torch.Generator(device="cuda").manual_seed(0)
    N, D, V = 3000, 64, 5000  # 3000 tokens = 2 full chunks of 1024 and a shorter one (a second compiled shape)
    hs0, ht = (torch.randn(1, N, D, device="cuda", generator=g, dtype=dtype) for _ in range(2))
    lm_s, lm_t = (torch.nn.Linear(D, V, bias=True).cuda().to(dtype) for _ in range(2))
    out = {}
    for impl in ("checkpoint", "fused"):
        hs = hs0.clone().requires_grad_(True)
        lm_s.zero_grad()
        kl = losses.chunked_kl(hs, ht, lm_s, lm_t, temperature=tau, chunk_tokens=1024, impl=impl)
        (2.0 * kl).backward()
        out[impl] = (kl.detach(), hs.grad, lm_s.weight.grad, lm_s.bias.grad)
    assert not losses._compile_failed, losses._compile_failed
    for a, b in zip(out["fused"], out["checkpoint"]):
        assert rel(a, b) <= tol


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("activation", ["silu", None])
def test_fla_short_convolution_matches_torch(dtype, tol, activation):
    torch.manual_seed(0)
    conv = ShortConvolution(256, 4, activation=activation, conv_init="random").cuda()
    x0 = torch.randn(2, 300, 256, device="cuda", dtype=dtype)
    out = {}
    for backend in ("fla", "torch"):
        x = x0.clone().requires_grad_(True)
        conv.zero_grad()
        y, _ = conv(x, backend=backend)
        y.float().square().sum().backward()
        out[backend] = (y.detach(), x.grad, conv.weight.grad)
    for a, b in zip(out["fla"], out["torch"]):
        assert rel(a, b) <= tol


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_fla_gated_norm_matches_torch(dtype, tol):
    torch.manual_seed(0)
    norm = GatedRMSNorm(64, 1e-5).cuda()
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1)
    x0, g0 = (torch.randn(2, 100, 4, 64, device="cuda", dtype=dtype) for _ in range(2))
    out = {}
    for backend in ("fla", "torch"):
        x, g = x0.clone().requires_grad_(True), g0.clone().requires_grad_(True)
        norm.zero_grad()
        y = norm(x, g, backend=backend)
        y.float().square().sum().backward()
        out[backend] = (y.detach(), x.grad, g.grad, norm.weight.grad)
    for a, b in zip(out["fla"], out["torch"]):
        assert rel(a, b) <= tol


@pytest.mark.parametrize("name", VARIANTS)
def test_module_on_fla_matches_torch_bf16(name):
    from hybridize.linear import AttentionSpec
    from hybridize.testing.conformance import random_teacher_weights

    entry = get_plugin_manager().registry("linear_attention")[name]
    spec = AttentionSpec(layer_idx=0, hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64)
    params = {"use_short_conv": True} if name == "gla" else {}
    torch.manual_seed(0)
    mod = entry.factory(spec, entry.build_config(params))
    mod.load_teacher_weights(random_teacher_weights(spec, seed=0))
    mod = mod.cuda().to(torch.bfloat16)
    x0 = torch.randn(2, 256, 256, device="cuda", dtype=torch.bfloat16)
    out = {}
    for backend in ("fla", "torch"):
        x = x0.clone().requires_grad_(True)
        mod.zero_grad()
        y, _ = mod.mix(x, backend=backend)
        y.float().square().mean().backward()
        out[backend] = (y.detach(), x.grad, mod.o_proj.weight.grad, mod.q_proj.weight.grad)
    for a, b in zip(out["fla"], out["torch"]):
        assert rel(a, b) <= 3e-2


@pytest.mark.parametrize("name", VARIANTS)
def test_cuda_graph_decoding_equals_eager(name, monkeypatch):
    from hybridize.model.surgery import build_student
    from hybridize.testing.models import tiny_model

    teacher = tiny_model("llama", n_layer=4, d=128, heads=4, kv_heads=2).cuda().to(torch.bfloat16)
    student = build_student(teacher, [1], name).eval()
    ids = torch.randint(3, 60, (3, 20), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    kw = dict(max_new_tokens=24, do_sample=False, pad_token_id=0)
    runs = {}
    for enabled in (False, True):
        monkeypatch.setattr(decode_graphs, "ENABLED", enabled)
        decode_graphs.clear()
        with torch.no_grad():
            runs[enabled] = student.generate(ids, **kw)
        captured = sum(decode_graphs.captured(layer.self_attn) for layer in student.model.layers)
        assert captured == (3 if enabled else 0)  # one graph per linear layer (3 of 4), none when off
    assert torch.equal(runs[True], runs[False])
