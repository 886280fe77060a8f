"""The predictor engine of temporal predictive coding (TPC), docs/algorithms.md §1 (seed 000).

History, least-squares predictor, event trigger, and the encoder/decoder pair that both
``predictive/tpc.py`` and ``predictive/lag.py`` configure; the codecs themselves are those files.

Each worker predicts its current gradient ``g`` as a linear combination of the
last ``p`` *reconstructions* ``ĝ`` that it and the PS both hold (closed loop, as in
DPCM), sends the least-squares coefficients every round, and sends the residual
``r = g − prediction`` only when an event trigger fires; otherwise the PS uses the
prediction as that worker's gradient. The lazily aggregated gradient of LAG is the
special case ``p = 1`` with the coefficient fixed at 1 (``compressors/predictive/lag.py``).

Per round and tensor (newest reconstruction first)::

    H   = [ĝ^{t-1} … ĝ^{t-p}]                 d × p, identical at both ends
    a*  = (HᵀH + λI)⁻¹ Hᵀg,  λ = ridge·tr(HᵀH)/p   (Gram matrix kept incrementally)
    a_q = a* rounded to the coefficient format     prediction = H a_q (a_q, not a*)
    r   = g − prediction
    trigger(r) ? send (a_q, C(r)), ĝ = prediction + C⁻¹(C(r))
               : send  a_q,        ĝ = prediction
    push ĝ into H at both ends

Wire layout of one ``Encoded`` (``gradwire.v1.EncodedTensor``):

- ``predictor_coefficients``: the ``n`` coefficients ``a_q`` (``a_q[0]`` multiplies
  the newest reconstruction), little-endian float32 (``coef=fp32``) or float16
  (``coef=fp16``). ``n`` is ``p`` once the history is full, ``min(t, p)`` during an
  ``warmup=order`` warm-up, and ``0`` for a *full update* (prediction 0, the
  residual carries the whole gradient): the first round after a reset, every
  round of a ``warmup=full`` warm-up, and the encoder's fallback when a
  prediction is not finite. Any other length is rejected by the decoder.
- ``residual``: present (the flag) when the trigger fired; a nested
  ``EncodedTensor`` produced by the residual codec ``C`` (any registered codec,
  ``residual=dense`` by default; nested specs with options go in parentheses,
  ``residual=(qsgd:levels=4)``). Absent when the round was skipped.
- ``payload``: the history digest, ``check`` bytes (little-endian low bytes of a
  CRC-32 chained over every reconstruction pushed since the last reset). The PS
  compares it with its own digest before decoding and raises ``CodecError`` on a
  mismatch, so a worker and PS that fell out of step are detected the first
  round they differ (reset both to resync) instead of diverging silently.

Bits per message: ``32·n`` (or ``16·n``) + ``8·check`` + the residual's bits when sent.

Determinism: the prediction is computed with element-wise float32 multiply/add in
a fixed order (no BLAS, no FMA), so worker and PS reconstructions are bitwise
identical across machines; the Gram matrix and ``Hᵀg`` are accumulated in float64
(worker only: the PS needs no Gram matrix because it receives ``a_q``).

Options (``tpc:key=value,...``):

``order`` (p, 3) · ``trigger`` (``relative`` | ``absolute`` | ``lag`` | ``always``) ·
``eps`` (relative: send when ``‖r‖ > eps·‖g‖``; ``eps=0`` always sends) ·
``tau`` (absolute: send when ``‖r‖² > tau``) · ``alpha``, ``window`` (LAG rule:
send when ``‖r‖² > Σ_{k≤D} ‖θ^{t+1−k} − θ^{t−k}‖² / (alpha²·N²·D)``, D = window,
N = ``ctx.num_workers``, motions from ``ctx.model_motion_sq``) · ``max_stale``
(K: at most K−1 consecutive skipped residuals, so a residual goes at least every
K rounds; 0 = no limit) · ``residual`` (codec spec of C) · ``coef`` (``fp32`` |
``fp16``) · ``ridge`` (1e-8) · ``warmup`` (``order``: order min(t, p) while the
history is short; ``full``: full updates until p reconstructions are held) ·
``granularity`` (``model``: one coefficient vector for the whole flattened
update; ``tensor``: p coefficients per parameter tensor, and each tensor's
trigger decides alone, the LAG rule comparing the tensor's ‖r‖² with the
whole-model threshold) · ``check`` (digest
bytes, 0–4) · ``ef`` (error feedback on the residual: the worker keeps what the
residual codec or a skipped round dropped and adds it to the next residual).

Defaults: ``tpc`` = ``order=3, trigger=relative, eps=0.7, max_stale=2,
residual=fp16, coef=fp32, warmup=order, granularity=model, check=2, ef=0``.
They were chosen on the default task (``gradwire simulate --workers 2 --rounds
60 --codec tpc``: digits MLP, 26,122 parameters, mini-batches of 32), where
consecutive stochastic gradients are only weakly correlated (prediction gain
≈ 1.5): fp16 residuals halve the bits of every sent round, the relative trigger
skips a round only when the prediction explains more than half of the
gradient's energy (‖r‖ ≤ 0.7‖g‖), and ``max_stale=2`` never skips two rounds in
a row. Measured (seeds 0 / 1 / 2): 14.27 / 14.14 / 14.80 bits per entry (45 %
of dense), final accuracy 0.894 / 0.889 / 0.930 against dense 0.919 / 0.880 /
0.942. Error feedback (``ef=1``) skips more rounds (≈ 9 bits per entry at
``eps=0.9``) but the delayed residuals add noise to SGD and cost up to 4.5
accuracy points on some seeds; it is the right choice for full-batch gradient
descent, where it makes the run converge to the same optimum as dense and the
prediction gain is large: ``experiments/tpc_regression.py`` uses
``order=2,coef=fp16,check=0,ef=1,eps=0.3,max_stale=0,residual=fp16``.

The codec is biased: a skipped round uses the prediction in place of the gradient.
Statistics (``Encoder.stats()``): ``trigger_rate`` (fraction of messages that
carried a residual), ``forced_rate`` (fraction of messages whose residual was forced: full updates, staleness),
``mean_prediction_gain`` (Σ‖g‖² / Σ‖r‖² over the messages that used a
prediction), ``prediction_gain_db``, ``coefficient_bits_per_entry``,
``coefficient_bits_per_round``, ``residual_bits_per_entry``,
``check_bits_per_entry``, ``resets``.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

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
    check_input,
)
from gradwire.compressors.bounds import check_spec_text
from gradwire.compressors.registry import create_codec
from gradwire.compressors.spec import SpecError

TRIGGERS = ("relative", "absolute", "lag", "always")
COEF_FORMATS = {"fp32": "<f4", "fp16": "<f2"}
WARMUPS = ("order", "full")
GRANULARITIES = ("model", "tensor")
# Chunk for float64 accumulation of dot products: bounds the temporary to
# p × 64 Ki doubles while staying memory-bound.
DOT_CHUNK = 1 << 16


# ----------------------------------------------------------------- numerics


def history_dots(mat: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``mat @ x`` for float32 ``mat`` (k × d) and ``x`` (d), accumulated in float64.

    Uses einsum rather than BLAS: a threaded float64 gemv was measured 100× slower
    than its single-threaded cost on a loaded 2-core machine (OpenBLAS spin-waits).
    """
    out = np.zeros(mat.shape[0], dtype=np.float64)
    d = x.shape[0]
    for start in range(0, d, DOT_CHUNK):  # loop over chunks, vectorized within
        stop = min(start + DOT_CHUNK, d)
        out += np.einsum("ij,j->i", mat[:, start:stop], x[start:stop], dtype=np.float64)
    return out


def norm_sq(x: np.ndarray) -> float:
    """``‖x‖²`` of a float32 vector, accumulated in float64."""
    return float(np.einsum("i,i->", x, x, dtype=np.float64))


def solve_coefficients(gram: np.ndarray, rhs: np.ndarray, ridge: float = 1e-8) -> np.ndarray:
    """Least-squares coefficients from the normal equations ``(G + λI) a = b``.

    ``G = HᵀH`` (p × p), ``b = Hᵀg``, ``λ = ridge·tr(G)/p``. Returns float64 zeros
    when the history is all zero or the solution is not finite.
    """
    gram = np.asarray(gram, dtype=np.float64)
    rhs = np.asarray(rhs, dtype=np.float64)
    n = rhs.shape[0]
    trace = float(np.trace(gram))
    if n == 0 or not np.isfinite(trace) or trace <= 0.0:
        return np.zeros(n)
    system = gram + (ridge * trace / n) * np.eye(n)
    try:
        coef = np.linalg.solve(system, rhs)
    except np.linalg.LinAlgError:
        coef = np.linalg.lstsq(system, rhs, rcond=None)[0]
    if not np.isfinite(coef).all():
        return np.zeros(n)
    return coef


def quantize_coefficients(coef: np.ndarray, fmt: str) -> tuple[np.ndarray, bytes]:
    """Round coefficients to the wire format; returns (float32 values as used, bytes)."""
    dtype = np.dtype(COEF_FORMATS[fmt])
    limit = float(np.finfo(dtype).max)
    wire = np.clip(coef, -limit, limit).astype(dtype)
    return wire.astype(np.float32), wire.tobytes()


def predict(buf: np.ndarray, slots: list[int], coef: np.ndarray) -> np.ndarray:
    """``Σ_j coef[j]·buf[slots[j]]`` with element-wise float32 ops in a fixed order.

    Element-wise IEEE multiply and add are correctly rounded, so this is bitwise
    reproducible on any machine (a BLAS matrix-vector product is not).
    """
    out = np.multiply(buf[slots[0]], np.float32(coef[0]))
    tmp = np.empty_like(out)
    for j in range(1, len(slots)):  # p terms, each vectorized over d
        np.multiply(buf[slots[j]], np.float32(coef[j]), out=tmp)
        np.add(out, tmp, out=out)
    return out


# ------------------------------------------------------------ configuration


@dataclass(frozen=True)
class PredictorConfig:
    """Everything the encoder and decoder cores need; built by TPC and LAG codecs."""

    codec_spec: str
    order: int
    fixed_unit: bool  # LAG: p = 1, coefficient fixed at 1, never sent
    trigger: str
    eps: float
    tau: float
    alpha: float
    window: int
    max_stale: int
    residual: Codec
    coef: str
    ridge: float
    warmup: str
    check: int
    ef: bool

    @property
    def coef_size(self) -> int:
        return np.dtype(COEF_FORMATS[self.coef]).itemsize

    def order_for(self, count: int) -> int:
        """Prediction order used when ``count`` reconstructions are held (0: full update)."""
        if count == 0:
            return 0
        if self.warmup == "full" and count < self.order:
            return 0
        return min(count, self.order)


def validate_common(
    trigger: str,
    eps: float,
    tau: float,
    alpha: float,
    window: int,
    max_stale: int,
    check: int,
    residual: str,
) -> Codec:
    """Shared option checks of TPC and LAG; returns the residual codec."""
    if trigger not in TRIGGERS:
        raise ValueError(f"trigger must be one of {', '.join(TRIGGERS)}, got {trigger!r}")
    if not (np.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    if not (np.isfinite(tau) and tau >= 0):
        raise ValueError(f"tau must be finite and >= 0, got {tau}")
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be finite and > 0, got {alpha}")
    if window < 1:
        raise ValueError(f"window (LAG's D) must be >= 1, got {window}")
    if max_stale < 0:
        raise ValueError(f"max_stale must be >= 0 (0 = no limit), got {max_stale}")
    if not 0 <= check <= 4:
        raise ValueError(f"check (history digest bytes) must be 0..4, got {check}")
    try:
        inner = create_codec(residual)
    except SpecError as exc:
        raise ValueError(f"residual codec {residual!r}: {exc}") from None
    if inner.has_cross_worker_state:
        raise ValueError(f"residual codec {inner.spec!r} needs PS-wide state; it cannot code a residual")
    return inner


# ------------------------------------------------------------ shared state


class History:
    """The last ``p`` reconstructions of one tensor, identical at both ends.

    A ring buffer ``buf`` (p × d float32), the running digest and, at the worker,
    the Gram matrix ``buf·bufᵀ`` by slot (float64), updated with one ``H·ĝ`` per push.
    """

    def __init__(self, order: int, numel: int, with_gram: bool):
        self.buf = np.zeros((order, numel), dtype=np.float32)
        self.gram = np.zeros((order, order), dtype=np.float64) if with_gram else None
        self.head = 0  # slot the next push writes
        self.count = 0  # reconstructions held (≤ order)
        self.pushes = 0  # reconstructions pushed since reset
        self.digest = 0  # CRC-32 chained over every pushed reconstruction
        self.since = 0  # consecutive rounds without a residual

    @property
    def numel(self) -> int:
        return self.buf.shape[1]

    def slots(self, n: int) -> list[int]:
        """Buffer slots of the ``n`` newest reconstructions, newest first."""
        p = self.buf.shape[0]
        return [(self.head - 1 - j) % p for j in range(n)]

    def newest_first(self) -> np.ndarray:
        """The held reconstructions as a (count × d) array, newest first (a copy)."""
        return self.buf[self.slots(self.count)].copy()

    def push(self, g_hat: np.ndarray, triggered: bool) -> None:
        slot = self.head
        self.buf[slot] = g_hat
        if self.gram is not None:
            row = history_dots(self.buf, self.buf[slot])
            self.gram[slot, :] = row
            self.gram[:, slot] = row
        self.head = (slot + 1) % self.buf.shape[0]
        self.count = min(self.count + 1, self.buf.shape[0])
        self.pushes += 1
        self.digest = zlib.crc32(memoryview(self.buf[slot]).cast("B"), self.digest)
        self.since = 0 if triggered else self.since + 1

    def digest_bytes(self, nbytes: int) -> bytes:
        return self.digest.to_bytes(4, "little")[:nbytes]

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "buf": self.buf.copy(),
            "head": self.head,
            "count": self.count,
            "pushes": self.pushes,
            "digest": self.digest,
            "since": self.since,
        }
        if self.gram is not None:
            out["gram"] = self.gram.copy()
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        buf = np.array(state["buf"], dtype=np.float32)
        if buf.shape != self.buf.shape:
            raise CodecError(f"history state has shape {buf.shape}, expected {self.buf.shape}")
        self.buf = buf
        if self.gram is not None:
            self.gram = np.array(state["gram"], dtype=np.float64)
        self.head = int(state["head"])
        self.count = int(state["count"])
        self.pushes = int(state["pushes"])
        self.digest = int(state["digest"])
        self.since = int(state["since"])


class _Stats:
    KEYS = (
        "messages",
        "residuals",
        "forced",
        "predicted",
        "gain_g2",
        "gain_r2",
        "gain_db_sum",
        "coef_bytes",
        "residual_bytes",
        "check_bytes",
        "entries",
        "resets",
    )

    def __init__(self) -> None:
        self.values = dict.fromkeys(self.KEYS, 0.0)

    def add(self, **kw: float) -> None:
        for k, v in kw.items():
            self.values[k] += float(v)

    def summary(self, num_tensors: int) -> dict[str, float]:
        v = self.values
        msgs = max(v["messages"], 1.0)
        entries = max(v["entries"], 1.0)
        rounds = max(v["messages"] / max(num_tensors, 1), 1.0)
        out = {
            "trigger_rate": v["residuals"] / msgs,
            "forced_rate": v["forced"] / msgs,
            "coefficient_bits_per_entry": 8.0 * v["coef_bytes"] / entries,
            "coefficient_bits_per_round": 8.0 * v["coef_bytes"] / rounds,
            "residual_bits_per_entry": 8.0 * v["residual_bytes"] / entries,
            "check_bits_per_entry": 8.0 * v["check_bytes"] / entries,
            "resets": v["resets"],
        }
        if v["predicted"]:
            out["mean_prediction_gain"] = v["gain_g2"] / v["gain_r2"] if v["gain_r2"] > 0 else 1e12
            out["prediction_gain_db"] = v["gain_db_sum"] / v["predicted"]
        return out


class _TensorCore:
    """Per-tensor state: history, residual codec state (and error feedback at the worker)."""

    def __init__(self, cfg: PredictorConfig, numel: int, worker: bool):
        self.history = History(cfg.order, numel, with_gram=worker and not cfg.fixed_unit)
        if worker:
            self.inner: Encoder | None = cfg.residual.make_encoder()
            self.mirror: Decoder = cfg.residual.make_decoder(None)
        else:
            self.inner = None
            self.mirror = cfg.residual.make_decoder(None)
        self.memory: np.ndarray | None = None  # error feedback (worker only)

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"history": self.history.state_dict(), "residual_decoder": self.mirror.state_dict()}
        if self.inner is not None:
            out["residual_encoder"] = self.inner.state_dict()
            out["memory"] = None if self.memory is None else self.memory.copy()
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history.load_state_dict(state["history"])
        self.mirror.load_state_dict(state["residual_decoder"])
        if self.inner is not None:
            self.inner.load_state_dict(state["residual_encoder"])
            mem = state.get("memory")
            self.memory = None if mem is None else np.array(mem, dtype=np.float32)


def _coefficients_for(cfg: PredictorConfig, hist: History, order: int, g: np.ndarray):
    """(a_q as float32, wire bytes) for this round's prediction of ``g``."""
    if cfg.fixed_unit:
        return np.ones(1, dtype=np.float32), b""
    slots = hist.slots(order)
    assert hist.gram is not None
    gram = hist.gram[np.ix_(slots, slots)]
    rhs = history_dots(hist.buf, g)[slots]
    coef = solve_coefficients(gram, rhs, cfg.ridge)
    return quantize_coefficients(coef, cfg.coef)


def _trigger(cfg: PredictorConfig, r2: float, g2: float, ctx: RoundContext) -> bool:
    if cfg.trigger == "always":
        return True
    if cfg.trigger == "relative":
        return cfg.eps == 0.0 or r2 > cfg.eps * cfg.eps * g2
    if cfg.trigger == "absolute":
        return r2 > cfg.tau
    motion = sum(float(m) for m in ctx.model_motion_sq[-cfg.window :])
    n = max(int(ctx.num_workers), 1)
    return r2 > motion / (cfg.alpha * cfg.alpha * n * n * cfg.window)


# ------------------------------------------------------------ encoder / decoder


class _HistoryHolder:
    """What the worker's encoder and the PS's decoder keep alike: one core per tensor.

    Both ends hold the same histories (closed loop), so reset and checkpoints are
    one piece of code; ``_worker`` says which side's core to rebuild.
    """

    _worker: bool
    cfg: PredictorConfig
    cores: dict[str, _TensorCore]
    _stats: _Stats

    def history(self, name: str) -> np.ndarray:
        """Held reconstructions of tensor ``name``, newest first (for tests and tools)."""
        return self.cores[name].history.newest_first()

    def reset(self) -> None:
        self.cores.clear()
        self._stats.add(resets=1)

    def state_dict(self) -> dict[str, Any]:
        return {
            "tensors": {name: core.state_dict() for name, core in self.cores.items()},
            "numel": {name: core.history.numel for name, core in self.cores.items()},
            "stats": dict(self._stats.values),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.cores = {}
        for name, sub in state["tensors"].items():
            core = _TensorCore(self.cfg, int(state["numel"][name]), worker=self._worker)
            core.load_state_dict(sub)
            self.cores[name] = core
        self._stats.values = {k: float(state["stats"].get(k, 0.0)) for k in _Stats.KEYS}


class PredictiveEncoder(_HistoryHolder, Encoder):
    """Worker side of TPC / LAG: one history per tensor name."""

    _worker = True

    def __init__(self, cfg: PredictorConfig):
        self.cfg = cfg
        self.cores: dict[str, _TensorCore] = {}
        self._stats = _Stats()

    def _core(self, spec: TensorSpec) -> _TensorCore:
        core = self.cores.get(spec.name)
        if core is None:
            core = self.cores[spec.name] = _TensorCore(self.cfg, spec.numel, worker=True)
        elif core.history.numel != spec.numel:
            raise CodecError(f"tensor {spec.name!r} changed size: {spec.numel} entries, history has {core.history.numel}")
        return core

    def encode(self, x: np.ndarray, spec: TensorSpec, ctx: RoundContext) -> Encoded:
        cfg = self.cfg
        g = check_input(x, spec)
        core = self._core(spec)
        hist = core.history
        order = cfg.order_for(hist.count)
        coef_bytes = b""
        pred: np.ndarray | None = None
        if order:
            coef_q, coef_bytes = _coefficients_for(cfg, hist, order, g)
            pred = predict(hist.buf, hist.slots(order), coef_q)
            if not np.isfinite(pred).all():
                if cfg.fixed_unit:
                    raise CodecError(f"LAG prediction for {spec.name!r} is not finite")
                order, coef_bytes, pred = 0, b"", None  # fall back to a full update
        r = g.copy() if pred is None else np.subtract(g, pred)
        if cfg.ef and core.memory is not None:
            r += core.memory
        if not np.isfinite(r).all():
            raise CodecError(f"residual of {spec.name!r} overflows float32")
        r2 = norm_sq(r)
        g2 = norm_sq(g)
        forced = pred is None or (cfg.max_stale > 0 and hist.since + 1 >= cfg.max_stale)
        triggered = forced or _trigger(cfg, r2, g2, ctx)
        residual_msg: Encoded | None = None
        if triggered:
            assert core.inner is not None
            residual_msg = core.inner.encode(r, spec, ctx)
            r_hat = np.asarray(core.mirror.decode(residual_msg, ctx), dtype=np.float32).reshape(-1)
            if r_hat.size != spec.numel:
                raise CodecError(f"residual codec decoded {r_hat.size} entries for {spec.name!r}")
            g_hat = r_hat.copy() if pred is None else np.add(pred, r_hat)
            if cfg.ef:
                core.memory = r - r_hat
        else:
            assert pred is not None
            g_hat = pred
            if cfg.ef:
                core.memory = r
        if not np.isfinite(g_hat).all():
            raise CodecError(f"reconstruction of {spec.name!r} is not finite")
        msg = Encoded(
            cfg.codec_spec,
            spec,
            payload=hist.digest_bytes(cfg.check),
            coefficients=coef_bytes,
            residual=residual_msg,
        )
        hist.push(g_hat, triggered)
        self._stats.add(
            messages=1,
            residuals=triggered,
            forced=forced and triggered,
            coef_bytes=len(coef_bytes),
            residual_bytes=residual_msg.payload_bytes if residual_msg is not None else 0,
            check_bytes=cfg.check,
            entries=spec.numel,
        )
        if pred is not None:
            self._stats.add(
                predicted=1,
                gain_g2=g2,
                gain_r2=r2,
                gain_db_sum=10.0 * np.log10(max(g2, 1e-30) / max(r2, 1e-30)),
            )
        return msg

    def stats(self) -> dict[str, float]:
        out = self._stats.summary(len(self.cores))
        for core in self.cores.values():
            assert core.inner is not None
            for k, v in core.inner.stats().items():
                out.setdefault(f"residual_{k}", float(v))
        return out


class PredictiveDecoder(_HistoryHolder, Decoder):
    """PS side of TPC / LAG, one per worker: mirrors the worker's histories."""

    _worker = False

    def __init__(self, cfg: PredictorConfig):
        self.cfg = cfg
        self.cores: dict[str, _TensorCore] = {}
        self._stats = _Stats()
        self._residual_spec = cfg.residual.spec

    def decode(self, msg: Encoded, ctx: RoundContext) -> np.ndarray:
        cfg = self.cfg
        spec = msg.spec
        check_spec_text(msg.codec, cfg.codec_spec, f"message for {spec.name!r}")
        core = self.cores.get(spec.name)
        if core is None:
            core = _TensorCore(cfg, spec.numel, worker=False)
        elif core.history.numel != spec.numel:
            raise CodecError(f"tensor {spec.name!r} changed size: {spec.numel} entries, history has {core.history.numel}")
        hist = core.history
        if len(msg.payload) != cfg.check:
            raise CodecError(f"{cfg.codec_spec} payload for {spec.name!r} is {len(msg.payload)} bytes, expected {cfg.check} (history digest)")
        if msg.payload != hist.digest_bytes(cfg.check):
            raise CodecError(
                f"history digest mismatch for {spec.name!r}: worker {msg.payload.hex()} vs PS "
                f"{hist.digest_bytes(cfg.check).hex()} after {hist.pushes} rounds; both ends must reset"
            )
        order = cfg.order_for(hist.count)
        pred: np.ndarray | None = None
        n_coef = 0
        if cfg.fixed_unit:
            if msg.coefficients:
                raise CodecError(f"{cfg.codec_spec} sends no coefficients; got {len(msg.coefficients)} bytes for {spec.name!r}")
            if order:
                pred = hist.buf[hist.slots(1)[0]].copy()
        else:
            size = len(msg.coefficients)
            if size not in (0, order * cfg.coef_size):
                raise CodecError(
                    f"{cfg.codec_spec}: {size} coefficient bytes for {spec.name!r}; expected "
                    f"{order * cfg.coef_size} ({order} × {cfg.coef}) or 0 (full update)"
                )
            n_coef = size // cfg.coef_size
            if n_coef:
                coef = np.frombuffer(msg.coefficients, dtype=COEF_FORMATS[cfg.coef]).astype(np.float32)
                if not np.isfinite(coef).all():
                    raise CodecError(f"coefficients for {spec.name!r} are not finite")
                pred = predict(hist.buf, hist.slots(n_coef), coef)
        forced = pred is None or (cfg.max_stale > 0 and hist.since + 1 >= cfg.max_stale)
        res = msg.residual
        if res is None:
            if pred is None:
                raise CodecError(f"full update for {spec.name!r} (no prediction) arrived without a residual")
            if forced:
                raise CodecError(
                    f"residual for {spec.name!r} missing after {hist.since} skipped rounds (max_stale={cfg.max_stale})"
                )
            g_hat = pred
        else:
            check_spec_text(res.codec, self._residual_spec, f"residual of {spec.name!r}")
            if res.spec != spec:
                raise CodecError(f"residual spec {res.spec} does not match tensor spec {spec}")
            r_hat = np.asarray(core.mirror.decode(res, ctx), dtype=np.float32).reshape(-1)
            if r_hat.size != spec.numel:
                raise CodecError(f"residual of {spec.name!r} decodes to {r_hat.size} entries, expected {spec.numel}")
            g_hat = r_hat.copy() if pred is None else np.add(pred, r_hat)
        if not np.isfinite(g_hat).all():
            raise CodecError(f"reconstruction of {spec.name!r} is not finite")
        self.cores[spec.name] = core
        hist.push(g_hat, res is not None)
        self._stats.add(
            messages=1,
            residuals=res is not None,
            forced=forced and res is not None,
            coef_bytes=len(msg.coefficients),
            residual_bytes=res.payload_bytes if res is not None else 0,
            check_bytes=len(msg.payload),
            entries=spec.numel,
        )
        return g_hat.reshape(spec.shape)

    def stats(self) -> dict[str, float]:
        return self._stats.summary(len(self.cores))


# ------------------------------------------------------------ the codec


class PredictiveCodecBase(Codec):
    """What ``tpc`` and ``lag`` share: the residual codec, the scope, and the
    encoder/decoder pair built from ``config()``. Subclasses are frozen dataclasses
    with ``trigger, eps, tau, alpha, window, max_stale, check, residual, granularity``."""

    stateless_decoder = False  # the decoder holds the predictor history
    carries_residual: ClassVar[bool] = True  # the wire's residual (and, for TPC, coefficient) fields
    # The shared options, for the type checker: annotations only (this class is no dataclass, so
    # they make no fields); each subclass declares them as its own fields with its defaults.
    trigger: str
    eps: float
    tau: float
    alpha: float
    window: int
    max_stale: int
    check: int
    residual: str
    granularity: str
    ef: bool
    _residual_codec: Codec  # set by _resolve_residual
    needs_model_motion = True  # the LAG trigger weighs the innovation against the model's recent moves

    def _resolve_residual(self) -> None:
        """Validate the options both codecs have; store the residual codec, canonical."""
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        inner = validate_common(
            self.trigger, self.eps, self.tau, self.alpha, self.window, self.max_stale, self.check, self.residual
        )
        object.__setattr__(self, "_residual_codec", inner)
        object.__setattr__(self, "residual", inner.spec)  # canonical, so both ends compare equal

    @property
    def scope(self) -> str:  # type: ignore[override]
        return "model" if self.granularity == "model" else "tensor"

    def config(self) -> PredictorConfig:
        raise NotImplementedError

    def _predictor_config(self, **specific) -> PredictorConfig:
        """The PredictorConfig of the options both codecs have, plus the ``specific`` ones."""
        return PredictorConfig(
            codec_spec=self.spec,
            trigger=self.trigger,
            eps=self.eps,
            tau=self.tau,
            alpha=self.alpha,
            window=self.window,
            max_stale=self.max_stale,
            residual=self._residual_codec,
            check=self.check,
            ef=self.ef,
            **specific,
        )

    def make_encoder(self) -> Encoder:
        return PredictiveEncoder(self.config())

    def make_decoder(self, shared: CrossWorkerState | None = None) -> Decoder:
        return PredictiveDecoder(self.config())


