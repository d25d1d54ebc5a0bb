"""GPU kernels in Triton, one module per family, each with its torch / CPU reference.

Triton kernels run on CPU tensors under ``TRITON_INTERPRET=1``: that is how the test suite
checks them on machines without a GPU (in fp32 / fp16: the interpreter computes bf16
wrongly). Importing :mod:`kimi_loader` never imports Triton; these modules do, when used.

- :mod:`~kimi_loader.kernels.dequant`: ct-int4 / MXFP4 / FP8-block dequantization on the
  device (and the exact value decoders the other kernels share). Reference:
  :func:`kimi_loader.quant.dequantize`.
- :mod:`~kimi_loader.kernels.moe`: noaux_tc routing and the fused 4-bit MoE.
- :mod:`~kimi_loader.kernels.mla`: MLA decode attention over the latent cache.
- :mod:`~kimi_loader.kernels.plan_exec`: a copy plan's copy and convert ops as batched
  kernels (one launch per op kind, a descriptor table of sources, destinations and
  sizes): the device executor of hot-reload. Reference: the Rust CPU executor.

Every entry point launches on its tensors' device, made current for the launch
(:func:`~kimi_loader.kernels._device.on_device`; Triton itself launches on the current
device, wherever the pointers are), and refuses tensors on two devices by name.
"""
