"""Test helpers for hybridize and for third-party plugin authors.

- :mod:`hybridize.testing.models`: ``tiny_model(family=...)``, tiny random Llama/Qwen2/Qwen3/Mistral teachers.
- :mod:`hybridize.testing.conformance`: the checks every linear-attention variant must pass.
- :mod:`hybridize.testing.pytest_plugin`: fixtures, loaded by pytest through the ``pytest11`` entry point.

A plugin author runs the conformance suite on their variant with::

    from hybridize.testing.conformance import run_all
    from hybridize import get_plugin_manager

    run_all(get_plugin_manager().registry("linear_attention")["my-variant"])
"""
