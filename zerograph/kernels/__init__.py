"""Fused Triton kernels: one module per op, each with its Triton kernel(s),
launcher, ``torch.library`` registration (forward and backward are each one
opaque op through Dynamo and AOTAutograd) and a pure-torch reference.

=================  ============================================  ==========================
module             public function                               ops
=================  ============================================  ==========================
``rms_norm``       ``rms_norm(x, weight, eps)``                  ``zerograph::rms_norm``
``layer_norm``     ``layer_norm(x, weight, bias, eps)``          ``zerograph::layer_norm``
``rotary``         ``apply_rotary(q, k, cos, sin)``              ``zerograph::rotary``
``swiglu``         ``swiglu(gate, up)``                          ``zerograph::swiglu``
``gelu``           ``gelu(x, approximate)``                      ``zerograph::gelu``
``cross_entropy``  ``cross_entropy``, ``linear_cross_entropy``   ``zerograph::cross_entropy``
``attention``      ``attention(q, k, v, causal=..., ...)``       ``zerograph::attention``
``quantize_int8``  ``quantize_int8``, ``dequantize_int8``        ``zerograph::quantize_int8``, ``dequantize_int8``
``quantize_int4``  ``quantize_int4``, ``dequantize_int4``        ``zerograph::quantize_int4``, ``dequantize_int4``
=================  ============================================  ==========================

Each op runs its Triton kernel on CUDA tensors and its reference elsewhere
(:mod:`zerograph.kernels._common`), so CPU training stays exact. Modules are
imported on demand (the rewrite passes import what they insert), so
``import zerograph`` does not import Triton.
"""
