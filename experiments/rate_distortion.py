"""Rate–distortion of every codec on real gradients of the reference workload.

    python -m experiments.rate_distortion --out docs/results/rate_distortion     # a few minutes

1. **Capture.** Trains the reference model (Fashion-MNIST, LeNet-5, seed 0) in this process with
   SGD (lr 0.05, momentum 0.9, mini-batches of 32, what one worker of ``gradwire simulate`` does
   with the PS's defaults) for ``--warm`` steps, then keeps the next ``--window`` consecutive
   mini-batch gradients (float32, flattened per tensor as the worker hands them to its codec).
2. **Rate and distortion.** For every codec spec of ``FAMILIES``, each captured gradient ``g`` is
   encoded with ``compressors.update.UpdateEncoder`` (the worker's layer) and decoded with
   ``UpdateDecoder`` (the PS's), giving

   - bits per entry = 8 · Σ ``Encoded.payload_bytes`` / entries (side information included), and
   - normalized error = ‖g − ĝ‖² / ‖g‖² of the decoded ĝ,

   averaged over the captured gradients. Stateless codecs see each gradient with a fresh encoder.
   Codecs with error feedback (``topk``, ``randk``, ``sign``, ``powersgd``, ``m22``, EF variants) are
   also measured with a fresh encoder per gradient: the first-round error, i.e. the compressor's own
   distortion, before any memory carries it to a later round (with feedback the later rounds' ĝ is
   not an estimate of that round's g alone, so its distance to g measures something else).
   Predictive codecs (``tpc``, ``lag``) are meaningless on one fresh gradient (their first round is
   a full update), so they are run closed-loop over the window's consecutive gradients with one
   encoder and decoder, skipping the first ``order`` rounds, and the figure is the mean over the rest.
   ``lgc`` is not measured: its first stages send dense gradients and its autoencoder needs the PS's
   training stage, which an offline capture does not reproduce.
3. **Huffman/ANS models** (seed 001's claim): for the same quantizer (``bits`` 3, 4, 5) the coded bits
   per symbol of each probability model (``gennorm``, ``zgennorm``, ``normal``, ``empirical``) against
   the empirical entropy of the very same symbols (the codec's ``symbol_entropy_bits`` statistic).

Writes ``results.json``, ``table.md``, ``rd.png`` (error against bits per entry, log–log, one line per
family) and ``huffman_models.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from gradwire.compressors.base import RoundContext
from gradwire.compressors.registry import create_codec
from gradwire.compressors.update import UpdateDecoder, UpdateEncoder
from gradwire.tasks import make_task, tensor_specs

FAMILIES: dict[str, list[str]] = {
    "dense / fp16 / bf16": ["dense", "fp16", "bf16"],
    "fp8": ["fp8:format=143", "fp8:format=152", "fp8:format=143,coder=ans", "fp8:format=152,coder=ans"],
    "ans (empirical)": [f"ans:bits={b}" for b in (2, 3, 4, 5, 6, 8)],
    "huffman (zgennorm)": [f"huffman:bits={b}" for b in (2, 3, 4, 5, 6, 8)],
    "qsgd": [f"qsgd:levels={v}" for v in (2, 4, 16, 64, 256)],
    "topk": [f"topk:ratio={r}" for r in (0.001, 0.01, 0.05, 0.1, 0.3)],
    "topk fp16 values": [f"topk:ratio={r},values=fp16" for r in (0.01, 0.05, 0.1, 0.3)],
    "randk": [f"randk:ratio={r}" for r in (0.01, 0.1, 0.3)],
    "sign": ["sign"],
    "powersgd": [f"powersgd:rank={r}" for r in (1, 2, 4, 8)],
    "m22 M=2": [f"m22:bits={b},M=2,dist=gennorm" for b in (1, 2, 3)],
    "m22 M=0": [f"m22:bits={b},M=0,dist=gennorm" for b in (1, 2, 3)],
    "tpc (closed loop)": ["tpc", "tpc:order=1", "tpc:residual=(ans:bits=4)", "tpc:trigger=always,residual=(ans:bits=4)"],
    "lag (closed loop)": ["lag:trigger=relative,eps=0.7,max_stale=2,residual=fp16,check=2",
                          "lag:trigger=always,residual=(ans:bits=4)"],
}
PREDICTIVE = ("tpc", "lag")
# Families whose points are not one swept setting of one codec: drawn as markers, not joined by a line.
UNORDERED = ("dense / fp16 / bf16", "fp8", "sign", "tpc (closed loop)", "lag (closed loop)")
HUFFMAN_MODELS = ("gennorm", "zgennorm", "normal", "empirical")


def capture(dataset: str, model_name: str, seed: int, warm: int, window: int, lr: float,
            batch: int) -> tuple[list, list[dict[str, np.ndarray]]]:
    """The model's tensor specs and ``window`` consecutive mini-batch gradients after ``warm`` SGD steps."""
    task = make_task(dataset, model_name, seed)
    torch.manual_seed(seed)
    model = task.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    rng = np.random.default_rng(seed)
    x_all, y_all = task.dataset.train_x, task.dataset.train_y
    grads: list[dict[str, np.ndarray]] = []
    for step in range(warm + window):
        idx = rng.choice(len(x_all), size=batch, replace=False)
        x, y = torch.from_numpy(x_all[idx]), torch.from_numpy(y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss = task.loss_fn(model(x), y)
        loss.backward()
        if step >= warm:
            grads.append({n: p.grad.detach().numpy().astype(np.float32).copy() for n, p in model.named_parameters()})
        opt.step()
    return tensor_specs(model), grads


def _flat(g: dict[str, np.ndarray], specs) -> np.ndarray:
    return np.concatenate([g[s.name].reshape(-1) for s in specs]).astype(np.float64)


def measure(spec_text: str, specs, grads: list[dict[str, np.ndarray]]) -> dict:
    """Mean bits per entry and normalized error of one codec over the captured gradients."""
    codec = create_codec(spec_text)
    entries = sum(s.numel for s in specs)
    predictive = spec_text.split(":")[0] in PREDICTIVE
    bits, errors, stats = [], [], {}
    if predictive:
        enc, dec = UpdateEncoder(codec, specs), UpdateDecoder(codec, specs, codec.make_cross_worker_state())
        skip = int(getattr(codec, "order", 1) or 1)
        if len(grads) <= skip:
            raise ValueError(f"{spec_text}: a closed-loop measurement needs more than {skip} gradients, got {len(grads)}")
        for t, g in enumerate(grads):
            ctx = RoundContext(round=t, rank=0, seed=0, num_workers=1)
            msgs = enc.encode(g, ctx)
            ghat = dec.decode(msgs, ctx)
            if t >= skip:
                bits.append(8.0 * sum(m.payload_bytes for m in msgs) / entries)
                ref = _flat(g, specs)
                errors.append(float(np.sum((ref - _flat(ghat, specs)) ** 2) / np.sum(ref ** 2)))
        stats = enc.stats()
    else:
        for t, g in enumerate(grads):
            enc, dec = UpdateEncoder(codec, specs), UpdateDecoder(codec, specs, codec.make_cross_worker_state())
            ctx = RoundContext(round=0, rank=0, seed=t, num_workers=1)
            msgs = enc.encode(g, ctx)
            ghat = dec.decode(msgs, ctx)
            bits.append(8.0 * sum(m.payload_bytes for m in msgs) / entries)
            ref = _flat(g, specs)
            errors.append(float(np.sum((ref - _flat(ghat, specs)) ** 2) / np.sum(ref ** 2)))
    return {"spec": spec_text, "mode": "closed loop" if predictive else "fresh encoder per gradient",
            "bits_per_entry": float(np.mean(bits)), "normalized_error": float(np.mean(errors)),
            "normalized_error_min": float(np.min(errors)), "normalized_error_max": float(np.max(errors)),
            "gradients": len(errors), "stats": {k: float(v) for k, v in stats.items()}}


def huffman_models(specs, grads: list[dict[str, np.ndarray]], bits_list=(3, 4, 5)) -> list[dict]:
    """Coded bits per symbol of each probability model against the entropy of the same symbols."""
    rows = []
    for coder in ("huffman", "ans"):
        for b in bits_list:
            for model in HUFFMAN_MODELS:
                codec = create_codec(f"{coder}:bits={b},model={model}")
                enc = UpdateEncoder(codec, specs)
                for t, g in enumerate(grads):
                    enc.encode(g, RoundContext(round=t, rank=0, seed=0, num_workers=1))
                s = enc.stats()
                rows.append({
                    "coder": coder, "bits": b, "model": model,
                    "coded_bits_per_symbol": s.get("coded_bits_per_symbol"),
                    "symbol_entropy_bits": s.get("symbol_entropy_bits"),
                    "model_cross_entropy_bits": s.get("model_cross_entropy_bits"),
                    "bits_per_entry": s.get("bits_per_entry"),
                    "side_info_bits_per_entry": s.get("side_info_bits_per_entry"),
                    "raw_fraction": s.get("raw_fraction"),
                })
    return rows


def rd_table(points: list[dict]) -> str:
    lines = ["| family | codec | bits/entry | normalized error ‖g−ĝ‖²/‖g‖² (mean; min–max) | mode |",
             "|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p['family']} | `{p['spec']}` | {p['bits_per_entry']:.3f} | {p['normalized_error']:.4g} "
                     f"({p['normalized_error_min']:.3g}–{p['normalized_error_max']:.3g}) | {p['mode']} |")
    return "\n".join(lines) + "\n"


def huffman_table(rows: list[dict]) -> str:
    lines = ["| coder | bits | model | coded bits/symbol | entropy of the same symbols | excess over entropy "
             "| model cross-entropy | payload bits/entry |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        coded, ent = r["coded_bits_per_symbol"], r["symbol_entropy_bits"]
        excess = f"{coded - ent:+.4f} ({100 * (coded / ent - 1):+.2f} %)" if coded and ent else "–"
        ce = r["model_cross_entropy_bits"]
        lines.append(f"| {r['coder']} | {r['bits']} | {r['model']} | {coded:.4f} | {ent:.4f} | {excess} "
                     f"| {'–' if ce is None else format(ce, '.4f')} | {r['bits_per_entry']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6.5))
    cmap = plt.get_cmap("tab20")
    families = list(dict.fromkeys(p["family"] for p in points))
    for i, fam in enumerate(families):
        # A lossless point (dense: error 0) has no place on a log axis; the table lists it.
        pts = sorted((p for p in points if p["family"] == fam and p["normalized_error"] > 0),
                     key=lambda p: p["bits_per_entry"])
        if not pts:
            continue
        ax.plot([p["bits_per_entry"] for p in pts], [p["normalized_error"] for p in pts], marker="o", ms=4,
                lw=0 if fam in UNORDERED else 1.3, color=cmap(i % 20), label=fam)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bits per entry (8 × payload bytes / entries, side information included)")
    ax.set_ylabel("normalized error ‖g − ĝ‖² / ‖g‖²")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.rate_distortion", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/rate_distortion")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--model", default="lenet5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warm", type=int, default=50, help="SGD steps before the capture")
    p.add_argument("--window", type=int, default=12, help="consecutive gradients captured")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--families", default="", help="comma-separated family names (default: all)")
    p.add_argument("--plot-only", action="store_true", help="redraw rd.png from --out/results.json")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        saved = json.loads((out / "results.json").read_text())
        plot(saved["points"], out / "rd.png", saved["title"])
        return 0
    start = time.perf_counter()
    specs, grads = capture(args.dataset, args.model, args.seed, args.warm, args.window, args.lr, args.batch)
    entries = sum(s.numel for s in specs)
    print(f"[rd] captured {len(grads)} gradients of {entries} entries in {time.perf_counter() - start:.0f} s", flush=True)
    wanted = [f.strip() for f in args.families.split(",") if f.strip()] or list(FAMILIES)
    points = []
    for fam in wanted:
        for spec in FAMILIES[fam]:
            t0 = time.perf_counter()
            point = {"family": fam, **measure(spec, specs, grads)}
            points.append(point)
            print(f"[rd] {spec}: {point['bits_per_entry']:.3f} bits/entry, error {point['normalized_error']:.4g} "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
    hm = huffman_models(specs, grads)
    title = (f"{args.dataset} {args.model} ({entries} parameters): {len(grads)} consecutive mini-batch gradients "
             f"after {args.warm} SGD steps, seed {args.seed}")
    result = {"config": vars(args), "title": title, "entries": entries, "points": points, "huffman_models": hm,
              "elapsed_s": time.perf_counter() - start}
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "table.md").write_text(title + "\n\n" + rd_table(points))
    (out / "huffman_models.md").write_text(title + "\n\n" + huffman_table(hm))
    plot(points, out / "rd.png", title)
    print(rd_table(points))
    print(huffman_table(hm))
    print(f"[rd] done in {time.perf_counter() - start:.0f} s; wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
