"""Linear-attention variants: Gated DeltaNet (gdn) and Gated Linear Attention (gla)."""
