"""Top-k sparsification with error feedback (``topk``).

The DGC-style baseline (Lin et al., 2018, "Deep Gradient Compression"; Stich
et al., 2018, "Sparsified SGD with Memory"): per tensor, keep the
``k = max(1, round(ratio · numel))`` entries of largest magnitude of ``v``
(the gradient plus the error-feedback memory), send them as (index, value)
pairs, and keep the rest in the worker's memory (``ef=1``, the default).

**Biased**: the decoded tensor is not an unbiased estimate of ``v``.

Indices are coded per tensor with whichever of two codes is smaller, flagged in
the header:

* **Rice gaps**: sorted indices as gaps ``g_j = i_j − i_{j−1} − 1``, each split
  into ``b`` low bits (fixed width) and a unary high part ``g_j >> b`` (zeros
  closed by a one), the two parts in separate bit streams so that both encoding
  and decoding are vectorized (the Elias–Fano layout). ``b`` is chosen per
  tensor to minimise the exact bit count; about ``log2(d/k) + 1.5`` bits per index.
* **Bitmap**: one bit per entry. Rice with ``b = 0`` is already the bitmap cut
  after the last kept index, so the bitmap wins only by a byte or two, when the
  last entries are kept (dense ``ratio`` values, tiny tensors).

Selected entries whose value is exactly zero (after the optional fp16 cast) are
not sent, so an all-zero tensor costs only its header.

Payload layout (little-endian)::

    flags   u8        bits 0-1: index code (0 = Rice gaps, 1 = bitmap); bit 2: values are float16
    count   u32       n, the number of (index, value) pairs, n <= numel
    -- if n > 0 --
    rice_b  u8        (Rice only) number of low bits b, 0..32
    values  n × f32 (or f16), in increasing index order
    Rice:   low bits  ceil(n·b/8) bytes (np.packbits, MSB first), then the unary
            stream to the end of the payload (padding bits 0)
    bitmap: ceil(numel/8) bytes (np.packbits, padding bits 0)

An empty tensor has an empty payload. Options: ``ratio`` (default 0.01),
``ef`` (default 1), ``decay`` (memory decay γ, default 1), ``values``
(``fp32`` or ``fp16``; fp16 values saturate at ±65504 and the error goes to
the memory),
``momentum`` (DGC momentum correction at the worker, default 0; see
``compressors.feedback``) and ``masking`` (momentum factor masking, default 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradwire.compressors.base import (
    Codec,
    CodecError,
    CrossWorkerState,
    Decoder,
    Encoded,
    Encoder,
    RoundContext,
    TensorSpec,
    as_bytes,
    check_input,
)
from gradwire.compressors.feedback import MomentumCorrected, check_feedback_options
from gradwire.compressors.registry import register
from gradwire.compressors.sparse import (
    INDEX_BITMAP,
    INDEX_MASK,
    check_ratio,
    check_value_kind,
    decode_sparse,
    encode_sparse,
    log2_binomial,
    quantize_values,
    sparse_count,
)

# ---------------------------------------------------------------- index codes


class SparseStats:
    """Accumulates the figures a sparse encoder reports."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.entries = 0
        self.pairs = 0
        self.index_bits = 0
        self.bound_bits = 0.0
        self.tensors = 0
        self.bitmap_tensors = 0

    def add(self, numel: int, pairs: int, index_bits: int, payload: bytes) -> None:
        self.entries += numel
        self.pairs += pairs
        self.index_bits += index_bits
        self.bound_bits += log2_binomial(numel, pairs)
        if pairs:
            self.tensors += 1
            self.bitmap_tensors += int(payload[0] & INDEX_MASK == INDEX_BITMAP)

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.entries:
            out["density"] = self.pairs / self.entries
        if self.pairs:
            out["index_bits_per_nonzero"] = self.index_bits / self.pairs
            out["index_bound_bits_per_nonzero"] = self.bound_bits / self.pairs
        if self.tensors:
            out["bitmap_fraction"] = self.bitmap_tensors / self.tensors
        return out


# ---------------------------------------------------------------- codec


class TopKEncoder(Encoder):
    def __init__(self, codec: TopKCodec):
        self.codec = codec
        self._stats = SparseStats()

    def reset(self) -> None:
        self._stats.reset()

    def encode(self, x: np.ndarray, spec: TensorSpec, ctx: RoundContext) -> Encoded:
        flat = check_input(x, spec)
        numel = flat.size
        if numel == 0:
            return Encoded(self.codec.spec, spec, b"")
        k = sparse_count(numel, self.codec.ratio)
        if k < numel:
            indices = np.sort(np.argpartition(np.abs(flat), numel - k)[numel - k :])
        else:
            indices = np.arange(numel)
        values = quantize_values(flat[indices], self.codec.values)
        keep = values != 0
        indices, values = indices[keep], values[keep]
        payload, index_bits = encode_sparse(indices, values, numel, self.codec.values)
        self._stats.add(numel, indices.size, index_bits, payload)
        return Encoded(self.codec.spec, spec, payload)

    def stats(self) -> dict[str, float]:
        return self._stats.as_dict()


class SparseDecoder(Decoder):
    """Decodes the sparse (flags, count, values, indices) layout of ``topk``."""

    def __init__(self, codec_name: str):
        self.codec_name = codec_name

    def decode(self, msg: Encoded, ctx: RoundContext) -> np.ndarray:
        spec = msg.spec
        if spec.numel == 0:
            if msg.payload:
                raise CodecError(f"{self.codec_name} payload for empty tensor {spec.name!r} is not empty")
            return np.zeros(spec.shape, dtype=np.float32)
        indices, values = decode_sparse(as_bytes(msg.payload), spec, self.codec_name)
        out = np.zeros(spec.numel, dtype=np.float32)
        out[indices] = values
        return out.reshape(spec.shape)


@register
@dataclass(frozen=True)
class TopKCodec(MomentumCorrected, Codec):
    """Top-k by magnitude with error feedback; (k/d)(value bits + ~log2(d/k)+1.5) bits per entry. Biased."""

    name = "topk"
    ratio: float = 0.01
    ef: bool = True
    decay: float = 1.0
    values: str = "fp32"
    momentum: float = 0.0  # DGC momentum correction at the worker (needs ef=1)
    masking: bool = True  # DGC momentum factor masking (with momentum > 0)

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        check_feedback_options(self.decay, self.ef, self.momentum)
        check_value_kind(self.values)

    def make_encoder(self) -> Encoder:
        return self.with_error_feedback(TopKEncoder(self), SparseDecoder(self.name))

    def make_decoder(self, shared: CrossWorkerState | None = None) -> Decoder:
        return SparseDecoder(self.name)
