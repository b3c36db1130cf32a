"""SWDE through lm-eval: its prompt and ``contains`` metric, data from the hub or a local file.

A local file is a ``.parquet``, ``.jsonl`` or ``.json`` table in the schema of the hub data set
(``hazyresearch/based-swde-v2``): one row per document and key, columns ``doc_id``, ``file_name``,
``key``, ``value`` (the gold answer) and ``text`` (the prompt: page text ending in the key).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hybridize.errors import ConfigError

COLUMNS = ("doc_id", "file_name", "key", "value", "text")
HUB_ID = "hazyresearch/based-swde-v2"
_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}


def check_source(path: str | None) -> list[str]:
    """Problems with a local SWDE file (none when ``path`` is None)."""
    if path is None:
        return []
    p = Path(path)
    if p.suffix not in _FORMATS:
        return [f"field 'swde_data' must be a .parquet, .jsonl or .json file; got {path!r}"]
    if not p.is_file():
        return [f"field 'swde_data' must be an existing file; got {path!r}"]
    return []


def load_local(path: str) -> Any:
    """The local table as a ``datasets.DatasetDict`` with a ``validation`` split; checks the columns."""
    import datasets

    ds = datasets.load_dataset(_FORMATS[Path(path).suffix], data_files={"validation": str(path)})
    missing = [c for c in COLUMNS if c not in ds["validation"].column_names]
    if missing:
        raise ConfigError(
            f"evaluator 'lm-eval' field 'swde_data' file {str(path)!r} lacks SWDE column(s) {missing}; "
            f"it has {ds['validation'].column_names} and needs {list(COLUMNS)}"
        )
    return ds


def local_task_spec(path: str) -> dict[str, Any]:
    """A task spec for lm-eval's TaskManager: lm-eval's SWDE class reading ``path`` instead of the hub."""
    from lm_eval.tasks.swde.task import SWDE

    def download(self: Any, dataset_kwargs: Any = None, **kwargs: Any) -> None:
        self.dataset = load_local(path)

    local = type("LocalSWDE", (SWDE,), {"download": download, "__module__": __name__})
    return {"task": "swde", "class": local}
