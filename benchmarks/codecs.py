"""Codec benchmark: encode/decode throughput and bits per entry on large gradients.

    python -m benchmarks.codecs [--sizes 1000000 10000000] [--codecs SPEC ...]
                                [--data gennorm0.5 gennorm1 gennorm2 real] [--repeats 3]
                                [--json out.json]

For every codec spec (the defaults below; codecs missing from the registry are
skipped with a note) and every gradient (synthetic GenNorm with β = 0.5, 1, 2 at
scale 1e-3, and a real one: the default model's largest weight gradient over up to 1000
training steps, each step scaled to RMS 1e-3, tiled to the size), it measures in one run, on one core:

* encode and decode throughput in MB/s of float32 input (median of ``--repeats``
  timed calls after one untimed warm-up call), from the process CPU time (one
  core's work: on a shared machine the wall clock also counts waiting for a core)
  and, beside it, from the wall clock;
* bits per entry on the wire (8 × payload bytes / entries) and the ratio against
  ``dense`` measured in the same run (compression ×, and time relative to dense);
* relative error ‖ĝ − g‖ / ‖g‖ of one decode;
* for entropy-coded codecs their statistics (symbol entropy, coded bits/symbol).

Beside them, yardsticks on the same data: the empirical entropy of the 4-bit
symbols that ``huffman:bits=4`` codes (a bound, not a bitstream), zstd level 1
on those symbols (one byte each; quantization time not included), and zstd
level 3 on the raw float32 bytes (lossless general-purpose compression). Ratios across machines are
meaningful; absolute MB/s vary up to 2x between runs on shared machines.
"""

from __future__ import annotations

import os

# One core: set before numpy/torch start their thread pools.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402

from gradwire.compressors.base import RoundContext, TensorSpec  # noqa: E402
from gradwire.compressors.entropy import entropy_from_counts  # noqa: E402
from gradwire.compressors.registry import available_codecs, create_codec  # noqa: E402

DEFAULT_CODECS = [
    "dense",
    "fp16",
    "huffman:bits=4",
    "huffman:bits=4,model=gennorm",
    "ans:bits=4",
    "ans:bits=4,model=zgennorm",
    "huffman:bits=8",
    "fp8:format=143",
    "fp8:format=152",
    "fp8:format=143,coder=huffman",
    "fp8:format=152,coder=ans",
    "topk:ratio=0.01",
    "randk:ratio=0.01",
    "qsgd:levels=16",
    "sign",
    "powersgd:rank=2",
    "m22:bits=2,M=2",
    "bf16",
    "fp8:format=143,coder=zstd",
    "m22:bits=2,M=2,coder=zstd",
    "tpc",
    "lag",
    "lgc",
]
DEFAULT_DATA = ["gennorm0.5", "gennorm1", "gennorm2", "real"]
DEFAULT_SIZES = [1_000_000, 10_000_000]
TARGET_MBPS = 50.0
TARGET_HUFFMAN_GAP = 0.2
TARGET_CODEC = "huffman:bits=4"
KERNEL_TARGET_MBPS = 200.0  # every codec, each way, at >= 10M entries (issue 15, item 2)


# ------------------------------------------------------------------ data


def gennorm_gradient(beta: float, size: int, seed: int = 0) -> np.ndarray:
    from scipy import stats

    rng = np.random.default_rng(seed)
    return (stats.gennorm.rvs(beta, scale=1e-3, size=size, random_state=rng)).astype(np.float32)


def real_gradient(size: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """The default model's largest weight gradient over training steps, concatenated (tiled to ``size``).

    One tensor, because the codecs quantize and model each tensor separately:
    flattening layers of different scales into one vector would not be what they
    see. For the same reason every step's gradient is scaled to an RMS of 1e-3
    (the codecs see one step at a time, and gradients shrink by orders of
    magnitude over training: unscaled, the early steps would set the range of a
    tensor whose later steps all round to zero). Distinct steps rather than one
    step tiled, so that zstd cannot exploit exact repeats.
    """
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    try:
        from gradwire.tasks import make_task

        task = make_task()
        model = task.build_model()
        xs, ys, loss_fn = task.dataset.train_x, task.dataset.train_y, task.loss_fn
        source = f"gradwire.tasks default task ({task.dataset.name}/{task.model_name})"
    except ImportError:
        from sklearn.datasets import load_digits

        digits = load_digits()
        xs = (digits.data / 16.0).astype(np.float32)
        ys = digits.target.astype(np.int64)
        model = torch.nn.Sequential(
            torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
        )
        loss_fn = torch.nn.functional.cross_entropy
        source = "inline MLP 64-128-128-10 on sklearn digits"
    name, param = max(model.named_parameters(), key=lambda kv: kv[1].numel())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    chunks, total = [], 0
    for _ in range(1000):  # distinct gradients: up to 1000 training steps
        idx = rng.integers(0, len(xs), 32)
        opt.zero_grad()
        loss_fn(model(torch.from_numpy(xs[idx])), torch.from_numpy(ys[idx])).backward()
        g = param.grad.detach().numpy().reshape(-1).astype(np.float64)
        rms = float(np.sqrt(np.mean(g * g)))
        chunks.append((g / rms if rms > 0 else g).astype(np.float32) * np.float32(1e-3))
        total += chunks[-1].size
        opt.step()
        if total >= size:
            break
    flat = np.concatenate(chunks)
    reps = -(-size // flat.size)
    return np.tile(flat, reps)[:size].copy(), f"{source}, '{name}' gradient over {len(chunks)} SGD steps, RMS-scaled" + (
        f", tiled x{reps}" if reps > 1 else ""
    )


def make_data(name: str, size: int) -> tuple[np.ndarray, str]:
    if name.startswith("gennorm"):
        beta = float(name.removeprefix("gennorm"))
        return gennorm_gradient(beta, size), f"GenNorm beta={beta:g}, scale 1e-3"
    if name == "real":
        return real_gradient(size)
    raise SystemExit(f"unknown data {name!r}; use gennorm<beta> or real")


# ------------------------------------------------------------------ measurement


def _median_time(fn: Callable[[], object], repeats: int) -> tuple[float, float, object]:
    """(median CPU seconds, median wall seconds, last result) of ``repeats`` calls after a warm-up.

    CPU time (``time.process_time``) is what one core spends; on a shared, loaded
    machine the wall clock also counts time spent waiting for a core.
    """
    out = fn()  # warm-up: page faults, caches, lazy imports
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        out = fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return max(statistics.median(cpu), 1e-9), max(statistics.median(wall), 1e-9), out


def _shape(size: int) -> tuple[int, ...]:
    return (size // 1000, 1000) if size % 1000 == 0 and size >= 1000 else (size,)


def bench_codec(spec_text: str, x: np.ndarray, repeats: int) -> dict:
    """Encode and decode round by round (round 0 untimed), as a worker and the PS do: the decoder
    sees every message in order, which stateful codecs (tpc, lag: mirrored history) require."""
    codec = create_codec(spec_text)
    spec = TensorSpec("bench.weight", _shape(x.size))
    xs = x.reshape(spec.shape)
    encoder, decoder = codec.make_encoder(), codec.make_decoder(codec.make_cross_worker_state())
    times: dict[str, list[float]] = {"c_enc": [], "w_enc": [], "c_dec": [], "w_dec": []}
    for round_ in range(repeats + 1):
        ctx = RoundContext(round=round_, rank=0, seed=1)
        c0, w0 = time.process_time(), time.perf_counter()
        msg = encoder.encode(xs, spec, ctx)
        c1, w1 = time.process_time(), time.perf_counter()
        y = decoder.decode(msg, ctx)
        c2, w2 = time.process_time(), time.perf_counter()
        if round_:  # round 0 is the warm-up: page faults, caches, lazy imports
            for key, value in (("c_enc", c1 - c0), ("w_enc", w1 - w0), ("c_dec", c2 - c1), ("w_dec", w2 - w1)):
                times[key].append(value)
    c_enc, w_enc, c_dec, w_dec = (max(statistics.median(times[k]), 1e-9) for k in ("c_enc", "w_enc", "c_dec", "w_dec"))
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    err = float(np.linalg.norm(y - x) / max(np.linalg.norm(x.astype(np.float64)), 1e-300))
    row = {"codec": spec_text, "bits_per_entry": 8.0 * msg.payload_bytes / x.size, "rel_error": err}
    row.update(_speeds(x.size, c_enc, w_enc, c_dec, w_dec))
    row["stats"] = {k: float(v) for k, v in encoder.stats().items()}
    return row


def _speeds(n: int, c_enc: float, w_enc: float, c_dec: float, w_dec: float) -> dict:
    mb = 4 * n / 1e6  # MB of float32 input
    return {
        "encode_s": c_enc,
        "decode_s": c_dec,
        "encode_MBps": mb / c_enc,
        "decode_MBps": mb / c_dec,
        "encode_wall_s": w_enc,
        "decode_wall_s": w_dec,
        "encode_wall_MBps": mb / w_enc,
        "decode_wall_MBps": mb / w_dec,
    }


def yardsticks(x: np.ndarray, repeats: int) -> list[dict]:
    import zstandard

    quantized = create_codec(TARGET_CODEC).quantize_tensor(x.reshape(-1))  # the symbols huffman:bits=4 codes
    sym = quantized.symbols
    h = entropy_from_counts(np.bincount(sym, minlength=quantized.quantizer.alphabet_size))
    rows = [{"codec": "entropy(4-bit symbols) [bound]", "bits_per_entry": h, "bound": True}]
    for label, level, blob in (("zstd-1(4-bit symbols)", 1, sym.tobytes()), ("zstd-3(float32)", 3, x.tobytes())):
        comp = zstandard.ZstdCompressor(level=level)
        dec = zstandard.ZstdDecompressor()
        c_enc, w_enc, packed = _median_time(lambda c=comp, b=blob: c.compress(b), repeats)
        c_dec, w_dec, _ = _median_time(lambda d=dec, p=packed: d.decompress(p), repeats)
        row = {"codec": label, "bits_per_entry": 8.0 * len(packed) / x.size}
        row.update(_speeds(x.size, c_enc, w_enc, c_dec, w_dec))
        rows.append(row)
    return rows


# ------------------------------------------------------------------ report


def _fmt(v, spec: str = ".3f") -> str:
    return "" if v is None else format(v, spec)


def print_table(rows: list[dict]) -> None:
    header = ["data", "size", "codec", "bits/entry", "x dense", "enc MB/s", "dec MB/s", "enc t/dense", "dec t/dense",
              "enc wall", "dec wall", "rel err", "H sym", "coded/sym"]
    lines = [header]
    for r in rows:
        st = r.get("stats", {})
        lines.append([
            r["data"], f"{r['size']:,}", r["codec"], _fmt(r["bits_per_entry"], ".4f"),
            _fmt(r.get("compression_vs_dense"), ".1f"), _fmt(r.get("encode_MBps"), ".0f"), _fmt(r.get("decode_MBps"), ".0f"),
            _fmt(r.get("encode_time_vs_dense"), ".1f"), _fmt(r.get("decode_time_vs_dense"), ".1f"),
            _fmt(r.get("encode_wall_MBps"), ".0f"), _fmt(r.get("decode_wall_MBps"), ".0f"), _fmt(r.get("rel_error"), ".3g"), _fmt(st.get("symbol_entropy_bits"), ".4f"),
            _fmt(st.get("coded_bits_per_symbol"), ".4f"),
        ])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print("  ".join(str(c).rjust(w) if j not in (0, 2) else str(c).ljust(w) for j, (c, w) in enumerate(zip(line, widths, strict=True))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def entropy_stage(spec_text: str) -> str | None:
    """The entropy coder a codec spec runs: "ans", "huffman", "zstd" or None."""
    name, _, options = spec_text.partition(":")
    opts = dict(kv.split("=", 1) for kv in options.split(",") if "=" in kv)
    if name in ("huffman", "ans"):
        return name
    if name in ("fp8", "m22"):
        return {"none": None}.get(opts.get("coder", "none" if name == "fp8" else "ans"), opts.get("coder", "ans"))
    if name == "qsgd":
        return "ans"  # coder=auto picks ANS whenever it is shorter than fixed-width magnitudes
    return None


# Why a codec direction stays under KERNEL_TARGET_MBPS, by entropy stage (measured on the
# project's 2-vCPU machine kind; docs/results/codecs/ holds the runs).
LIMIT_REASONS = {
    ("ans", "decode"): "entropy stage: constriction's ANS decoder alone runs at ~25 ns per symbol "
                       "(~180 MB/s of float32 input at one symbol per entry; 256-symbol fp8 codes ~40 MB/s); "
                       "coder=zstd (fp8, m22) is the fast option",
    ("ans", "encode"): "entropy stage: constriction's ANS encoder takes ~0.1 s of the 0.22 s budget at 11M "
                       "symbols; coder=zstd (fp8, m22) is the fast option",
    ("huffman", "decode"): "entropy stage: the vectorized numpy Huffman decoder takes one table step per "
                           "<= 7 symbols per lane (Python-level steps); coder=zstd (fp8, m22) is the fast option",
    ("huffman", "encode"): "entropy stage: the vectorized numpy bit packer (64-bit OR-reduction of codewords); "
                           "coder=zstd (fp8, m22) is the fast option",
}


# Why a codec's own (non-entropy) stage can stay near the target, by codec name and direction.
CODEC_LIMIT_REASONS = {
    ("m22", "encode"): "quantizer: z = (v - mu)/sigma in float64, chunked (kept so the cell decisions match the "
                       "reference bit for bit), plus the fit and error feedback's float32 passes (~0.2 s at 11M)",
    ("qsgd", "encode"): "stochastic rounding draws 11M float32 uniforms from the tensor's seeded generator "
                        "(~0.05 s; they fix the wire bytes)",
}


def check_targets(rows: list[dict]) -> list[str]:
    notes = kernel_targets(rows)
    for r in rows:
        if r["codec"] != TARGET_CODEC:
            continue
        st = r.get("stats", {})
        gap = st.get("coded_bits_per_symbol", float("nan")) - st.get("symbol_entropy_bits", float("nan"))
        where = f"{r['data']} {r['size']:,}"
        if r["size"] >= 10_000_000:
            for kind in ("encode", "decode"):
                v = r[f"{kind}_MBps"]
                wall = r[f"{kind}_wall_MBps"]
                notes.append(
                    f"{'PASS' if v >= TARGET_MBPS else 'FAIL'} {TARGET_CODEC} {kind} {v:.0f} MB/s (CPU time; wall {wall:.0f}) "
                    f">= {TARGET_MBPS:.0f} ({where})"
                )
        notes.append(f"{'PASS' if gap <= TARGET_HUFFMAN_GAP else 'FAIL'} {TARGET_CODEC} Huffman - entropy = {gap:.3f} bit/symbol <= {TARGET_HUFFMAN_GAP} ({where})")
    return notes


def kernel_targets(rows: list[dict]) -> list[str]:
    """PASS/FAIL of every codec and direction against KERNEL_TARGET_MBPS at >= 10M entries,
    with the named reason where the entropy stage is the limit."""
    notes = []
    for r in rows:
        if r["size"] < 10_000_000 or "encode_MBps" not in r or r["codec"].startswith(("zstd-", "entropy(")):
            continue
        for kind in ("encode", "decode"):
            v = r[f"{kind}_MBps"]
            line = f"{'PASS' if v >= KERNEL_TARGET_MBPS else 'FAIL'} kernel {r['codec']} {kind} {v:.0f} MB/s >= {KERNEL_TARGET_MBPS:.0f} ({r['data']} {r['size']:,})"
            reason = LIMIT_REASONS.get((entropy_stage(r["codec"]), kind))
            own = CODEC_LIMIT_REASONS.get((r["codec"].split(":", 1)[0], kind))
            reason = "; ".join(x for x in (reason, own) if x) or None
            if v < KERNEL_TARGET_MBPS and reason:
                line += f" -- {reason}"
            notes.append(line)
    return notes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.codecs", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=DEFAULT_SIZES)
    ap.add_argument("--codecs", nargs="+", default=DEFAULT_CODECS, help="codec specs (default: a standard list)")
    ap.add_argument("--data", nargs="+", default=DEFAULT_DATA, help="gennorm<beta> and/or real")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median)")
    ap.add_argument("--json", help="write all rows and the environment here")
    args = ap.parse_args(argv)

    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    registered = set(available_codecs())
    codecs, skipped = [], []
    for spec_text in args.codecs:
        name = spec_text.split(":", 1)[0]
        (codecs if name in registered else skipped).append(spec_text)
    for spec_text in skipped:
        print(f"note: codec {spec_text!r} is not registered here; skipped", file=sys.stderr)
    if "dense" not in codecs:
        codecs.insert(0, "dense")  # ratios need it

    rows: list[dict] = []
    sources = {}
    for size in args.sizes:
        for data_name in args.data:
            x, source = make_data(data_name, size)
            sources[f"{data_name}@{size}"] = source
            print(f"# {data_name} ({source}), {size:,} entries", file=sys.stderr, flush=True)
            block = []
            for spec_text in codecs:
                try:
                    row = bench_codec(spec_text, x, args.repeats)
                except Exception as exc:  # a broken codec must not hide the others
                    print(f"note: {spec_text} failed on {data_name}: {type(exc).__name__}: {exc}", file=sys.stderr)
                    continue
                block.append(row)
            block.extend(yardsticks(x, args.repeats))
            dense = next(r for r in block if r["codec"] == "dense")
            for r in block:
                r.update(data=data_name, size=size)
                r["compression_vs_dense"] = 32.0 / r["bits_per_entry"] if r["bits_per_entry"] > 0 else None
                if "encode_s" in r:
                    r["encode_time_vs_dense"] = r["encode_s"] / dense["encode_s"]
                    r["decode_time_vs_dense"] = r["decode_s"] / dense["decode_s"]
            rows.extend(block)
            del x
    print(f"MB/s = MB of float32 input per second of CPU time (1 thread); 'wall' columns use the wall clock; "
          f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print_table(rows)
    notes = check_targets(rows)
    for note in notes:
        print(note)
    if args.json:
        env = {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "numpy": np.__version__,
            "threads": 1,
            "load_average": os.getloadavg(),
            "repeats": args.repeats,
            "skipped_codecs": skipped,
            "data_sources": sources,
        }
        with open(args.json, "w") as fh:
            json.dump({"environment": env, "rows": rows, "targets": notes}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
