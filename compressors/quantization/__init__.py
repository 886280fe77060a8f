"""Scalar quantizers: dense/fp16/bf16, QSGD, sign, M22 (rate-distortion quantizer).

A codec here imports the shared layers of ``gradwire.compressors`` (base, registry, spec,
feedback, quantize, entropy, gennorm, sparse) and modules of its own family, never a codec of
another family."""
