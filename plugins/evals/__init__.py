"""Evaluators: lm-eval tasks (RULER and SWDE offline, any task by name), held-out KL and perplexity.

Nothing here imports lm_eval, datasets or torch at module import: `hybridize plugins` stays fast and
the GPU image, which lacks lm-eval, can still load the plugins.
"""
