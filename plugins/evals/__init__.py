"""Evaluators (lm-eval tasks, held-out KL, perplexity)."""
