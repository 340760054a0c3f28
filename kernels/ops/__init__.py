"""Raw Triton kernels and their ``torch.library`` ops (autograd, fake tensors, FLOP formulas)."""
