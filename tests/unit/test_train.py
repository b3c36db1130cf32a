"""The training loop: exact resume after a crash, cosine schedule, gradient accumulation."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from hybridize.training.loop import Loop, LoopConfig, cosine_lambda


class TinyLM(nn.Module):
    def __init__(self, vocab=17, d=8):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.out = nn.Linear(d, vocab)
        self.frozen = nn.Linear(d, d).requires_grad_(False)

    def loss(self, ids):
        h = torch.tanh(self.mix(self.emb(ids[:, :-1]))) + self.frozen(self.emb(ids[:, :-1]))
        return nn.functional.cross_entropy(self.out(h).reshape(-1, self.out.out_features), ids[:, 1:].reshape(-1))


BLOCKS = torch.randint(0, 17, (13, 9), generator=torch.Generator().manual_seed(1))


class Crash(Exception):
    pass


def make_loop(model, tmp_path, *, on_step=None, micro=4, steps=7):
    cfg = LoopConfig(steps=steps, batch_size=4, micro_batch_size=micro, lr=3e-2, warmup_steps=2, checkpoint_every=2, eval_every=3, seed=5)
    return Loop(name="t", model=model, param_groups=[{"params": [p for p in model.parameters() if p.requires_grad]}],
                loss_fn=model.loss, blocks=BLOCKS, cfg=cfg, device=torch.device("cpu"), ckpt_path=tmp_path / "t.pt",
                evaluate=lambda: {"w": float(model.mix.weight.detach().sum())}, on_step=on_step, progress=False)


def test_killed_and_resumed_equals_uninterrupted(tmp_path):
    ref = TinyLM()
    ref_hist = make_loop(ref, tmp_path / "a").run()

    crashed = TinyLM()

    def crash(step, tokens, metrics):
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        make_loop(crashed, tmp_path / "b", on_step=crash).run()
    resumed = TinyLM()  # a fresh process: fresh init, state comes from the checkpoint (step 4)
    loop = make_loop(resumed, tmp_path / "b")
    assert loop.try_resume() and loop.step == 4
    hist = loop.run()
    for (n, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    assert hist == ref_hist
    assert loop.tokens == 7 * 4 * 9


def test_gradient_accumulation_matches_full_batch(tmp_path):
    a, b = TinyLM(), TinyLM()
    make_loop(a, tmp_path / "a", micro=4).run()
    make_loop(b, tmp_path / "b", micro=2).run()
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_cosine_schedule_shape():
    f = cosine_lambda(100, 10, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert all(f(i) >= f(i + 1) for i in range(10, 100))


def test_checkpoint_loads_with_weights_only(tmp_path):
    loop = make_loop(TinyLM(), tmp_path, steps=2)
    loop.run()
    state = torch.load(tmp_path / "t.pt", weights_only=True)
    assert state["step"] == 2 and "frozen.weight" not in state["model"]
