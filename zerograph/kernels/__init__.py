"""Fused Triton kernels (attention, MLP activations, norms, rotary, cross-entropy).

Each op will live in its own module here with its Triton kernel, launcher,
``torch.library`` registration and pure-torch reference. None exists yet:
the kernels and the rewrite passes that insert them are tracked in the
kernels issue.
"""
