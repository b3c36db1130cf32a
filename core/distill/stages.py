"""The RADLADS recipe: stage 1 (attention alignment), stage 2 (KL to the teacher), stage 3 (CE).

Stage 1 is layer-local: one teacher forward captures every layer's attention input and output,
and each linear layer learns to reproduce its teacher layer's output from the teacher's input.
Stage 2 distils the whole student to the teacher's next-token distribution with a chunked KL.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from hybridize.distill.batches import stage1_batch, stage_blocks
from hybridize.training.data import PackedData
from hybridize.errors import ConfigError
from hybridize.linear import LinearAttention
from hybridize.training.losses import chunked_ce, chunked_kl
from hybridize.model.teacher import decoder_layers
from hybridize.training.loop import Loop, LoopConfig, autocast_for, param_groups

ge0, gt0 = attrs.validators.ge(0), attrs.validators.gt(0)


@attrs.frozen(kw_only=True)
class DistillConfig:
    """Token budgets and optimisation settings of the three stages (paper defaults).

    Args:
        stage1_tokens / stage2_tokens / stage3_tokens: tokens per stage (0 skips the stage).
        temperature: KL temperature tau; the loss is scaled by tau^2.
        batch_size: blocks per optimizer step; micro_batch_size: blocks per forward (0 = batch_size).
        stage1_seq_len: block length in stage 1; must divide data.seq_len. 0 = the paper's 512 when
            data.seq_len is a larger multiple of it, else data.seq_len.
        stage1_batch_size: stage-1 blocks (of stage1_seq_len) per optimizer step; 0 = batch_size. The
            paper's is 96 (x 512 tokens).
        stage1_micro_batch_size: stage-1 blocks per forward (per rank); must divide stage1_batch_size.
            0 = auto: stage 2's tokens per forward (micro_batch_size x data.seq_len / stage1_seq_len),
            capped at the (per-rank) stage-1 batch and lowered to a divisor of it
            (:func:`hybridize.distill.batches.stage1_batch`).
        stage1_lr: stage-1 peak lr (cosine). stage2_lr_attn / stage2_lr_other: stage-2 lr of attention
            parameters (linear and softmax) / of everything else. stage3_lr: stage-3 lr.
        eval_every: steps between held-out evaluations (0 = about 10 per stage).
        eval_blocks: held-out blocks used by the periodic evaluation.
        checkpoint_every: steps between checkpoints (0 = only at the end of a stage).
        kl_chunk_tokens: tokens per chunk of the KL / CE (bounds the fp32 logits in memory).
        parallel: with several processes (torchrun, ``--nproc``): ``ddp`` replicates student and
            teacher on every rank; ``fsdp`` shards both with FSDP2 (``fully_shard``) in stages 2 and 3;
            ``auto`` takes FSDP on GPUs where a DDP replica of stage 2 would need over 70% of the memory.
            One process ignores it.
    """

    stage1_tokens: int = attrs.field(default=1_000_000, validator=ge0)
    stage2_tokens: int = attrs.field(default=2_000_000, validator=ge0)
    stage3_tokens: int = attrs.field(default=0, validator=ge0)
    temperature: float = attrs.field(default=1.0, validator=gt0)
    batch_size: int = attrs.field(default=16, validator=gt0)
    micro_batch_size: int = attrs.field(default=0, validator=ge0)
    stage1_seq_len: int = attrs.field(default=0, validator=ge0)
    stage1_batch_size: int = attrs.field(default=0, validator=ge0)
    stage1_micro_batch_size: int = attrs.field(default=0, validator=ge0)
    stage1_lr: float = attrs.field(default=1e-3, validator=gt0)
    stage2_lr_attn: float = attrs.field(default=1e-4, validator=gt0)
    stage2_lr_other: float = attrs.field(default=7e-6, validator=gt0)
    stage3_lr: float = attrs.field(default=1e-5, validator=gt0)
    warmup_fraction: float = attrs.field(default=0.01, validator=[ge0, attrs.validators.lt(1.0)])
    min_lr_ratio: float = attrs.field(default=0.1, validator=[ge0, attrs.validators.le(1.0)])
    weight_decay: float = attrs.field(default=0.0, validator=ge0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = attrs.field(default=1.0, validator=ge0)
    eval_every: int = attrs.field(default=0, validator=ge0)
    eval_blocks: int = attrs.field(default=32, validator=gt0)
    checkpoint_every: int = attrs.field(default=100, validator=ge0)
    kl_chunk_tokens: int = attrs.field(default=1024, validator=gt0)
    parallel: str = attrs.field(default="auto", validator=attrs.validators.in_(("auto", "ddp", "fsdp")))

    def __attrs_post_init__(self) -> None:
        problems = []
        if self.batch_size % (self.micro_batch_size or self.batch_size):
            problems.append(f"distill field 'micro_batch_size' must divide batch_size={self.batch_size}; got {self.micro_batch_size}")
        s1_batch = self.stage1_batch_size or self.batch_size
        if self.stage1_micro_batch_size and s1_batch % self.stage1_micro_batch_size:
            which = "stage1_batch_size" if self.stage1_batch_size else "stage1_batch_size (0: batch_size)"
            problems.append(f"distill field 'stage1_micro_batch_size' must divide {which}={s1_batch}; "
                            f"got {self.stage1_micro_batch_size} (0 = auto)")
        if problems:
            raise ConfigError(problems)


def linear_modules(model: nn.Module) -> dict[int, LinearAttention]:
    """layer index -> linear-attention module of a hybrid."""
    return {i: l.self_attn for i, l in enumerate(decoder_layers(model)) if isinstance(l.self_attn, LinearAttention)}


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_attention(teacher: nn.Module, input_ids: torch.Tensor, layers: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """One teacher forward; returns layer -> (attention input, attention output).

    The forward stops after the last requested layer.

    Shape:
        input_ids: (B, T) -> each tensor (B, T, hidden)
    """
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    last = max(layers)

    def hook(i: int):
        def fn(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x = kwargs.get("hidden_states", args[0] if args else None)
            out[i] = (x, output[0] if isinstance(output, tuple) else output)
            if i == last:
                raise _StopForward

        return fn

    blocks = decoder_layers(teacher)
    handles = [blocks[i].self_attn.register_forward_hook(hook(i), with_kwargs=True) for i in layers]
    try:
        teacher.model(input_ids=input_ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return out


def alignment_losses(teacher: nn.Module, modules: dict[int, LinearAttention], input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per-layer stage-1 loss: mean over tokens of ||teacher_out - student_out||_2 / sqrt(d)."""
    captured = capture_attention(teacher, input_ids, sorted(modules))
    losses = {}
    for i, module in modules.items():
        x, y = captured[i]
        y_hat, _ = module.mix(x)
        err = (y.float() - y_hat.float()).norm(dim=-1) / math.sqrt(y.shape[-1])  # (B, T)
        losses[i] = err.mean()
    return losses


def stage2_loss(teacher: nn.Module, student: nn.Module, input_ids: torch.Tensor, tau: float, chunk: int) -> torch.Tensor:
    """KL(teacher || student) over next-token distributions, chunked."""
    with torch.no_grad():
        h_t = teacher.model(input_ids=input_ids, use_cache=False).last_hidden_state
    h_s = student.model(input_ids=input_ids, use_cache=False).last_hidden_state
    return chunked_kl(h_s, h_t, student.lm_head, teacher.lm_head, temperature=tau, chunk_tokens=chunk)


def stage3_loss(student: nn.Module, input_ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Next-token cross-entropy of the student on the data."""
    h = student.model(input_ids=input_ids, use_cache=False).last_hidden_state
    labels = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], -100)], dim=1)
    return chunked_ce(h, labels, student.lm_head, chunk_tokens=chunk)


class HeldoutEvaluator:
    """Held-out KL(teacher || student) and perplexities; the teacher's hidden states are computed once."""

    def __init__(self, teacher: nn.Module, blocks: torch.Tensor, *, batch_size: int, chunk: int, device: torch.device):
        self.teacher, self.chunk, self.device = teacher, chunk, device
        self.batches = [b for b in blocks.split(batch_size)]
        self._teacher_h: list[torch.Tensor] | None = None
        self.teacher_tokens = 0

    @torch.no_grad()
    def _teacher_hidden(self) -> list[torch.Tensor]:
        if self._teacher_h is None:
            self._teacher_h = []
            for b in self.batches:
                with autocast_for(self.device):
                    self._teacher_h.append(self.teacher.model(input_ids=b.to(self.device), use_cache=False).last_hidden_state)
                self.teacher_tokens += b.numel()
        return self._teacher_h

    def prepare(self) -> None:
        """Run the teacher on the held-out blocks now (once), so the token count does not depend on resumes."""
        self._teacher_hidden()

    @torch.no_grad()
    def teacher_ppl(self) -> float:
        ce = [chunked_ce(h, _labels(b.to(self.device)), self.teacher.lm_head, chunk_tokens=self.chunk) for b, h in zip(self.batches, self._teacher_hidden())]
        return math.exp(float(torch.stack(ce).mean()))

    @torch.no_grad()
    def __call__(self, student: nn.Module) -> dict[str, float]:
        was_training = student.training
        student.eval()
        kls, ces = [], []
        for b, h_t in zip(self.batches, self._teacher_hidden()):
            ids = b.to(self.device)
            with autocast_for(self.device):
                h_s = student.model(input_ids=ids, use_cache=False).last_hidden_state
            kls.append(chunked_kl(h_s, h_t, student.lm_head, self.teacher.lm_head, chunk_tokens=self.chunk))
            ces.append(chunked_ce(h_s, _labels(ids), student.lm_head, chunk_tokens=self.chunk))
        student.train(was_training)
        return {"heldout_kl": float(torch.stack(kls).mean()), "student_ppl": math.exp(float(torch.stack(ces).mean()))}


def _labels(ids: torch.Tensor) -> torch.Tensor:
    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)


def _loop_config(cfg: DistillConfig, tokens: int, seq_len: int, lr: float | list[float], seed: int,
                 batch: tuple[int, int] | None = None) -> LoopConfig:
    """The loop of one stage; ``batch`` = (blocks per step, blocks per forward), default stage 2's."""
    batch_size, micro = batch or (cfg.batch_size, cfg.micro_batch_size or cfg.batch_size)
    steps = math.ceil(tokens / (batch_size * seq_len))
    return LoopConfig(
        steps=steps, batch_size=batch_size, micro_batch_size=micro, lr=lr,
        betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
        warmup_steps=round(cfg.warmup_fraction * steps), min_lr_ratio=cfg.min_lr_ratio,
        eval_every=cfg.eval_every or max(1, steps // 10), checkpoint_every=cfg.checkpoint_every, seed=seed,
    )


@attrs.define
class Distiller:
    """Runs stage 1 -> 2 -> 3 on a student, counting tokens and recording held-out metrics.

    Args:
        teacher: the frozen teacher (eval mode).
        data: packed train / held-out blocks.
        cfg: the stage budgets and settings.
        device: where teacher and student run.
        ckpt_dir: directory for per-stage checkpoints (None: no checkpoints, no resume).
        seed: data order and initialisation seed.
        on_step: observer called with (stage, step, tokens, metrics) after every step.
        dist: this process's place in a multi-process job (:class:`hybridize.training.parallel.Dist`):
            the stages run data parallel (DDP, or FSDP2 for stages 2-3, see ``DistillConfig.parallel``).
        phases: filled as the stages run: stage -> ``seconds`` (wall time of its loop) and ``tokens`` (trained
            in this process: after a resume, only those since the resume).
    """

    teacher: nn.Module
    data: PackedData
    cfg: DistillConfig
    device: torch.device
    ckpt_dir: Path | None = None
    seed: int = 0
    progress: bool = True
    on_step: Any = None
    tokens: dict[str, int] = attrs.field(factory=lambda: {"stage1": 0, "stage2": 0, "stage3": 0, "teacher_forward": 0})
    history: dict[str, list] = attrs.field(factory=dict)
    evaluator: HeldoutEvaluator | None = None
    dist: Any = None
    parallel_used: str = "none"  # ddp / fsdp once a stage ran on several ranks
    phases: dict[str, dict[str, float]] = attrs.field(factory=dict)  # stage -> seconds, tokens of this process
    _shards: Any = None

    def __attrs_post_init__(self) -> None:
        self.evaluator = HeldoutEvaluator(
            self.teacher, self.data.heldout[: self.cfg.eval_blocks], batch_size=self.cfg.micro_batch_size or self.cfg.batch_size,
            chunk=self.cfg.kl_chunk_tokens, device=self.device,
        )

    def _loop(self, name: str, model: nn.Module, groups: list, lr: Any, loss_fn: Any, blocks: torch.Tensor, tokens: int,
              evaluate: Any, batch: tuple[int, int] | None = None) -> Loop:
        cfg = _loop_config(self.cfg, tokens, blocks.shape[1], lr, self.seed, batch)
        ckpt = self.ckpt_dir / f"{name}.pt" if self.ckpt_dir else None
        hook = (lambda s, t, m: self.on_step(name, s, t, m)) if self.on_step else None
        loop = Loop(name=name, model=model, param_groups=groups, loss_fn=loss_fn, blocks=blocks, cfg=cfg,
                    device=self.device, ckpt_path=ckpt, evaluate=evaluate, on_step=hook, progress=self.progress,
                    dist=self.dist, root=self._shards.root if self._shards is not None else None)
        loop.try_resume()
        return loop

    def _timed(self, name: str, loop: Loop) -> list[dict]:
        """``loop.run()``, its wall time and the tokens it trained in this process recorded in ``self.phases[name]``."""
        t0, tok0 = time.perf_counter(), loop.tokens  # after a resume: only what this process does
        hist = loop.run()
        self.phases[name] = {"seconds": time.perf_counter() - t0, "tokens": loop.tokens - tok0}
        return hist

    def stage1(self, student: nn.Module) -> list[dict]:
        """Align every linear layer of ``student`` to its teacher layer, all in one pass."""
        modules = linear_modules(student)
        if not modules or not self.cfg.stage1_tokens:
            return []
        student.requires_grad_(False)
        nn.ModuleList(modules.values()).requires_grad_(True)
        params = [p for m in modules.values() for p in m.parameters()]
        shape = stage1_batch(self.cfg, self.data.seq_len, self.dist.world if self.dist is not None else 1)
        blocks = stage_blocks(self.data.train, shape.seq_len)

        def loss_fn(ids: torch.Tensor) -> torch.Tensor:
            return torch.stack(list(alignment_losses(self.teacher, modules, ids).values())).mean()

        loop = self._loop("stage1", student, [{"params": params}], self.cfg.stage1_lr, loss_fn, blocks, self.cfg.stage1_tokens,
                          lambda: self._eval(student), batch=(shape.batch_size, shape.micro_batch_size))
        hist = self._timed("stage1", loop)
        student.requires_grad_(True)
        self.tokens["stage1"] = loop.tokens
        self.tokens["teacher_forward"] += loop.tokens
        return hist

    def _eval(self, student: nn.Module) -> dict[str, float]:
        """Held-out metrics; an FSDP-sharded student is evaluated inside its root's forward (gathered root weights)."""
        if self._shards is None:
            return self.evaluator(student)
        with torch.no_grad():
            return self._shards.root(self.evaluator, student)

    def _shard(self, student: nn.Module) -> nn.Module:
        """With several ranks, pick DDP or FSDP for stages 2-3; for FSDP return the sharded student (teacher sharded too)."""
        from hybridize.training.parallel import FSDPShards, choose_parallel

        par = self.dist
        if par is None or not par.active or not (self.cfg.stage2_tokens or self.cfg.stage3_tokens):
            return student
        self.parallel_used = choose_parallel(self.cfg.parallel, student, self.teacher, par)
        if self.parallel_used != "fsdp":
            return student
        self._shards = FSDPShards.build(student, self.teacher, par)
        self.teacher = self.evaluator.teacher = self._shards.sharded_teacher
        return self._shards.sharded_student

    def _unshard(self) -> nn.Module | None:
        """After FSDP: the trained weights back in the original (whole) student; the teacher back in place."""
        if self._shards is None:
            return None
        student = self._shards.finish(self.dist)
        self.teacher = self.evaluator.teacher = self._shards.teacher
        self._shards = None
        return student

    def stage2(self, student: nn.Module) -> list[dict]:
        """Distil the whole student to the teacher's next-token distribution."""
        if not self.cfg.stage2_tokens:
            return []
        student.requires_grad_(True)
        groups = param_groups(student.named_parameters(), lambda n: ".self_attn." in n)
        keep = [(g, lr) for g, lr in zip(groups, [self.cfg.stage2_lr_attn, self.cfg.stage2_lr_other]) if g["params"]]
        loss_fn = lambda ids: stage2_loss(self.teacher, student, ids, self.cfg.temperature, self.cfg.kl_chunk_tokens)  # noqa: E731
        loop = self._loop("stage2", student, [g for g, _ in keep], [lr for _, lr in keep], loss_fn, self.data.train,
                          self.cfg.stage2_tokens, lambda: self._eval(student))
        hist = self._timed("stage2", loop)
        self.tokens["stage2"] = loop.tokens
        self.tokens["teacher_forward"] += loop.tokens
        return hist

    def stage3(self, student: nn.Module) -> list[dict]:
        """Optional cross-entropy fine-tune on the same data."""
        if not self.cfg.stage3_tokens:
            return []
        student.requires_grad_(True)
        loss_fn = lambda ids: stage3_loss(student, ids, self.cfg.kl_chunk_tokens)  # noqa: E731
        loop = self._loop("stage3", student, [{"params": [p for p in student.parameters()]}], self.cfg.stage3_lr,
                          loss_fn, self.data.train, self.cfg.stage3_tokens, lambda: self._eval(student))
        hist = self._timed("stage3", loop)
        self.tokens["stage3"] = loop.tokens
        return hist

    def run(self, student: nn.Module) -> dict[str, Any]:
        """Stage 1 -> 2 -> 3 with held-out metrics after surgery and after each stage.

        With FSDP the trained weights end up in ``student`` itself, as without it.
        """
        student.to(self.device).train()
        metrics = {"after_surgery": self.evaluator(student)}
        if self.dist is not None and self.dist.active and self.cfg.stage1_tokens:
            self.parallel_used = "ddp"  # stage 1 trains attention only: always DDP
        for name in ("stage1", "stage2", "stage3"):
            if name == "stage2":
                student = self._shard(student)
            self.history[name] = getattr(self, name)(student)
            if self.history[name]:
                metrics[f"after_{name}"] = self.history[name][-1]
        final = self._eval(student)
        self._unshard()  # with FSDP: the trained weights back into the student the caller passed
        self.tokens["teacher_forward"] += self.evaluator.teacher_tokens
        return {
            "tokens": dict(self.tokens),
            "metrics": {**final, "teacher_ppl": self.evaluator.teacher_ppl(),
                        **{f"heldout_kl_{k}": v["heldout_kl"] for k, v in metrics.items()}},
            "history": self.history,
        }
