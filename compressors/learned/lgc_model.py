"""The LGC autoencoder (Abrahamyan et al., 2021, seed 002) in torch.

One 1-D convolutional encoder shared by every worker and one decoder per worker
(docs/algorithms.md §3). The input is a top-k value vector of length L (the values in
increasing index order, one channel).

* Encoder: ``Conv1d`` 1→64→128→256→64 (kernel 3, stride 2, padding 1, LeakyReLU),
  then a 1×1 ``Conv1d`` 64→4 (LeakyReLU): the latent has 4 channels of length
  ``ceil(L/16)``, i.e. about L/4 numbers.
* Decoder (one per worker): ``ConvTranspose1d`` 4→32→64→128→32 (kernel 4,
  stride 2, padding 1: each doubles the length exactly), cropped to L, the
  worker's innovation concatenated as a 33rd channel, and a final 1×1
  ``Conv1d`` 33→1. [design] The paper's decoder widths are not public; these are
  those of the third-party reimplementation. The output conv starts with weight
  1 on the innovation channel (and small weights elsewhere), so an untrained
  decoder passes the innovation through. Convolutions start at unit signal
  scale (``init_unit_scale``).

The encoder travels to the workers as its float32 parameters in
``named_parameters`` order (the architecture is fixed, so nothing else is
needed); ``encoder_from_bytes`` checks the length.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

LATENT_CHANNELS = 4
ENCODER_WIDTHS = (64, 128, 256, 64)
DECODER_WIDTHS = (32, 64, 128, 32)
DOWNSAMPLE = 2 ** len(ENCODER_WIDTHS)
LEAK = 0.01


def latent_length(length: int) -> int:
    """Latent length per channel for an input of ``length`` values (ceil(L/16), 0 for 0)."""
    out = int(length)
    for _ in ENCODER_WIDTHS:
        out = (out + 1) // 2
    return out


def init_unit_scale(module: nn.Module) -> None:
    """He-normal weights for the LeakyReLU stacks, zero biases.

    [design] torch's default init shrinks the signal ~2x per layer, so the 13-layer
    path from input to output starts ~1e-4 times too small and a few tens of steps
    (a short stage 2) cannot train it. With fan-in scaled weights the activations
    keep unit scale. A transposed conv of stride s sees in_channels·kernel/s inputs.
    """
    gain = math.sqrt(2.0 / (1.0 + LEAK**2))
    for mod in module.modules():
        if isinstance(mod, nn.ConvTranspose1d):
            fan_in = mod.in_channels * mod.kernel_size[0] / mod.stride[0]
        elif isinstance(mod, nn.Conv1d):
            fan_in = mod.in_channels * mod.kernel_size[0]
        else:
            continue
        with torch.no_grad():
            mod.weight.normal_(0.0, gain / math.sqrt(fan_in))
            mod.bias.zero_()  # type: ignore[union-attr]  # built with bias=True


def make_encoder() -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 1
    for width in ENCODER_WIDTHS:
        layers += [nn.Conv1d(cin, width, kernel_size=3, stride=2, padding=1), nn.LeakyReLU(LEAK)]
        cin = width
    layers += [nn.Conv1d(cin, LATENT_CHANNELS, kernel_size=1), nn.LeakyReLU(LEAK)]
    enc = nn.Sequential(*layers)
    init_unit_scale(enc)
    return enc


class WorkerDecoder(nn.Module):
    """Transposed-conv decoder of one worker; the innovation enters before the last 1×1 conv."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = LATENT_CHANNELS
        for width in DECODER_WIDTHS:
            layers += [nn.ConvTranspose1d(cin, width, kernel_size=4, stride=2, padding=1), nn.LeakyReLU(LEAK)]
            cin = width
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv1d(cin + 1, 1, kernel_size=1)
        init_unit_scale(self.body)
        with torch.no_grad():
            self.out.weight.normal_(0.0, 0.1 / math.sqrt(cin))
            self.out.weight[0, -1, 0] = 1.0  # pass the innovation through at the start
            self.out.bias.zero_()  # type: ignore[union-attr]  # built with bias=True

    def forward(self, z: torch.Tensor, innovation: torch.Tensor) -> torch.Tensor:
        """``z``: (n, 4, ceil(L/16)); ``innovation``: (n, 1, L) -> (n, 1, L)."""
        h = self.body(z)[..., : innovation.shape[-1]]
        return self.out(torch.cat([h, innovation], dim=1))


class LGCAutoencoder(nn.Module):
    """Shared encoder plus one decoder per worker rank (added on demand)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = int(seed)
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)  # restored below: the global RNG is left as it was
        try:
            self.encoder = make_encoder()
        finally:
            torch.random.set_rng_state(gen_state)
        self.decoders = nn.ModuleDict()

    def has_decoder(self, rank: int) -> bool:
        return str(rank) in self.decoders

    def add_decoder(self, rank: int) -> WorkerDecoder:
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(self.seed * 1_000_003 + 7919 * (int(rank) + 1))
        try:
            dec = WorkerDecoder()
        finally:
            torch.random.set_rng_state(gen_state)
        self.decoders[str(rank)] = dec
        return dec

    def decoder(self, rank: int) -> WorkerDecoder:
        return self.decoders[str(rank)]  # type: ignore[return-value]  # holds WorkerDecoders only


# ---------------------------------------------------------------- numpy helpers


def encode_values(encoder: nn.Module, x: np.ndarray) -> np.ndarray:
    """Latent (4, ceil(L/16)) float32 of a value vector ``x`` (length L >= 1)."""
    with torch.no_grad():
        z = encoder(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).reshape(1, 1, -1))
    return z[0].numpy().astype(np.float32, copy=False)


def decode_values(decoder: WorkerDecoder, z: np.ndarray, innovation: np.ndarray) -> np.ndarray:
    """Reconstruction (length L) from a latent and the innovation on the same L positions."""
    with torch.no_grad():
        zt = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32)).reshape(1, LATENT_CHANNELS, -1)
        it = torch.from_numpy(np.ascontiguousarray(innovation, dtype=np.float32)).reshape(1, 1, -1)
        out = decoder(zt, it)
    return out.reshape(-1).numpy().astype(np.float32, copy=False)


def encoder_to_bytes(encoder: nn.Module) -> bytes:
    return b"".join(p.detach().numpy().astype("<f4").tobytes() for p in encoder.parameters())


def encoder_num_bytes() -> int:
    return 4 * sum(p.numel() for p in make_encoder().parameters())


def encoder_from_bytes(data: bytes) -> nn.Sequential:
    """Rebuild the encoder from its shipped weights; ValueError on a wrong length or non-finite weights."""
    enc = make_encoder()
    want = 4 * sum(p.numel() for p in enc.parameters())
    if len(data) != want:
        raise ValueError(f"encoder weights are {len(data)} bytes, the LGC encoder needs {want}")
    flat = np.frombuffer(data, dtype="<f4")
    if not np.isfinite(flat).all():
        raise ValueError("encoder weights contain NaN or Inf")
    offset = 0
    with torch.no_grad():
        for p in enc.parameters():
            n = p.numel()
            p.copy_(torch.from_numpy(flat[offset : offset + n].astype(np.float32)).reshape(p.shape))
            offset += n
    enc.eval()
    for p in enc.parameters():
        p.requires_grad_(False)
    return enc


def training_losses(
    ae: LGCAutoencoder,
    ranks: list[int],
    inputs: torch.Tensor,
    innovations: torch.Tensor,
    shared: int,
    sim_weight: float = 0.5,
    rec_weight: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, per-worker reconstruction MSE, similarity loss) of one round.

    ``inputs`` / ``innovations``: (n, 1, L), row i for worker ``ranks[i]``;
    ``shared``: the row whose code every decoder reconstructs from. Loss =
    rec_weight·Σ_i MSE(x_i, Dec_i(z_shared, innov_i)) + sim_weight·Σ_{i≠j} MSE(z_i, z_j).
    """
    z = ae.encoder(inputs)  # (n, 4, Lz)
    z_shared = z[shared : shared + 1]
    recs = []
    for i, rank in enumerate(ranks):
        out = ae.decoder(rank)(z_shared, innovations[i : i + 1])
        recs.append(F.mse_loss(out, inputs[i : i + 1]))
    rec = torch.stack(recs)
    n = z.shape[0]
    if n > 1:
        diff = z.unsqueeze(0) - z.unsqueeze(1)  # (n, n, 4, Lz); the diagonal is zero
        sim = diff.pow(2).mean(dim=(2, 3)).sum()
    else:
        sim = z.sum() * 0.0
    return rec_weight * rec.sum() + sim_weight * sim, rec.detach(), sim.detach()
