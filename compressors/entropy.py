"""Entropy coding of quantizer symbols: empirical entropy, canonical Huffman, ANS.

Pure, deterministic functions over numpy arrays; no codec is registered here.
The model (a pmf over the alphabet ``0 .. n-1``) is always given by the caller, so
both ends rebuild the identical code from whatever parameters they share
(ALGORITHMS.md §2); nothing about the model is written into the bytes.

Huffman
    ``huffman_code_lengths`` builds deterministic, length-limited code lengths
    (classic two-queue Huffman with fixed tie-breaking; package-merge when the
    optimal lengths exceed ``max_length``). Every symbol gets a code, even one
    whose probability is zero. Codes are canonical: symbols sorted by
    (length, symbol) take consecutive code values.

    ``huffman_encode`` layout, all big-endian bit order (MSB first)::

        [block table]   only when count > block size B (B depends on count alone):
                        u32 little-endian  base  (smallest block length in bits)
                        u8                 width (bits per packed entry, 0..32)
                        (K-1) x width bits (block_bits - base), packed, padded to a byte
        [code stream]   the codewords of all symbols, concatenated, zero-padded to a byte

    The symbols are cut into K blocks of B consecutive symbols. The table holds
    the bit length of every block but the last, so the decoder can run all
    blocks as parallel lanes (one vectorized table lookup per step over all
    lanes) instead of a bit-serial loop. It costs about 10 bits per block,
    ~0.005-0.01 bit/symbol. ``huffman_bits`` counts codeword bits only;
    ``len(huffman_encode(...))`` is what goes on the wire.

ANS
    ``ans_encode`` / ``ans_decode`` drive constriction's stack coder
    (``constriction.stream.stack.AnsCoder``) with a ``Categorical`` model built
    from the caller's pmf (``perfect=False``). Layout: the coder's compressed
    32-bit words, little-endian.

Malformed data (wrong length, wrong count, invalid codes) raises
``compressors.base.CodecError`` with a reason.
"""

from __future__ import annotations

import functools

import numpy as np

from compressors.base import CodecError

DEFAULT_MAX_CODE_LENGTH = 16  # decoder table of 2^16 entries; ample for alphabets up to 2^12
MAX_SUPPORTED_CODE_LENGTH = 24
_WEIGHT_SCALE = float(2**40)  # integer weights: exact arithmetic, deterministic ties
_PACKAGE_MERGE_MAX_ALPHABET = 4096

__all__ = [
    "DEFAULT_MAX_CODE_LENGTH",
    "ans_decode",
    "ans_encode",
    "canonical_codes",
    "empirical_entropy_bits",
    "entropy_from_counts",
    "huffman_bits",
    "huffman_bits_from_counts",
    "huffman_block_symbols",
    "huffman_code_lengths",
    "huffman_decode",
    "huffman_encode",
    "symbol_counts",
]


# ---------------------------------------------------------------------------
# Input validation and counting
# ---------------------------------------------------------------------------


def _as_symbols(symbols: np.ndarray, alphabet_size: int) -> np.ndarray:
    arr = np.asarray(symbols)
    if arr.dtype.kind == "f":
        if arr.size and not np.isfinite(arr).all():
            raise CodecError("symbols contain NaN or Inf")
        if arr.size and not np.array_equal(arr, np.round(arr)):
            raise CodecError("symbols must be integers")
    elif arr.dtype.kind not in "iub":
        raise CodecError(f"symbols must be an integer array, got dtype {arr.dtype}")
    arr = arr.reshape(-1).astype(np.int64, copy=False)
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= alphabet_size:
            raise CodecError(f"symbols span [{lo}, {hi}], outside the alphabet [0, {alphabet_size - 1}]")
    return arr


def _as_pmf(pmf: np.ndarray) -> np.ndarray:
    p = np.asarray(pmf, dtype=np.float64).reshape(-1)
    if p.size == 0:
        raise CodecError("pmf is empty")
    if not np.isfinite(p).all():
        raise CodecError("pmf contains NaN or Inf")
    if (p < 0).any():
        raise CodecError("pmf has negative entries")
    total = float(p.sum())
    if total <= 0:
        raise CodecError("pmf sums to zero")
    return p / total


def symbol_counts(symbols: np.ndarray, alphabet_size: int) -> np.ndarray:
    """Histogram of ``symbols`` over ``0 .. alphabet_size-1`` (int64)."""
    arr = _as_symbols(symbols, alphabet_size)
    return np.bincount(arr, minlength=alphabet_size).astype(np.int64)


def entropy_from_counts(counts: np.ndarray) -> float:
    """Empirical entropy in bits per symbol of a histogram (0 for an empty one)."""
    c = np.asarray(counts, dtype=np.float64)
    n = float(c.sum())
    if n <= 0:
        return 0.0
    p = c[c > 0] / n
    return float(max(0.0, -np.dot(p, np.log2(p))))


def empirical_entropy_bits(symbols: np.ndarray, alphabet_size: int) -> float:
    """Empirical (plug-in) entropy of ``symbols`` in bits per symbol; 0 for empty input."""
    return entropy_from_counts(symbol_counts(symbols, alphabet_size))


# ---------------------------------------------------------------------------
# Huffman code construction
# ---------------------------------------------------------------------------


def _integer_weights(pmf: np.ndarray) -> np.ndarray:
    p = _as_pmf(pmf)
    # Every symbol keeps a code: weight at least 1 (a probability of ~1e-12).
    return np.maximum(np.rint(p * _WEIGHT_SCALE), 1.0).astype(np.int64)


def _huffman_lengths_unlimited(weights: np.ndarray) -> np.ndarray:
    """Two-queue Huffman on integer weights; ties prefer leaves, then lower symbol index."""
    n = weights.size
    order = np.argsort(weights, kind="stable")  # ascending weight, ties by symbol index
    leaf_w = [int(v) for v in weights[order]]
    node_w: list[int] = []
    parent = [0] * (2 * n - 1)  # leaves 0..n-1 (in sorted order), internal n..2n-2
    i = j = 0  # heads of the leaf queue and the internal-node queue

    def pop() -> int:
        nonlocal i, j
        if i < n and (j >= len(node_w) or leaf_w[i] <= node_w[j]):
            i += 1
            return i - 1
        j += 1
        return n + j - 1

    def weight(idx: int) -> int:
        return leaf_w[idx] if idx < n else node_w[idx - n]

    for _ in range(n - 1):
        a = pop()
        b = pop()
        node = n + len(node_w)
        node_w.append(weight(a) + weight(b))
        parent[a] = node
        parent[b] = node
    depth = [0] * (2 * n - 1)
    for node in range(2 * n - 3, -1, -1):  # root is 2n-2 with depth 0
        depth[node] = depth[parent[node]] + 1
    lengths = np.empty(n, dtype=np.int64)
    lengths[order] = depth[:n]
    return lengths


def _package_merge(weights: np.ndarray, max_length: int) -> np.ndarray:
    """Optimal length-limited prefix code lengths (package-merge)."""
    n = weights.size
    if n > _PACKAGE_MERGE_MAX_ALPHABET:
        raise CodecError(f"length-limited Huffman supports at most {_PACKAGE_MERGE_MAX_ALPHABET} symbols")
    order = np.argsort(weights, kind="stable")
    leaf_w = weights[order].astype(np.int64)
    leaf_c = np.eye(n, dtype=np.uint8)
    items_w, items_c = leaf_w, leaf_c
    for _ in range(max_length - 1):
        k = items_w.size // 2
        pk_w = items_w[0 : 2 * k : 2] + items_w[1 : 2 * k : 2]
        pk_c = items_c[0 : 2 * k : 2] + items_c[1 : 2 * k : 2]
        all_w = np.concatenate([leaf_w, pk_w])
        all_c = np.concatenate([leaf_c, pk_c])
        sel = np.argsort(all_w, kind="stable")  # leaves first on equal weight
        items_w, items_c = all_w[sel], all_c[sel]
    chosen = items_c[: 2 * n - 2].astype(np.int64).sum(axis=0)
    lengths = np.empty(n, dtype=np.int64)
    lengths[order] = chosen
    return lengths


def huffman_code_lengths(pmf: np.ndarray, max_length: int = DEFAULT_MAX_CODE_LENGTH) -> np.ndarray:
    """Deterministic Huffman code lengths (uint8) for ``pmf``, limited to ``max_length`` bits.

    The pmf is normalized and turned into integer weights (resolution 2^-40, at
    least 1), so every symbol gets a code, zero-probability ones included, and
    ties are broken by a fixed rule (leaves before merged nodes, then symbol
    index). When the optimal code is longer than ``max_length`` the optimal
    length-limited code (package-merge) is used instead.
    """
    weights = _integer_weights(pmf)
    n = weights.size
    if not 1 <= max_length <= MAX_SUPPORTED_CODE_LENGTH:
        raise CodecError(f"max_length must be in [1, {MAX_SUPPORTED_CODE_LENGTH}], got {max_length}")
    if n == 1:
        return np.ones(1, dtype=np.uint8)
    if n > 2**max_length:
        raise CodecError(f"{n} symbols cannot have codes of at most {max_length} bits")
    lengths = _huffman_lengths_unlimited(weights)
    if lengths.max() > max_length:
        lengths = _package_merge(weights, max_length)
    return lengths.astype(np.uint8)


def _check_lengths(lengths: np.ndarray) -> np.ndarray:
    ln = np.asarray(lengths).reshape(-1)
    if ln.size == 0:
        raise CodecError("code lengths are empty")
    if ln.dtype.kind not in "iu":
        raise CodecError(f"code lengths must be integers, got dtype {ln.dtype}")
    ln = ln.astype(np.int64)
    if ln.min() < 1 or ln.max() > MAX_SUPPORTED_CODE_LENGTH:
        raise CodecError(f"code lengths must be in [1, {MAX_SUPPORTED_CODE_LENGTH}]")
    kraft = np.sum(np.ldexp(1.0, -ln))
    if kraft > 1.0 + 1e-12:
        raise CodecError(f"code lengths violate the Kraft inequality (sum 2^-l = {kraft:.6f} > 1)")
    return ln


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code values (uint64, right-aligned) for the given lengths."""
    ln = _check_lengths(lengths)
    max_len = int(ln.max())
    order = np.lexsort((np.arange(ln.size), ln))  # by length, then symbol
    units = np.left_shift(np.int64(1), max_len - ln[order])  # 2^(L-l) per codeword
    starts = np.concatenate([[0], np.cumsum(units)[:-1]])
    codes = np.empty(ln.size, dtype=np.uint64)
    codes[order] = (starts >> (max_len - ln[order])).astype(np.uint64)
    return codes


@functools.lru_cache(maxsize=64)
def _tables(lengths_key: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(codes, lengths, decode table, L) for a length vector; cached on its bytes."""
    ln = _check_lengths(np.frombuffer(lengths_key, dtype=np.uint8))
    codes = canonical_codes(ln)
    max_len = int(ln.max())
    order = np.lexsort((np.arange(ln.size), ln))
    sizes = np.left_shift(np.int64(1), max_len - ln[order])
    # Entry = symbol | length << 32; windows no codeword matches (incomplete code)
    # decode to the sentinel symbol 0xFFFFFFFF with a full-window advance.
    entries = order.astype(np.int64) | (ln[order] << 32)
    table = np.repeat(entries, sizes)
    missing = (1 << max_len) - table.size
    if missing:
        table = np.concatenate([table, np.full(missing, 0xFFFFFFFF | (max_len << 32), dtype=np.int64)])
    for arr in (codes, table):
        arr.setflags(write=False)
    ln_u = ln.astype(np.uint64)
    ln_u.setflags(write=False)
    return codes, ln_u, table, max_len


def _lengths_key(lengths: np.ndarray) -> bytes:
    ln = np.asarray(lengths).reshape(-1)
    if ln.dtype.kind not in "iu":
        raise CodecError(f"code lengths must be integers, got dtype {ln.dtype}")
    if ln.size and (ln.min() < 0 or ln.max() > 255):
        raise CodecError("code lengths out of range")
    return ln.astype(np.uint8).tobytes()


def huffman_bits_from_counts(counts: np.ndarray, lengths: np.ndarray) -> int:
    """Codeword bits for a histogram under the given code lengths."""
    c = np.asarray(counts, dtype=np.int64).reshape(-1)
    ln = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if c.size != ln.size:
        raise CodecError(f"histogram has {c.size} bins, code has {ln.size} symbols")
    return int(np.dot(c, ln))


def huffman_bits(symbols: np.ndarray, lengths: np.ndarray) -> int:
    """Exact number of codeword bits for ``symbols`` (without the block table or byte padding)."""
    ln = np.asarray(lengths).reshape(-1)
    return huffman_bits_from_counts(symbol_counts(symbols, ln.size), ln)


# ---------------------------------------------------------------------------
# Huffman bitstream
# ---------------------------------------------------------------------------


def huffman_block_symbols(count: int) -> int:
    """Symbols per decoding lane for a stream of ``count`` symbols (a function of count only)."""
    if count <= 2048:
        return max(count, 1)
    return 1024 if count <= 4_000_000 else 2048


def _pack_bits(codes: np.ndarray, lens: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Concatenate right-aligned codewords MSB-first; returns (bytes, end bit of each codeword)."""
    ends = np.cumsum(lens, dtype=np.uint64)
    if codes.size == 0:
        return b"", ends
    total = int(ends[-1])
    starts = ends - lens
    word = (starts >> np.uint64(6)).astype(np.intp)
    off = starts & np.uint64(63)
    # A codeword sits at bits [off, off+len) of its 64-bit word, spilling into the next one.
    room = np.int64(64) - off.astype(np.int64) - lens.astype(np.int64)  # free bits after it
    fits = room >= 0
    shl = np.where(fits, room, 0).astype(np.uint64)
    shr = np.where(fits, 0, -room).astype(np.uint64)
    hi = (codes << shl) >> shr
    lo = np.where(fits, np.uint64(0), codes << np.where(fits, 0, 64 + room).astype(np.uint64))
    nwords = (total + 63) // 64 + 1
    words = np.zeros(nwords, dtype=np.uint64)
    first = np.flatnonzero(np.diff(word, prepend=-1))  # first codeword of every touched word
    idx = word[first]
    words[idx] = np.bitwise_or.reduceat(hi, first)
    words[idx + 1] |= np.bitwise_or.reduceat(lo, first)
    data = words.astype(">u8").tobytes()[: (total + 7) // 8]
    return data, ends


def _pack_uint(values: np.ndarray, width: int) -> bytes:
    if width == 0 or values.size == 0:
        return b""
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
    bits = ((values.astype(np.uint64)[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.reshape(-1)).tobytes()


def _unpack_uint(data: bytes, width: int, count: int) -> np.ndarray:
    if width == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: count * width].reshape(count, width)
    weights = np.left_shift(np.int64(1), np.arange(width - 1, -1, -1, dtype=np.int64))
    return bits.astype(np.int64) @ weights


def huffman_encode(symbols: np.ndarray, lengths: np.ndarray) -> bytes:
    """Canonical-Huffman encode ``symbols`` with the code given by ``lengths`` (see module doc)."""
    key = _lengths_key(lengths)
    codes_tab, len_tab, _, _ = _tables(key)
    sym = _as_symbols(symbols, len_tab.size)
    count = sym.size
    if count == 0:
        return b""
    stream, ends = _pack_bits(codes_tab[sym], len_tab[sym])
    block = huffman_block_symbols(count)
    nblocks = -(-count // block)
    if nblocks == 1:
        return stream
    block_end = ends[block - 1 :: block][: nblocks - 1].astype(np.int64)
    block_bits = np.diff(block_end, prepend=0)
    base = int(block_bits.min())
    width = int(block_bits.max() - base).bit_length()
    header = base.to_bytes(4, "little") + bytes([width])
    return header + _pack_uint(block_bits - base, width) + stream


def _words(stream: bytes, pad_bits: int) -> np.ndarray:
    nwords = (len(stream) + 7) // 8 + pad_bits // 64 + 2
    buf = np.zeros(nwords * 8, dtype=np.uint8)
    buf[: len(stream)] = np.frombuffer(stream, dtype=np.uint8)
    return buf.view(">u8").astype(np.uint64)


def huffman_decode(data: bytes, lengths: np.ndarray, count: int) -> np.ndarray:
    """Decode ``count`` symbols (int64) written by ``huffman_encode`` with the same ``lengths``."""
    key = _lengths_key(lengths)
    _, _, table, max_len = _tables(key)
    count = int(count)
    if count < 0:
        raise CodecError(f"negative symbol count {count}")
    data = bytes(data)
    if count == 0:
        if data:
            raise CodecError(f"{len(data)} Huffman bytes for zero symbols")
        return np.zeros(0, dtype=np.int64)
    block = huffman_block_symbols(count)
    nblocks = -(-count // block)
    if nblocks > 1:
        if len(data) < 5:
            raise CodecError("Huffman payload too short for its block table")
        base = int.from_bytes(data[:4], "little")
        width = data[4]
        if width > 32:
            raise CodecError(f"Huffman block table width {width} > 32")
        table_bytes = ((nblocks - 1) * width + 7) // 8
        if len(data) < 5 + table_bytes:
            raise CodecError("Huffman payload truncated inside its block table")
        block_bits = _unpack_uint(data[5 : 5 + table_bytes], width, nblocks - 1) + base
        stream = data[5 + table_bytes :]
    else:
        block_bits = np.zeros(0, dtype=np.int64)
        stream = data
    total_bits = 8 * len(stream)
    starts = np.concatenate([[0], np.cumsum(block_bits)]).astype(np.int64)
    if (block_bits < block).any() or (block_bits > block * max_len).any() or starts[-1] >= max(total_bits, 1):
        raise CodecError("Huffman block table is inconsistent with the stream length")
    last_count = count - (nblocks - 1) * block
    words = _words(stream, block * max_len)
    out, ends = _decode_lanes(words, table, max_len, starts, block, last_count)
    symbols = out[:count]
    last_end = int(ends[-1])
    if not np.array_equal(ends[:-1], starts[1:]):
        raise CodecError("Huffman blocks do not end where the block table says (corrupt data or wrong code)")
    if (last_end + 7) // 8 != len(stream):
        raise CodecError(
            f"Huffman stream holds {len(stream)} bytes but {count} symbols end at bit {last_end} "
            "(truncated, padded, wrong count or wrong code)"
        )
    if (symbols > 0xFFFF_FFFE).any():
        raise CodecError("Huffman stream contains a bit pattern that is not a codeword")
    return symbols


def _decode_lanes(
    words: np.ndarray, table: np.ndarray, max_len: int, starts: np.ndarray, block: int, last_count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``block`` symbols from every lane at once (lanes start at bit ``starts``).

    Returns the symbols in stream order (lane after lane) and the bit position where
    every lane ended (the last lane after its ``last_count`` symbols).
    """
    nlanes = starts.size
    pos = starts.astype(np.uint64)
    out = np.empty((block, nlanes), dtype=np.int64)
    ends = np.empty(nlanes, dtype=np.int64)
    sh_win = np.uint64(64 - max_len)
    six, m63, one, s63, s32 = np.uint64(6), np.uint64(63), np.uint64(1), np.uint64(63), np.int64(32)
    widx = np.empty(nlanes, dtype=np.uint64)
    off = np.empty(nlanes, dtype=np.uint64)
    w0 = np.empty(nlanes, dtype=np.uint64)
    w1 = np.empty(nlanes, dtype=np.uint64)
    entry = np.empty(nlanes, dtype=np.int64)
    for t in range(block):
        if t == last_count:
            ends[-1] = pos[-1]
        np.right_shift(pos, six, out=widx)
        np.bitwise_and(pos, m63, out=off)
        np.take(words, widx, out=w0)
        widx += one
        np.take(words, widx, out=w1)
        np.left_shift(w0, off, out=w0)
        np.right_shift(w1, one, out=w1)
        np.subtract(s63, off, out=off)
        np.right_shift(w1, off, out=w1)
        np.bitwise_or(w0, w1, out=w0)
        np.right_shift(w0, sh_win, out=w0)
        np.take(table, w0, out=entry)
        out[t] = entry
        np.right_shift(entry, s32, out=entry)
        pos += entry.view(np.uint64)
    if last_count == block:
        ends[-1] = pos[-1]
    ends[:-1] = pos[:-1]
    return out.T.reshape(-1) & np.int64(0xFFFFFFFF), ends


# ---------------------------------------------------------------------------
# ANS (constriction)
# ---------------------------------------------------------------------------


def _categorical(pmf: np.ndarray):
    import constriction  # local import: heavy native module, only when needed

    return constriction.stream.model.Categorical(_as_pmf(pmf), perfect=False)


def ans_encode(symbols: np.ndarray, pmf: np.ndarray) -> bytes:
    """ANS-encode ``symbols`` with the model ``pmf`` (constriction stack coder, 32-bit words)."""
    import constriction

    p = _as_pmf(pmf)
    sym = _as_symbols(symbols, p.size)
    if sym.size == 0:
        return b""
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(sym.astype(np.int32), _categorical(p))
    return coder.get_compressed().astype("<u4").tobytes()


def ans_decode(data: bytes, pmf: np.ndarray, count: int) -> np.ndarray:
    """Decode ``count`` symbols (int64) written by ``ans_encode`` with the same ``pmf``."""
    import constriction

    p = _as_pmf(pmf)
    count = int(count)
    if count < 0:
        raise CodecError(f"negative symbol count {count}")
    data = bytes(data)
    if count == 0:
        if data:
            raise CodecError(f"{len(data)} ANS bytes for zero symbols")
        return np.zeros(0, dtype=np.int64)
    if len(data) == 0 or len(data) % 4:
        raise CodecError(f"ANS payload of {len(data)} bytes is not a non-empty sequence of 32-bit words")
    words = np.frombuffer(data, dtype="<u4").astype(np.uint32)
    if words[-1] == 0:
        raise CodecError("ANS payload ends in a zero word (truncated or corrupt)")
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        out = coder.decode(_categorical(p), count)
    except Exception as exc:  # constriction raises plain exceptions on exhausted data
        raise CodecError(f"ANS stream does not decode: {exc}") from None
    if not coder.is_empty():
        raise CodecError(
            f"ANS stream not fully consumed after {count} symbols (wrong count, wrong model or corrupt data)"
        )
    return np.asarray(out, dtype=np.int64)
