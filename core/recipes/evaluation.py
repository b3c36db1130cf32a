"""``hybridize eval``: load a saved hybrid or a plain Hugging Face teacher directory to evaluate it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from hybridize.errors import ConfigError
from hybridize.evaluate import EvalTarget


def load_for_eval(path: str | Path, *, device: str = "cpu", pm: Any = None) -> EvalTarget:
    """Load a saved hybrid (its variant from ``pm``'s registry, default a new manager) or a plain Hugging Face
    causal-LM directory, with its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from hybridize.model.hybrid import PREFIX, load_hybrid

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"hybridize eval: {str(path)!r} must be a model directory with a config.json "
                          f"(a saved hybrid such as OUT/model, or a Hugging Face teacher)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"hybridize eval: {str(path)!r} has no loadable tokenizer ({exc}); save one beside the weights") from exc
    config = AutoConfig.from_pretrained(path)
    if str(config.model_type).startswith(PREFIX):
        model = load_hybrid(path, device=device, pm=pm)
    else:
        from hybridize.model.teacher import check_finite_weights
        from hybridize.model.weights import check_weights_match_config

        what = f"hybridize eval: model directory {str(path)!r}"
        check_weights_match_config(path, config, what)  # safetensors only, complete, matching config.json
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
        check_finite_weights(model, what)
        model = model.to(device)
    return EvalTarget(model=model.eval(), tokenizer=tokenizer, label=path.name if path.name != "model" else path.parent.name, path=str(path))
