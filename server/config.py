"""Parameter-server configuration: flags, with GRADWIRE_* environment variables as defaults."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

from gradwire.catalog import DATASETS, MODELS
from gradwire.channel import token_from_environment
from gradwire.envvars import env
from gradwire.protocol import DEFAULT_MAX_MESSAGE_MB


def parse_batch_size(text: str | int) -> int:
    """``full`` (or 0) means the whole shard: full-batch gradient descent."""
    if isinstance(text, int):
        value = text
    elif str(text).strip().lower() == "full":
        return 0
    else:
        value = int(text)
    if value < 0:
        raise ValueError(f"batch size must be positive or 'full', got {text}")
    return value


DEFAULT_SERVER_MOMENTUM = 0.9
# The PS's per-round history keeps round numbers as int32 (server/history.py); 2^31 - 1 rounds would
# take 24 days at one round per millisecond.
MAX_ROUNDS = 2**31 - 1


def parse_momentum(text: str | float | None) -> float | None:
    """``auto`` (None): 0.9, or 0 when the codec applies momentum at the workers (DGC)."""
    if text is None or (isinstance(text, str) and text.strip().lower() in ("auto", "", "none")):
        return None
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"momentum must be in [0, 1) or 'auto', got {text}")
    return value


@dataclass(frozen=True)
class ServerConfig:
    address: str = "127.0.0.1:50051"
    workers: int = 2  # workers the PS waits for before round 0
    join_grace_s: float = 0.0  # after the minimum joined, wait for more until quiet this long
    rounds: int = 60
    codec: str = "dense"
    downlink_codec: str = "dense"  # "dense": full float32 models; else codec-encoded model deltas
    task: str = ""  # MODULE:FACTORY, file.py:FACTORY or a built-in name; "" = `dataset` (docs/tasks.md)
    dataset: str = "digits"
    model: str = ""  # "" = the dataset's default model
    data_dir: str = ""
    batch_size: int = 32  # 0 = full shard
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    seed: int = 0
    lr: float = 0.05
    momentum: float | None = None  # None = auto, see server_momentum()
    weight_decay: float = 0.0
    lr_schedule: str = "constant"  # constant | cosine | step
    local_steps: int = 1  # optimizer steps per worker per round; 1 = one gradient per round
    local_lr: float = 0.0  # the workers' local SGD learning rate when local_steps > 1; 0 = lr
    eval_every: int = 5
    target_accuracy: float = 0.0  # the summary reports the training time to reach it; 0 = none
    round_timeout_s: float = 120.0
    start_timeout_s: float = 600.0
    max_message_mb: int = DEFAULT_MAX_MESSAGE_MB
    out: str = ""  # directory for summary.json (and checkpoints)
    json_path: str = ""  # extra copy of the summary
    checkpoint_every: int = 0  # rounds between checkpoints in `out`; 0 = never
    resume: str = ""  # checkpoint file to resume from
    linger_s: float = 0.0  # keep serving Status this long after training ends
    report_timeout_s: float = 10.0
    metrics_address: str = ""  # host:port for Prometheus /metrics; "" = off
    aggregate: str = "mean"  # mean | trimmed-mean | median (server/robust.py)
    clip_multiple: float = 10.0  # bound each update's norm by this x the round's median norm; 0 = off (robust.py)
    trim_fraction: float = 0.2  # trimmed-mean: fraction dropped at each end of every coordinate
    outliers: str = "drop"  # updates above the clip norm: dropped from the round, or scaled down to it
    tls_cert: str = ""  # PEM files (server/auth.py): TLS with cert+key, mutual TLS with a CA too
    tls_key: str = ""
    tls_ca: str = ""
    token: str = ""  # shared bearer token (GRADWIRE_TOKEN); never written to logs or summaries
    token_file: str = ""  # lines worker_id:token, each token bound to its worker id
    max_streams: int = 0  # open Train streams the PS holds at most; 0 = 2 x workers + 8 (server/admission.py)
    hello_timeout_s: float = 10.0  # a stream that sends no Hello within this is cancelled

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if not 1 <= self.rounds <= MAX_ROUNDS:
            raise ValueError(f"rounds must be in [1, {MAX_ROUNDS}], got {self.rounds}")
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; available: {', '.join(DATASETS)}")
        if self.local_steps < 1:
            raise ValueError(f"local_steps must be >= 1, got {self.local_steps}")
        if self.local_lr < 0:
            raise ValueError(f"local_lr must be >= 0, got {self.local_lr}")
        user_task = bool(self.task) and self.task not in DATASETS
        if self.model and self.model not in MODELS and not user_task:
            raise ValueError(f"unknown model {self.model!r}; available: {', '.join(MODELS)}")
        if self.lr_schedule not in ("constant", "cosine", "step"):
            raise ValueError(f"lr_schedule must be constant, cosine or step, got {self.lr_schedule!r}")
        if self.partition not in ("iid", "dirichlet"):
            raise ValueError(f"partition must be iid or dirichlet, got {self.partition!r}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.eval_every}")
        if not 0.0 <= self.target_accuracy <= 1.0:
            raise ValueError(f"target_accuracy must be in [0, 1] (0: none), got {self.target_accuracy}")
        if self.max_streams < 0 or self.hello_timeout_s <= 0:
            raise ValueError("max_streams must be >= 0 and hello_timeout_s > 0")
        if self.max_message_mb < 1:
            raise ValueError(f"max_message_mb must be >= 1, got {self.max_message_mb}")
        parse_momentum(self.momentum)
        from gradwire.server.robust import check_robust_options

        check_robust_options(self.aggregate, self.clip_multiple, self.trim_fraction, self.outliers)
        from gradwire.server.auth import check_metrics_address, check_server_auth_options

        check_server_auth_options(self.tls_cert, self.tls_key, self.tls_ca)
        check_metrics_address(self.metrics_address, bool(self.tls_ca or self.token or self.token_file))
        from gradwire.compressors.registry import create_codec

        create_codec(self.codec)  # fail at startup, with the registry's reason
        from gradwire.downlink import check_downlink_codec

        check_downlink_codec(self.downlink_codec)

    @property
    def task_ref(self) -> str:
        """The task every process resolves (gradwire.task.load_task)."""
        return self.task or self.dataset

    @property
    def effective_local_lr(self) -> float:
        return self.local_lr or self.lr

    def server_momentum(self, worker_momentum: float) -> float:
        """The PS's heavy-ball momentum: as given, or by default 0.9 unless the workers apply it."""
        if self.momentum is not None:
            return self.momentum
        return 0.0 if worker_momentum else DEFAULT_SERVER_MOMENTUM

    def to_json(self) -> str:
        fields = asdict(self)
        fields["token"] = "(set)" if self.token else ""  # a secret: never in logs or summaries
        return json.dumps(fields, sort_keys=True)


def _defaults() -> argparse.Namespace:
    # Field defaults without building a ServerConfig: validation would load every
    # codec (and torch), which `gradwire health` must not wait for.
    return argparse.Namespace(**{k: f.default for k, f in ServerConfig.__dataclass_fields__.items()})


def add_task_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by `gradwire server` and `gradwire simulate`."""
    d = _defaults()
    p.add_argument("--rounds", type=int, default=env("ROUNDS", d.rounds))
    p.add_argument("--codec", default=env("CODEC", d.codec), help="codec spec, e.g. huffman:bits=4")
    p.add_argument("--downlink-codec", default=env("DOWNLINK_CODEC", d.downlink_codec),
                   help="codec of the PS's broadcast: dense (full models) or a spec for model deltas, e.g. fp16")
    p.add_argument("--task", default=env("TASK", d.task),
                   help="your task: MODULE:FACTORY or path/file.py:FACTORY returning a gradwire.Task, or a "
                        f"built-in ({', '.join(DATASETS)}); see docs/tasks.md")
    p.add_argument("--dataset", default=env("DATASET", d.dataset), choices=DATASETS)
    p.add_argument("--model", default=env("MODEL", d.model), help=f"one of {', '.join(MODELS)} (default: per dataset)")
    p.add_argument("--data-dir", default=env("DATA_DIR", d.data_dir), help="folder with MNIST/CIFAR files")
    p.add_argument("--batch-size", type=parse_batch_size, default=env("BATCH_SIZE", str(d.batch_size)),
                   help="per-worker mini-batch, or 'full' for the whole shard")
    p.add_argument("--partition", default=env("PARTITION", d.partition), choices=("iid", "dirichlet"))
    p.add_argument("--dirichlet-alpha", type=float, default=env("DIRICHLET_ALPHA", d.dirichlet_alpha))
    p.add_argument("--seed", type=int, default=env("SEED", d.seed))
    p.add_argument("--lr", type=float, default=env("LR", d.lr))
    p.add_argument("--momentum", type=parse_momentum, default=env("MOMENTUM", "auto"),
                   help="PS heavy-ball momentum, or 'auto': 0.9, or 0 when the codec applies momentum "
                        "at the workers (e.g. topk:momentum=0.9)")
    p.add_argument("--weight-decay", type=float, default=env("WEIGHT_DECAY", d.weight_decay))
    p.add_argument("--lr-schedule", default=env("LR_SCHEDULE", d.lr_schedule), choices=("constant", "cosine", "step"))
    p.add_argument("--local-steps", type=int, default=env("LOCAL_STEPS", d.local_steps),
                   help="optimizer steps per worker between uploads; the update is the model delta / local lr")
    p.add_argument("--local-lr", type=float, default=env("LOCAL_LR", d.local_lr),
                   help="the workers' SGD learning rate for --local-steps > 1 (default: --lr)")
    p.add_argument("--eval-every", type=int, default=env("EVAL_EVERY", d.eval_every))
    p.add_argument("--target-accuracy", type=float, default=env("TARGET_ACCURACY", d.target_accuracy),
                   help="report the training time (wall clock, evaluations excluded) to reach this test accuracy")
    p.add_argument("--round-timeout-s", type=float, default=env("ROUND_TIMEOUT_S", d.round_timeout_s))
    p.add_argument("--max-message-mb", type=int, default=env("MAX_MESSAGE_MB", d.max_message_mb))
    p.add_argument("--aggregate", default=env("AGGREGATE", d.aggregate), choices=("mean", "trimmed-mean", "median"),
                   help="how the PS combines the round's updates (coordinate-wise for trimmed-mean and median)")
    p.add_argument("--clip-multiple", type=float, default=env("CLIP_MULTIPLE", d.clip_multiple),
                   help="clip each update's L2 norm to this multiple of the round's median norm (0: off)")
    p.add_argument("--outliers", default=env("OUTLIERS", d.outliers), choices=("scale", "drop"),
                   help="an update above the clip norm is dropped from the round (default) or scaled down to it")
    p.add_argument("--trim-fraction", type=float, default=env("TRIM_FRACTION", d.trim_fraction),
                   help="trimmed-mean: fraction of the workers dropped at each end of every coordinate")


def add_server_flags(p: argparse.ArgumentParser) -> None:
    d = _defaults()
    p.add_argument("--address", default=env("ADDRESS", d.address), help="host:port to listen on (port 0: any free)")
    p.add_argument("--workers", type=int, default=env("WORKERS", d.workers), help="workers to wait for before round 0")
    p.add_argument("--join-grace-s", type=float, default=env("JOIN_GRACE_S", d.join_grace_s),
                   help="after the minimum joined, start once no new worker joined for this long")
    p.add_argument("--start-timeout-s", type=float, default=env("START_TIMEOUT_S", d.start_timeout_s))
    add_task_flags(p)
    p.add_argument("--out", default=env("OUT", d.out), help="directory for summary.json and checkpoints")
    p.add_argument("--json", dest="json_path", default=env("JSON", d.json_path), help="also write the summary here")
    p.add_argument("--checkpoint-every", type=int, default=env("CHECKPOINT_EVERY", d.checkpoint_every))
    p.add_argument("--resume", default=env("RESUME", d.resume), help="checkpoint file to resume from")
    p.add_argument("--linger-s", type=float, default=env("LINGER_S", d.linger_s),
                   help="keep serving Status this long after training ends")
    p.add_argument("--metrics-address", default=env("METRICS_ADDRESS", d.metrics_address),
                   help="host:port to serve Prometheus metrics on (off when empty)")
    p.add_argument("--tls-cert", default=env("TLS_CERT", d.tls_cert), help="PEM certificate: serve TLS")
    p.add_argument("--tls-key", default=env("TLS_KEY", d.tls_key), help="PEM private key of --tls-cert")
    p.add_argument("--tls-ca", default=env("TLS_CA", d.tls_ca), help="PEM CA: require client certificates (mTLS)")
    p.add_argument("--token-file", default=env("TOKEN_FILE", d.token_file),
                   help="lines worker_id:token; each token admits (only) its worker id")
    p.add_argument("--max-streams", type=int, default=env("MAX_STREAMS", d.max_streams),
                   help="Train streams held at most (0: 2 x workers + 8); more are refused RESOURCE_EXHAUSTED")
    p.add_argument("--hello-timeout-s", type=float, default=env("HELLO_TIMEOUT_S", d.hello_timeout_s),
                   help="cancel a stream that sends no Hello within this")
    # GRADWIRE_TOKEN or GRADWIRE_TOKEN_FROM (a file) only: a flag would show in `ps`
    p.set_defaults(token=token_from_environment(d.token))


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    fields = ServerConfig.__dataclass_fields__
    return ServerConfig(**{k: v for k, v in vars(args).items() if k in fields})
