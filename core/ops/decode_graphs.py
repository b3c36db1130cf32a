"""CUDA graphs for the one-token decoding step of linear-attention layers.

Decoding one token through a linear-attention layer is some 40 small kernel launches
(projections, three short convolutions, gates, fla's fused recurrent kernel, the gated norm,
the output projection), each with its Python around it; on a GPU the layer then costs the
launch time, not the work. :func:`decode_step` captures the layer's ``mix`` for one token once
per (layer, batch size, dtype) in a CUDA graph and replays it: the input and the recurrent /
convolution state are copied into the graph's own buffers, the graph runs, and the new state is
copied back into the cache's tensors (in place) and the output cloned, so the cache never
aliases the graph's memory and several caches can share one graph.

It is used by :meth:`hybridize.linear.LinearAttention.forward` when :func:`usable` says so:
CUDA, one token, a state from an earlier step, no padding, eval mode, no autograd, not inside
``torch.compile`` or another capture. ``ENABLED = False`` turns it off (the eager path is the
reference it is tested against).
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

#: capture and replay one-token decoding steps of linear layers on CUDA
ENABLED = True
#: graphs kept per layer (batch sizes, dtypes); older ones are dropped beyond this
MAX_GRAPHS_PER_LAYER = 8

State = dict[str, torch.Tensor]
_GRAPHS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, _StepGraph]] = weakref.WeakKeyDictionary()


def usable(module: nn.Module, x: torch.Tensor, state: State | None, padding_mask: torch.Tensor | None) -> bool:
    """Whether this call can replay a captured decoding step."""
    return (ENABLED and x.is_cuda and x.shape[1] == 1 and bool(state) and padding_mask is None and not module.training
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing())


class _StepGraph:
    """One captured ``mix(x, state, mode="recurrent")`` of one token, with static input / state buffers."""

    def __init__(self, module: nn.Module, x: torch.Tensor, state: State):
        self.x = x.clone()
        self.state = {k: v.clone() for k, v in state.items()}
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):  # first calls outside the capture: kernel autotuning, lazy init
            for _ in range(2):
                self._body(module)
        torch.cuda.current_stream(x.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.y = self._body(module)

    def _body(self, module: nn.Module) -> torch.Tensor:
        y, new = module.mix(self.x, state=self.state, output_state=True, mode="recurrent")
        for k, v in new.items():
            self.state[k].copy_(v)
        return y

    def __call__(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        self.x.copy_(x)
        for k, v in state.items():
            self.state[k].copy_(v)
        self.graph.replay()
        for k, v in state.items():
            v.copy_(self.state[k])
        return self.y.clone(), state


def _key(module: nn.Module, x: torch.Tensor, state: State) -> tuple:
    sig = tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(state.items()))
    params = tuple(p.data_ptr() for p in module.parameters())  # a moved / reloaded module gets a new graph
    return (tuple(x.shape), x.dtype, x.device, sig, params)


def decode_step(module: nn.Module, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
    """``module.mix(x, state=state, output_state=True, mode="recurrent")`` through a CUDA graph.

    ``state`` is updated in place and returned.

    Shape:
        x: (B, 1, hidden) -> (B, 1, hidden)
    """
    graphs = _GRAPHS.setdefault(module, {})
    key = _key(module, x, state)
    graph = graphs.get(key)
    if graph is None:
        if len(graphs) >= MAX_GRAPHS_PER_LAYER:
            graphs.clear()
        graph = graphs[key] = _StepGraph(module, x, state)
    return graph(x, state)


def clear(module: nn.Module | None = None) -> None:
    """Drop the captured graphs of one module (or of all) and free their memory pools."""
    if module is None:
        _GRAPHS.clear()
    else:
        _GRAPHS.pop(module, None)


def captured(module: nn.Module) -> int:
    """How many graphs a module holds (for tests and benchmarks)."""
    return len(_GRAPHS.get(module, {}))
