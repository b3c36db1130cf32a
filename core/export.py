"""The contract between the export engine and exporter plugins: a hybrid in a layout that stock engines serve.

An exporter is registered through ``hybridize_register_exporters`` as ``register(format, factory,
config_cls)``; ``factory(config)`` returns an :class:`Exporter`. ``hybridize export DIR --format NAME --out
OUT`` (:mod:`hybridize.recipes.export`) then calls, in this order and before anything is written:

1. :meth:`Exporter.unavailable`: why this installation cannot write the format (a library too old), or None;
2. :meth:`Exporter.check` on the saved hybrid's config, no weights loaded: ``refusals`` name what the format
   has no place for (a variant, an option); any refusal stops the export with one message that also lists
   the formats that exist. ``differences`` name what the format holds only approximately (a norm it adds, a
   bias it drops): the engine measures the parity of the converted model and, without ``--heal-tokens``,
   refuses and says by how much the export would differ;
3. :meth:`Exporter.convert` on the loaded hybrid: a model of the format's own transformers class holding the
   hybrid's weights, with the names of the source tensors it read and of those it left out.

The engine refuses a conversion that leaves a source tensor neither read nor dropped, that drops one while
``check`` reported no difference, or whose model misses or ignores a weight once saved and reloaded; it
measures parity (max |logit difference|, KL, greedy agreement on a fixed prompt set) against the hybrid and
writes it beside the weights. ``tests/unit/test_export.py`` runs these rules on every registered exporter.
"""
from __future__ import annotations

from typing import Any, Protocol

import attrs


@attrs.frozen(kw_only=True)
class ExportCheck:
    """What :meth:`Exporter.check` found in a hybrid's config.

    Attributes:
        refusals: one line per variant or option the format has no place for (the export cannot run).
        differences: one line per thing the format holds only approximately (the export needs healing).
    """

    refusals: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    differences: tuple[str, ...] = attrs.field(default=(), converter=tuple)

    @property
    def exact(self) -> bool:
        """True when the format holds the hybrid exactly (no refusal, no difference)."""
        return not self.refusals and not self.differences


@attrs.frozen(kw_only=True)
class Converted:
    """What :meth:`Exporter.convert` returns.

    Attributes:
        model: a ``PreTrainedModel`` of the format's own class (e.g. ``Qwen3_5ForCausalLM``) with the mapped weights,
            on the hybrid's device and in its dtype, in eval mode.
        read: names (the hybrid's ``state_dict`` keys) of the source tensors the conversion used.
        dropped: names of the source tensors the format has no place for.
    """

    model: Any
    read: frozenset[str] = attrs.field(converter=frozenset)
    dropped: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)


class Exporter(Protocol):
    """One export format. ``summary`` is one line (what it writes, what it takes), listed with every refusal."""

    summary: str

    def unavailable(self) -> str | None:
        """Why this installation cannot write the format (naming the package and version it needs), or None."""
        ...

    def check(self, config: Any) -> ExportCheck:
        """Refusals and differences of a hybrid, from its config alone (``config.hybridize`` and the teacher's fields)."""
        ...

    def convert(self, model: Any) -> Converted:
        """The hybrid in the format's own transformers class (``check`` found no refusal)."""
        ...
