"""Size bounds for what arrives from the wire, checked before anything is decoded.

A decoder's working memory grows with its input (bit unpacking alone is 8 bytes of
uint8 per payload byte), so the PS first refuses any encoded tensor larger than an
honest encoder can produce for its spec. With the input bounded by a small multiple
of the decoded tensor, a decoder that allocates a constant times its input allocates
a constant times the decoded tensor, whatever the payload says.

The bound is generous on purpose (no honest payload comes near it; tests check every
registered codec with options that maximise its payload): 8 bytes per entry (dense
float32 is 4; top-k with ratio=1 is 4 + 1/8; PowerSGD at full rank (m+n)·r·4 ≤ 8·m·n)
plus a constant for headers and code tables.
"""

from __future__ import annotations

from gradwire.compressors.base import Codec, CodecError, Encoded, TensorSpec

MAX_BYTES_PER_ENTRY = 8
# Headers, Huffman/ANS code tables, quantizer tables of the largest codecs.
PAYLOAD_SLACK_BYTES = 64 * 1024
# A codec spec on the wire is compared with the session's canonical spec, never parsed;
# canonical specs are short, so anything longer is refused before comparing.
MAX_SPEC_CHARS = 1024


def max_payload_bytes(spec: TensorSpec) -> int:
    """The most bytes (payload + coefficients + residual) an encoded ``spec`` may carry."""
    return MAX_BYTES_PER_ENTRY * spec.numel + PAYLOAD_SLACK_BYTES


def check_encoded_size(msg: Encoded, spec: TensorSpec) -> None:
    """Refuse an encoded tensor larger than any honest encoding of ``spec``."""
    limit = max_payload_bytes(spec)
    size = msg.payload_bytes
    if size > limit:
        raise CodecError(
            f"encoded tensor {spec.name!r} carries {size} bytes; at most {limit} are possible for "
            f"{spec.numel} entries"
        )


def check_spec_text(text: str, canonical: str, where: str) -> None:
    """A codec spec from the wire must equal the agreed canonical spec (no parsing: cost O(len))."""
    if len(text) > MAX_SPEC_CHARS:
        raise CodecError(f"{where}: codec spec of {len(text)} characters (at most {MAX_SPEC_CHARS})")
    if text != canonical:
        raise CodecError(f"{where}: encoded with codec {text!r}; this session agreed on {canonical!r}")


def check_wire_fields(msg: Encoded, codec: Codec, spec: TensorSpec) -> None:
    """What the PS checks of an encoded tensor before decoding it: its size against ``spec``,
    its codec spec against the session's (string equality), and no fields the codec never sends
    (a residual or predictor coefficients outside TPC/LAG)."""
    check_encoded_size(msg, spec)
    check_spec_text(msg.codec, codec.spec, f"tensor {spec.name!r}")
    if not getattr(codec, "carries_residual", False) and (msg.residual is not None or msg.coefficients):
        raise CodecError(
            f"tensor {spec.name!r}: codec {codec.spec!r} sends no residual and no predictor coefficients"
        )
