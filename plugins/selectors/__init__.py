"""Layer selectors (kl-greedy-add, kl-greedy-remove, mse-greedy-add, uniform, random)."""
