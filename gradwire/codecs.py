"""gradwire's codecs as a library: tensors in, self-describing bytes out, and back.

Stateless codecs (``dense``, ``fp16``, ``bf16``, ``fp8``, ``ans``, ``huffman``,
``qsgd``, and ``topk`` / ``randk`` / ``sign`` / ``m22`` with ``ef=0``) are one call
each way::

    from gradwire import codecs
    data = codecs.encode(grad, "ans:bits=4")     # bytes: codec spec, shape, dtype inside
    grad_hat = codecs.decode(data)               # same kind (numpy / torch) and dtype as grad

Codecs that carry state from call to call (error feedback memory, PowerSGD's warm
start, TPC/LAG predictor histories) are used through explicit objects, one
:class:`Encoder` at the sender and one :class:`Decoder` per sender at the receiver,
each with ``state_dict()`` / ``load_state_dict()`` / ``reset()``::

    enc, dec = codecs.Encoder("topk:ratio=0.01"), codecs.Decoder("topk:ratio=0.01")
    for grad in grads:
        grad_hat = dec.decode(enc.encode(grad, name="fc.weight"))

``encode`` refuses a stateful codec (it would silently drop the memory between
calls) and every entry point refuses ``lgc``, whose decoders need the parameter
server's cross-worker state. docs/codec-api.md has the full guide.

Frame layout, version 1 (all integers little-endian)::

    offset size
         0    4  magic b"GWCF"
         4    1  version (1)
         5    1  flags: bit 0 the input was a torch tensor; bit 1 the frame is from a
                 stateful Encoder (``decode`` refuses it); other bits must be 0
         6    1  input dtype code (DTYPE_CODES); decoded values are cast back to it
         7    1  reserved, must be 0
         8    8  step (the codec's round: randomized codecs and predictors depend on it)
        16    4  rank of the sender
        20    4  number of workers (ranks) the sender averages with; >= 1, > rank
        24    8  seed
        32    4  count of tensors in the frame (1 for encode/Encoder; a DDP hook sends
                 one frame per bucket holding one tensor per parameter)
        36       count x (u32 length, ``gradwire.v1.EncodedTensor`` protobuf)

The ``EncodedTensor`` is the exact message the parameter server receives (same
conversion, ``gradwire.protocol``), so ``payload_bytes`` here is what the PS counts as
payload (payload + predictor coefficients + residual). The header is hand-packed
with ``struct`` rather than a protobuf message: it has fixed-size fields that must be
checked before anything is parsed, and a fixed layout keeps the bound checks simple.

Every length and count is checked before anything is allocated: the frame size
(``max_bytes``), the tensor count, the codec spec's length, the number of
dimensions, the product of the shape (``max_numel``), and after decoding, that the
codec produced exactly ``numel`` finite-or-not float32 values. Any malformed input
raises :class:`CodecError` (a ``ValueError``) with the reason.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradwire import protocol
from gradwire.compressors.base import Codec, CodecError, Encoded, RoundContext, TensorSpec
from gradwire.compressors.registry import available_codecs, create_codec
from gradwire.compressors.spec import SpecError

__all__ = [
    "CodecError",
    "Decoder",
    "Encoder",
    "Frame",
    "available_codecs",
    "decode",
    "encode",
    "is_stateless",
    "parse_frame",
]

MAGIC = b"GWCF"
VERSION = 1
FLAG_TORCH = 0x01
FLAG_STATEFUL = 0x02
KNOWN_FLAGS = FLAG_TORCH | FLAG_STATEFUL
HEADER = struct.Struct("<4sBBBBQIIQI")
LENGTH = struct.Struct("<I")
# Input dtypes a frame can restore; codecs compute in float32. bfloat16 exists in torch only.
DTYPE_CODES = {0: "float32", 1: "float64", 2: "float16", 3: "bfloat16"}
DTYPE_IDS = {name: code for code, name in DTYPE_CODES.items()}

# Bounds for hostile input. The defaults admit a 1 GiB frame and 2^28 entries (1 GiB
# of float32 output); callers that know their sizes pass tighter ones.
DEFAULT_MAX_BYTES = 1 << 30
DEFAULT_MAX_NUMEL = 1 << 28
MAX_TENSORS = 1 << 16
MAX_SPEC_CHARS = 1024
MAX_NAME_CHARS = 1024
MAX_NDIM = 32


@dataclass(frozen=True)
class Frame:
    """A parsed frame: the header's facts and the tensors, not yet decoded."""

    version: int
    torch: bool
    stateful: bool
    dtype: str
    step: int
    rank: int
    num_workers: int
    seed: int
    tensors: tuple[Encoded, ...]

    @property
    def context(self) -> RoundContext:
        return RoundContext(round=self.step, rank=self.rank, seed=self.seed, num_workers=self.num_workers)

    @property
    def payload_bytes(self) -> int:
        """Bytes the parameter server would count as payload for these tensors."""
        return sum(t.payload_bytes for t in self.tensors)


@functools.lru_cache(maxsize=256)
def _codec(spec: str) -> Codec:
    try:
        return create_codec(spec)
    except SpecError as exc:
        raise CodecError(f"codec spec {spec!r}: {exc}") from None


def codec_for(spec: str | Codec) -> Codec:
    """A configured codec from a spec string (or the codec itself); refuses ``lgc``-like codecs."""
    codec = spec if isinstance(spec, Codec) else _codec(str(spec))
    if codec.has_cross_worker_state:
        raise CodecError(
            f"codec {codec.spec!r} decodes with state shared across all workers (a parameter-server "
            "coordinator); it cannot be used point to point. Run it through the gradwire PS."
        )
    return codec


def is_stateless(spec: str | Codec) -> bool:
    """True when neither side keeps state between calls, so ``encode``/``decode`` suffice."""
    codec = codec_for(spec)
    if not codec.stateless_decoder:
        return False
    return not codec.make_encoder().state_dict() and not codec.make_decoder().state_dict()


# --- tensors in and out ---------------------------------------------------------------------


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


def to_numpy(x: Any) -> tuple[np.ndarray, bool, str]:
    """(float32 array, was it a torch tensor, its dtype name) for a numpy array or torch tensor."""
    if _is_torch(x):
        dtype = str(x.dtype).removeprefix("torch.")
        if dtype not in DTYPE_IDS:
            raise CodecError(f"cannot encode a torch tensor of dtype {x.dtype}; floating point only")
        import torch

        return x.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy(), True, dtype
    arr = np.asarray(x)
    dtype = arr.dtype.name
    if dtype not in DTYPE_IDS:
        raise CodecError(f"cannot encode an array of dtype {arr.dtype}; floating point only "
                         f"({', '.join(n for n in DTYPE_IDS if n != 'bfloat16')})")
    return np.ascontiguousarray(arr, dtype=np.float32), False, dtype


def from_numpy(arr: np.ndarray, as_torch: bool, dtype: str) -> Any:
    if not arr.flags.writeable:
        # A zero-copy view of the frame's bytes (the dense codec's decoding): the caller gets an
        # array of its own, which it may write to (a torch tensor would even write into the bytes).
        arr = arr.copy()
    if as_torch:
        import torch

        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).to(getattr(torch, dtype))
    return arr.astype(dtype, copy=False)


# --- frames -----------------------------------------------------------------------------------


def pack_frame(
    tensors: Sequence[Encoded], ctx: RoundContext, *, torch: bool = False, dtype: str = "float32",
    stateful: bool = False,
) -> bytes:
    """Frame bytes for already encoded tensors (the DDP hook sends one per bucket)."""
    flags = (FLAG_TORCH if torch else 0) | (FLAG_STATEFUL if stateful else 0)
    parts = [HEADER.pack(MAGIC, VERSION, flags, DTYPE_IDS[dtype], 0, ctx.round, ctx.rank,
                         ctx.num_workers, ctx.seed, len(tensors))]
    for t in tensors:
        body = protocol.encoded_to_bytes(t)
        parts.append(LENGTH.pack(len(body)))
        parts.append(body)
    return b"".join(parts)


def _check_encoded(e: Encoded, max_numel: int, depth: int = 0) -> int:
    """Bounds on one parsed tensor; returns its numel."""
    if len(e.codec) > MAX_SPEC_CHARS:
        raise CodecError(f"codec spec of {len(e.codec)} characters (at most {MAX_SPEC_CHARS})")
    if len(e.spec.name) > MAX_NAME_CHARS:
        raise CodecError(f"tensor name of {len(e.spec.name)} characters (at most {MAX_NAME_CHARS})")
    if len(e.spec.shape) > MAX_NDIM:
        raise CodecError(f"tensor {e.spec.name!r} has {len(e.spec.shape)} dimensions (at most {MAX_NDIM})")
    if e.spec.dtype != "float32":
        raise CodecError(f"tensor {e.spec.name!r} decodes to {e.spec.dtype!r}; codecs decode float32")
    numel = 1
    for d in e.spec.shape:  # Python ints: no overflow before the comparison
        numel *= d
    if numel > max_numel:
        raise CodecError(f"tensor {e.spec.name!r} of shape {list(e.spec.shape)} has {numel} entries "
                         f"(at most {max_numel})")
    if e.residual is not None:
        _check_encoded(e.residual, max_numel, depth + 1)
    return numel


def parse_frame(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, max_numel: int = DEFAULT_MAX_NUMEL) -> Frame:
    """Parse and bound-check a frame without decoding any payload."""
    data = bytes(data) if not isinstance(data, bytes) else data
    if len(data) > max_bytes:
        raise CodecError(f"frame of {len(data)} bytes exceeds the limit of {max_bytes}")
    if len(data) < HEADER.size:
        raise CodecError(f"frame of {len(data)} bytes is shorter than its {HEADER.size}-byte header")
    magic, version, flags, dtype_id, reserved, step, rank, workers, seed, count = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CodecError(f"not a gradwire codec frame (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise CodecError(f"frame version {version}; this gradwire reads version {VERSION}")
    if flags & ~KNOWN_FLAGS or reserved:
        raise CodecError(f"unknown frame flags {flags:#04x} / reserved byte {reserved}")
    if dtype_id not in DTYPE_CODES:
        raise CodecError(f"unknown dtype code {dtype_id}")
    if workers < 1 or rank >= workers:
        raise CodecError(f"rank {rank} of {workers} workers")
    if count > MAX_TENSORS:
        raise CodecError(f"frame claims {count} tensors (at most {MAX_TENSORS})")
    # Each tensor needs at least its length prefix: checked before the loop allocates anything.
    if count * LENGTH.size > len(data) - HEADER.size:
        raise CodecError(f"frame claims {count} tensors but has {len(data) - HEADER.size} bytes after its header")
    tensors, offset, total = [], HEADER.size, 0
    for i in range(count):
        if offset + LENGTH.size > len(data):
            raise CodecError(f"frame ends inside the length of tensor {i}")
        (length,) = LENGTH.unpack_from(data, offset)
        offset += LENGTH.size
        if length > len(data) - offset:
            raise CodecError(f"tensor {i} claims {length} bytes; {len(data) - offset} remain")
        try:
            encoded = protocol.encoded_from_bytes(data[offset : offset + length])
        except ValueError as exc:  # MalformedMessage
            raise CodecError(f"tensor {i} is not a valid EncodedTensor: {exc}") from None
        offset += length
        total += _check_encoded(encoded, max_numel)
        if total > max_numel:
            raise CodecError(f"frame holds more than {max_numel} entries")
        tensors.append(encoded)
    if offset != len(data):
        raise CodecError(f"{len(data) - offset} trailing bytes after the last tensor")
    return Frame(version, bool(flags & FLAG_TORCH), bool(flags & FLAG_STATEFUL), DTYPE_CODES[dtype_id],
                 step, rank, workers, seed, tuple(tensors))


def decode_tensor(decoder: Any, e: Encoded, ctx: RoundContext) -> np.ndarray:
    """One tensor through a codec decoder, with the output's size checked against the spec.

    Codecs check their own payloads and raise ``CodecError``; nothing else is caught here, so
    that a codec which fails otherwise on a hostile payload shows up as the bug it is (the
    fuzz tests in tests/gradwire/test_codec_api.py feed every stateless codec mutated frames).
    """
    out = decoder.decode(e, ctx)
    out = np.asarray(out, dtype=np.float32)
    if out.size != e.spec.numel:
        raise CodecError(f"{e.codec} decoded {out.size} entries for {e.spec.name!r}, spec says {e.spec.numel}")
    return out.reshape(e.spec.shape)


# --- stateless --------------------------------------------------------------------------------


def encode(
    tensor: Any, codec: str | Codec = "dense", *, name: str = "tensor", step: int = 0, rank: int = 0,
    seed: int = 0, num_workers: int = 1,
) -> bytes:
    """Encode a numpy array or torch tensor with a stateless codec into self-describing bytes.

    ``step``, ``rank`` and ``seed`` go into the frame: randomized codecs (``randk``, ``qsgd``)
    draw from them, and ``decode`` reproduces the draw. Raises ``CodecError`` for a stateful
    codec (use :class:`Encoder`) and for input the codec cannot encode (NaN, Inf, integers).
    """
    if not 0 <= rank < num_workers:
        raise CodecError(f"rank {rank} of {num_workers} workers: pass num_workers > rank")
    c = codec_for(codec)
    if not is_stateless(c):
        raise CodecError(
            f"codec {c.spec!r} keeps state between calls (error feedback memory, warm start or a "
            "predictor history); encode() would silently drop it. Use gradwire.codecs.Encoder and "
            "Decoder, or a stateless variant (for example ef=0)."
        )
    arr, was_torch, dtype = to_numpy(tensor)
    spec = TensorSpec(name, tuple(int(d) for d in arr.shape))
    ctx = RoundContext(round=step, rank=rank, seed=seed, num_workers=num_workers)
    e = c.make_encoder().encode(arr, spec, ctx)
    return pack_frame([e], ctx, torch=was_torch, dtype=dtype)


def decode(
    data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, max_numel: int = DEFAULT_MAX_NUMEL,
) -> Any:
    """Decode bytes from :func:`encode` to a numpy array or torch tensor, as was encoded.

    Raises ``CodecError`` with the reason for anything that is not a valid frame of one
    tensor from a stateless codec.
    """
    frame = parse_frame(data, max_bytes=max_bytes, max_numel=max_numel)
    if frame.stateful:
        raise CodecError("frame comes from a stateful gradwire.codecs.Encoder; decode it with a Decoder")
    if len(frame.tensors) != 1:
        raise CodecError(f"frame holds {len(frame.tensors)} tensors; decode() reads frames of one")
    (e,) = frame.tensors
    c = codec_for(e.codec)
    if not is_stateless(c):
        raise CodecError(f"codec {e.codec!r} is stateful; decode it with gradwire.codecs.Decoder")
    return from_numpy(decode_tensor(c.make_decoder(), e, frame.context), frame.torch, frame.dtype)


# --- stateful ---------------------------------------------------------------------------------


class Encoder:
    """The sending side of a (possibly stateful) codec, one per sender.

    Each ``encode(tensor, name=...)`` call is the next step for that tensor name; error
    feedback memory, warm starts and predictor histories are kept per name. The frame
    carries the step so the :class:`Decoder` can refuse frames out of order.
    """

    def __init__(self, codec: str | Codec, *, rank: int = 0, seed: int = 0, num_workers: int = 1):
        if not 0 <= rank < num_workers:
            raise CodecError(f"rank {rank} of {num_workers} workers: pass num_workers > rank")
        self.codec = codec_for(codec)
        self.rank, self.seed, self.num_workers = rank, seed, num_workers
        self.encoder = self.codec.make_encoder()
        self.steps: dict[str, int] = {}
        self.payload_bytes = 0
        self.frame_bytes = 0

    def encode(self, tensor: Any, name: str = "tensor", *, model_motion_sq: Sequence[float] = ()) -> bytes:
        """The next frame for ``name``. ``model_motion_sq`` feeds LAG-style triggers (see lag.py)."""
        arr, was_torch, dtype = to_numpy(tensor)
        step = self.steps.get(name, 0)
        spec = TensorSpec(name, tuple(int(d) for d in arr.shape))
        ctx = RoundContext(round=step, rank=self.rank, seed=self.seed, num_workers=self.num_workers,
                           model_motion_sq=tuple(float(m) for m in model_motion_sq))
        e = self.encoder.encode(arr, spec, ctx)
        data = pack_frame([e], ctx, torch=was_torch, dtype=dtype, stateful=True)
        self.steps[name] = step + 1
        self.payload_bytes += e.payload_bytes
        self.frame_bytes += len(data)
        return data

    def stats(self) -> dict[str, float]:
        return dict(self.encoder.stats())

    def reset(self) -> None:
        """Forget all state; the receiver's Decoder must be reset at the same point."""
        self.encoder.reset()
        self.steps.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"codec": self.codec.spec, "steps": dict(self.steps), "encoder": self.encoder.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["codec"] != self.codec.spec:
            raise CodecError(f"state is for codec {state['codec']!r}, this encoder is {self.codec.spec!r}")
        self.encoder.load_state_dict(state["encoder"])
        self.steps = {str(k): int(v) for k, v in state["steps"].items()}


class Decoder:
    """The receiving side, one per sender: mirrors that sender's :class:`Encoder`.

    Accepts frames of this decoder's codec only (stateless frames from :func:`encode` too),
    from one rank, each tensor name's steps in order with none missing.
    """

    def __init__(self, codec: str | Codec, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_numel: int = DEFAULT_MAX_NUMEL):
        self.codec = codec_for(codec)
        self.decoder = self.codec.make_decoder()
        self.max_bytes, self.max_numel = max_bytes, max_numel
        self.steps: dict[str, int] = {}
        self.rank: int | None = None

    def decode(self, data: bytes) -> Any:
        frame = parse_frame(data, max_bytes=self.max_bytes, max_numel=self.max_numel)
        if len(frame.tensors) != 1:
            raise CodecError(f"frame holds {len(frame.tensors)} tensors; Decoder.decode reads frames of one")
        (e,) = frame.tensors
        if e.codec != self.codec.spec:
            raise CodecError(f"frame uses codec {e.codec!r}; this decoder is {self.codec.spec!r}")
        if self.rank is not None and frame.rank != self.rank:
            raise CodecError(f"frame from rank {frame.rank}; this decoder mirrors rank {self.rank}")
        expected = self.steps.get(e.spec.name, 0)
        if frame.stateful and frame.step != expected:
            raise CodecError(f"frame is step {frame.step} of {e.spec.name!r}; expected step {expected} "
                             "(frames must arrive in order; reset both ends to resync)")
        out = decode_tensor(self.decoder, e, frame.context)
        self.rank = frame.rank
        self.steps[e.spec.name] = frame.step + 1
        return from_numpy(out, frame.torch, frame.dtype)

    def reset(self) -> None:
        self.decoder.reset()
        self.steps.clear()
        self.rank = None

    def state_dict(self) -> dict[str, Any]:
        return {"codec": self.codec.spec, "steps": dict(self.steps), "rank": self.rank,
                "decoder": self.decoder.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["codec"] != self.codec.spec:
            raise CodecError(f"state is for codec {state['codec']!r}, this decoder is {self.codec.spec!r}")
        self.decoder.load_state_dict(state["decoder"])
        self.steps = {str(k): int(v) for k, v in state["steps"].items()}
        self.rank = None if state["rank"] is None else int(state["rank"])
