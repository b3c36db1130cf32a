"""Pure-torch reference implementations of the linear-attention recurrences, with fla dispatch on CUDA."""
