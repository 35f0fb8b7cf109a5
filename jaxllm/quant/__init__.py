"""Weight quantisation for the frozen base of QLoRA (and for serving): NF4 and int8 kernels that are
dequantised inside the matmul. See `weights.py` and docs/lora.md."""

from jaxllm.quant.weights import NF4_CODEBOOK, QuantizedKernel, dequantize, kernel_array, quantize

__all__ = ["NF4_CODEBOOK", "QuantizedKernel", "dequantize", "kernel_array", "quantize"]
