"""Low-rank compression: PowerSGD.

A codec here imports the shared layers of ``gradwire.compressors`` (base, registry, spec,
feedback, quantize, entropy, gennorm, sparse) and modules of its own family, never a codec of
another family."""
