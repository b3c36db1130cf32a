"""The memory plan of a run: what a selection's probes, the teacher and the activations need, before anything is built.

:func:`plan_run` reads the teacher's ``config.json``, instantiates the teacher and one variant module per
layer on the ``meta`` device (no weights, no memory) and counts parameters. From the counts it estimates,
in bytes of the teacher's dtype (the config's ``torch_dtype`` / ``dtype``; bf16 on CUDA, fp32 on CPU when
the config names none):

- per device (GPU): the teacher, the shared stage-1 modules (one variant module per layer), the probes of
  one group (owned parameters + 2 AdamW states + gradients) and the activations of one micro-batch;
- per device, the final stage 2: the teacher, the student with gradients and AdamW (sharded with FSDP), activations;
- host (the machine, all ranks): the probes that wait off the GPU (owned parameters + 2 AdamW states, pinned),
  or none when ``selection.probe_offload`` puts them on disk (``auto``: host when they fit, else disk);
- disk: one window checkpoint (every probe, owned parameters + 2 AdamW states), the final stage-2
  checkpoint, and the waiting probes' scratch files with ``probe_offload: disk``.

A probe owns what it trains (``selection.probe_trainable``, see :func:`hybridize.selection.probes.trains`);
the rest is shared by reference with the teacher. With ``nproc`` ranks each holds ``ceil(n_probes / nproc)``.

Activations are a rough formula: ``ACT_BYTES_PER_HIDDEN`` bytes per hidden unit per token per layer
(``n_layers x hidden x tokens per forward x 34``, the usual count of a transformer layer's saved
activations in 16-bit, Korthikanti et al. 2022, without the attention scores that flash attention does not
keep), plus the chunked KL's fp32 logits of teacher and student (``kl_chunk_tokens x vocab x 4 x 2``).
Tokens per forward: the larger of stage 2's (``micro_batch_size x data.seq_len``) and stage 1's
(``stage1_micro_batch_size x stage1_seq_len``, :func:`hybridize.distill.batches.stage1_batch`).

``selection.probe_group_size: auto`` resolves to the largest group that fits in ``GPU_FRACTION`` of the GPU
(at least 1; all probes when no GPU memory is known, e.g. on CPU). When even one probe does not fit, or the
host or the disk cannot hold what waits there, :func:`plan_run` raises one :class:`ConfigError` that names
the field to change and the numbers.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import attrs

from hybridize.errors import ConfigError

#: saved activation bytes per hidden unit, per token, per layer (16-bit, flash attention)
ACT_BYTES_PER_HIDDEN = 34
#: the share of the GPU a plan may fill (the rest: CUDA context, allocator fragmentation, kernels' workspace)
GPU_FRACTION = 0.9
GIB = 1024 ** 3
PHASES = ("stage1", "probes", "stage2", "stage3")


@attrs.frozen
class Counts:
    """Parameter counts of a teacher and its variant: the whole teacher, each layer's attention, each layer's
    variant module (``variant[i]``: the module that would replace layer ``i``'s attention)."""

    teacher: int
    attention: list[int]
    variant: list[int]
    hidden: int
    vocab: int

    def student(self, softmax_layers: Any) -> int:
        """Parameters of the final hybrid at ``softmax_layers`` (a list; for K or a ratio an upper bound: the
        linear layers are those where the variant adds the most)."""
        from hybridize.selection.contract import resolve_budget

        n = len(self.attention)
        delta = [self.variant[i] - self.attention[i] for i in range(n)]
        if isinstance(softmax_layers, list):
            return self.teacher + sum(delta[i] for i in range(n) if i not in softmax_layers)
        return self.teacher + sum(sorted(delta, reverse=True)[: n - resolve_budget(softmax_layers, n)])

    def probe_params(self, policy: str, layer: int, softmax_layers: Any = None) -> int:
        """Parameters a probe of ``layer`` (softmax at ``softmax_layers``, default ``[layer]``) trains under
        ``policy``: ``probed`` its layer's attention, ``mixers`` every layer's mixer, ``all`` the whole student."""
        soft = set([layer] if softmax_layers is None else softmax_layers)
        mixers = sum(self.attention[i] if i in soft else self.variant[i] for i in range(len(self.attention)))
        if policy == "probed":
            return self.attention[layer] if layer in soft else self.variant[layer]
        if policy == "mixers":
            return mixers
        if policy == "all":
            return self.teacher - sum(self.attention) + mixers
        raise ValueError(f"probe_trainable must be one of all, mixers, probed; got {policy!r}")


@attrs.frozen
class Plan:
    """A run's memory and token plan (bytes, tokens); ``render()`` is what ``hybridize run --dry-run`` prints."""

    device: str
    dtype: str
    nproc: int
    n_probes: int
    probes_per_rank: int
    group_size: int
    probe_trainable: str
    probe_params: int
    offload: str  # where waiting probes are: host (pinned) or disk (scratch files)
    memory: dict[str, int]  # teacher, stage1, probes_gpu, activations, selection_total, stage2, gpu_total, host, disk
    available: dict[str, int | None]  # gpu (the usable share), host, disk
    tokens: dict[str, int]
    seconds: dict[str, float] | None = None
    activation_field: str = "distill.micro_batch_size"  # sets the larger tokens per forward (stage 1 or 2)

    def render(self) -> str:
        m, a = self.memory, self.available
        rows = [f"plan: {self.n_probes} probes ({self.probes_per_rank} per rank on {self.nproc}), group size "
                f"{self.group_size}, probe_trainable {self.probe_trainable} ({self.probe_params:,} params each), "
                f"{self.dtype} on {self.device}, waiting probes on {self.offload}",
                "memory per device            GiB",
                *(f"  {label:<26} {_gib(m[key]):>8}" for key, label in
                  (("teacher", "teacher"), ("stage1", "stage-1 modules"), ("probes_gpu", "probes on GPU"),
                   ("activations", "activations"), ("selection_total", "selection (sum of above)"),
                   ("stage2", "final stage 2"))),
                f"  {'peak':<26} {_gib(m['gpu_total']):>8}  of {_avail(a['gpu'])} available",
                f"host (probes off the GPU)    {_gib(m['host']):>8}  of {_avail(a['host'])} available",
                f"disk (checkpoints)           {_gib(m['disk']):>8}  of {_avail(a['disk'])} available",
                "tokens per phase"]
        rows += [f"  {p:<26} {self.tokens[p]:>14,}" for p in PHASES]
        rows.append(f"estimated time               {_time(self.seconds)}")
        return "\n".join(rows)


def _gib(n: int) -> str:
    return f"{n / GIB:.3f}"


def _avail(n: int | None) -> str:
    return "unknown" if n is None else _gib(n)


def _time(seconds: dict[str, float] | None) -> str:
    if not seconds:
        return "unknown (pass --throughput FILE: {phase: tokens_per_s})"
    parts = ", ".join(f"{p} {s / 3600:.2f} h" for p, s in seconds.items())
    return f"{sum(seconds.values()) / 3600:.2f} h ({parts})"


# -- counting -------------------------------------------------------------------------------------
def teacher_config(path: str) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, local_files_only=True)


def count_params(config: Any, variant: Any, pm: Any) -> Counts:
    """Counts of the teacher of ``config`` and of variant ``variant`` (a ComponentRef), all on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    from hybridize.model.teacher import attention_spec, decoder_layers

    entry = pm.registry("linear_attention")[variant.name]
    vconfig = entry.build_config(variant.params)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        layers = decoder_layers(model)
        attention = [sum(p.numel() for p in layer.self_attn.parameters()) for layer in layers]
        modules = [entry.factory(attention_spec(model, i), vconfig) for i in range(len(layers))]
    return Counts(teacher=sum(p.numel() for p in model.parameters()), attention=attention,
                  variant=[sum(p.numel() for p in m.parameters()) for m in modules],
                  hidden=int(config.hidden_size), vocab=int(config.vocab_size))


def _dtype(config: Any, device: Any) -> Any:
    import torch

    named = getattr(config, "dtype", None) or config.to_dict().get("torch_dtype")  # torch_dtype: older transformers
    if isinstance(named, str):
        named = getattr(torch, named, None)
    if isinstance(named, torch.dtype):
        return named
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _probes(cfg: Any, pm: Any, n_layers: int) -> list[Any]:
    """The probes the selection would train (none for an explicit list or a selector without probes)."""
    from hybridize.selection.contract import build_selector_configs

    if isinstance(cfg.softmax_layers, list):
        return []
    entry = pm.registry("selector")[cfg.selection.selector.name]
    sel_config, _ = build_selector_configs(entry, cfg.selection.selector.params)
    selector = entry.factory(sel_config, seed=cfg.seed)
    return list(selector.plan(n_layers)) if selector.needs == "probes" else []


# -- memory ---------------------------------------------------------------------------------------
def _available(device: Any, gpu: int | None, host: int | None, disk: int | None, out: Any) -> dict[str, int | None]:
    import torch

    if gpu is None and device.type == "cuda":
        gpu = torch.cuda.get_device_properties(device).total_memory
    if host is None:
        try:
            host = _mem_available()
        except (ValueError, OSError, AttributeError):
            host = None
    if disk is None:
        where = Path(out or ".").absolute()
        while not where.exists():
            where = where.parent
        disk = shutil.disk_usage(where).free
    return {"gpu": None if gpu is None else int(gpu * GPU_FRACTION), "host": host, "disk": disk}


def forward_tokens(cfg: Any) -> dict[str, int]:
    """Tokens per forward (one rank) of stage 2 (``micro_batch_size x data.seq_len``) and, when it runs, of stage 1."""
    from hybridize.distill.batches import stage1_batch

    d = cfg.distill
    out = {"stage2": (d.micro_batch_size or d.batch_size) * cfg.data.seq_len}
    if d.stage1_tokens:
        out["stage1"] = stage1_batch(d, cfg.data.seq_len).tokens_per_forward
    return out


def _activation_field(cfg: Any) -> str:
    """The field that sets the larger micro-batch of tokens (what to lower when activations do not fit)."""
    t = forward_tokens(cfg)
    return "distill.stage1_micro_batch_size" if t.get("stage1", 0) > t["stage2"] else "distill.micro_batch_size"


def _mem_available() -> int:
    """The host memory a run can still take: MemAvailable of /proc/meminfo, else the physical RAM."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _memory(counts: Counts, cfg: Any, nbytes: int, owned: int, per_rank: int, group: int, nproc: int = 1,
            obytes: int | None = None) -> dict[str, int]:
    """Bytes per device (selection phase, final stage 2), on the host and on disk (host and disk: the machine's,
    all ranks together)."""
    d = cfg.distill
    per_forward = forward_tokens(cfg)
    tokens = max(per_forward.values())
    obytes = obytes or nbytes  # a probe's owned tensors: fp32 master copies of 16-bit weights on CUDA
    state = owned * obytes * 3  # parameters + AdamW's two moments
    student = counts.student(cfg.softmax_layers)
    trained = student * nbytes * 4  # parameters, gradients, AdamW's two moments
    sharded = trained // nproc if nproc > 1 and d.parallel == "fsdp" else trained
    def activations(n: int) -> int:
        return len(counts.attention) * counts.hidden * n * ACT_BYTES_PER_HIDDEN + min(d.kl_chunk_tokens, n) * counts.vocab * 4 * 2

    mem = {"teacher": counts.teacher * nbytes, "stage1": sum(counts.variant) * nbytes if per_rank else 0,
           "probes_gpu": group * (state + owned * obytes),  # + gradients
           "activations": activations(tokens),
           "host": nproc * (per_rank - group) * state,
           "disk": nproc * per_rank * state + (student * nbytes * 4 if d.stage2_tokens or d.stage3_tokens else 0)}
    mem["selection_total"] = sum(mem[k] for k in ("teacher", "stage1", "probes_gpu", "activations")) if per_rank else 0
    final = d.stage2_tokens or d.stage3_tokens
    mem["stage2_activations"] = activations(per_forward["stage2"]) if final else 0
    mem["stage2"] = (counts.teacher * nbytes + sharded + mem["stage2_activations"]) if final else 0
    mem["gpu_total"] = max(mem["selection_total"], mem["stage2"])
    return mem


def _group_size(cfg: Any, fits: Any, per_rank: int) -> int:
    """The group size of the config: an int (0 = all), or auto = the largest group that ``fits`` (at least 1)."""
    size = cfg.selection.probe_group_size
    if isinstance(size, int):
        return min(size, per_rank) if size else per_rank
    best = 1
    for g in range(1, per_rank + 1):
        if fits(g):
            best = g
    return best


def _refusal(plan: Plan, requested: Any) -> str | None:
    """One line naming the field to change and the numbers, or None when the plan fits."""
    m, a, need = plan.memory, plan.available, lambda k: _gib(plan.memory[k])
    fix = ("set selection.probe_trainable: probed (a probe then owns only its layer's attention)"
           if plan.probe_trainable != "probed" else "run on more GPUs with --nproc")
    gpu = None if a["gpu"] is None else f"{_gib(a['gpu'])} GiB are available ({GPU_FRACTION:.0%} of the GPU)"
    if gpu and m["selection_total"] > a["gpu"]:
        if plan.group_size > 1:
            return (f"selection.probe_group_size {requested} needs {need('selection_total')} GiB of GPU memory but "
                    f"{gpu}; lower selection.probe_group_size or set it to auto")
        if m["activations"] >= m["probes_gpu"]:
            fix = f"lower {plan.activation_field} (activations {need('activations')} GiB)"
        return (f"one probe on the GPU needs {need('selection_total')} GiB (teacher {need('teacher')}, stage-1 modules "
                f"{need('stage1')}, probe {need('probes_gpu')}, activations {need('activations')}) but {gpu}; {fix}")
    if gpu and m["stage2"] > a["gpu"]:
        return (f"the final hybrid's stage 2 needs {need('stage2')} GiB per GPU (teacher {need('teacher')}, activations "
                f"{need('stage2_activations')}, the student with gradients and AdamW the rest) but {gpu}; lower "
                "distill.micro_batch_size, or spread it with --nproc and distill.parallel: fsdp")
    if a["host"] is not None and m["host"] > a["host"]:
        return (f"the {plan.nproc * (plan.probes_per_rank - plan.group_size)} probes off the GPU need {need('host')} GiB "
                f"of host memory but {_gib(a['host'])} GiB are available; set selection.probe_offload: disk (or auto), "
                f"{fix}, or raise selection.probe_group_size")
    if a["disk"] is not None and m["disk"] > a["disk"]:
        return (f"the checkpoints (every probe's window state, the final stage 2{', the probes waiting on disk' if plan.offload == 'disk' else ''}) need {need('disk')} GiB of disk but "
                f"{_gib(a['disk'])} GiB are free where OUT goes; {fix}, or free disk space there")
    return None


def plan_run(cfg: Any, pm: Any, *, nproc: int = 1, gpu_bytes: int | None = None, host_bytes: int | None = None,
             disk_bytes: int | None = None, device: Any = None, out: Any = None,
             throughput: dict[str, float] | None = None, check: bool = True) -> Plan:
    """The memory plan of ``cfg`` on ``nproc`` ranks; builds nothing (config.json and meta-device modules only).

    Args:
        gpu_bytes / host_bytes / disk_bytes: what is available (default: the device's memory, the machine's
            RAM, the free space where ``out`` would be).
        device: the device of the run (default: ``cfg.device`` resolved).
        throughput: tokens per second per phase (``stage1``, ``probes``, ``stage2``, ``stage3``) for a time estimate.
        check: raise when the plan does not fit (else the caller reads ``refusal(plan)``).

    Raises:
        ConfigError: one line naming the field to change, with GiB needed vs available.
    """
    import torch

    from hybridize.training.devices import resolve_device

    device = torch.device(device) if device is not None else resolve_device(cfg.device)
    config = teacher_config(cfg.teacher)
    variant = cfg.selection.linear_attention or cfg.linear_attention
    counts = count_params(config, variant, pm)
    dtype = _dtype(config, device)
    nbytes = torch.empty((), dtype=dtype).element_size()
    probes = _probes(cfg, pm, len(counts.attention))
    policy = getattr(cfg.selection, "probe_trainable", "all")
    owned = max((counts.probe_params(policy, p.layer, p.softmax_layers) for p in probes), default=0)
    per_rank = math.ceil(len(probes) / max(1, nproc))
    obytes = 4 if device.type == "cuda" else nbytes  # see hybridize.selection.probes.own_parameters
    available = _available(device, gpu_bytes, host_bytes, disk_bytes, out)

    def fits(g: int) -> bool:
        need = _memory(counts, cfg, nbytes, owned, per_rank, g, nproc, obytes)["selection_total"]
        return available["gpu"] is None or need <= available["gpu"]

    group = _group_size(cfg, fits, per_rank) if per_rank else 0
    memory = _memory(counts, cfg, nbytes, owned, per_rank, group, nproc, obytes)
    offload = getattr(cfg.selection, "probe_offload", "host")
    if offload == "auto":  # pinned host memory when the waiting probes fit there, else scratch files on disk
        offload = "host" if available["host"] is None or memory["host"] <= available["host"] else "disk"
    if offload == "disk":
        memory = {**memory, "disk": memory["disk"] + memory["host"], "host": 0}
    plan = Plan(device=str(device), dtype=str(dtype).removeprefix("torch."), nproc=nproc, n_probes=len(probes),
                probes_per_rank=per_rank, group_size=group, probe_trainable=policy, probe_params=owned,
                offload=offload, memory=memory, available=available, activation_field=_activation_field(cfg),
                tokens=_tokens(cfg, len(probes)), seconds=_seconds(_tokens(cfg, len(probes)), throughput))
    problem = refusal(plan, cfg.selection.probe_group_size)
    if check and problem:
        raise ConfigError(problem)
    return plan


def refusal(plan: Plan, requested: Any = "auto") -> str | None:
    """Why ``plan`` cannot run (one line), or None."""
    return _refusal(plan, requested)


def _tokens(cfg: Any, n_probes: int) -> dict[str, int]:
    d = cfg.distill
    return {"stage1": d.stage1_tokens, "probes": n_probes * cfg.selection.probe_tokens, "stage2": d.stage2_tokens,
            "stage3": d.stage3_tokens}


def _seconds(tokens: dict[str, int], throughput: dict[str, float] | None) -> dict[str, float] | None:
    if not throughput or any(tokens[p] and not throughput.get(p) for p in PHASES):
        return None
    return {p: tokens[p] / float(throughput[p]) for p in PHASES if tokens[p]}


def load_throughput(path: str | Path) -> dict[str, float]:
    """``--throughput FILE``: a JSON mapping of phase (stage1, probes, stage2, stage3) -> tokens per second."""
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--throughput {str(path)!r} must be a readable JSON file: {exc}") from exc
    bad = [k for k, v in (table.items() if isinstance(table, dict) else [])
           if k not in PHASES or isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0]
    if not isinstance(table, dict) or bad:
        raise ConfigError(f"--throughput {str(path)!r} must map phases ({', '.join(PHASES)}) to tokens per second > 0; "
                          f"got {table!r}")
    return {k: float(v) for k, v in table.items()}
