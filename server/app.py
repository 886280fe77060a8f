"""Build and run a parameter server."""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gradwire.channel import flow_control_options
from gradwire.memory import keep_large_blocks
from gradwire.protocol import SERVICE_NAME
from gradwire.server.admission import (
    StreamGate,
    default_max_streams,
    executor_threads,
    receive_limit_bytes,
    return_large_buffers_to_the_os,
)
from gradwire.server.auth import Credentials, TokenInterceptor, server_credentials
from gradwire.server.config import ServerConfig
from gradwire.server.metrics import serve_metrics
from gradwire.server.round_engine import RoundEngine
from gradwire.server.servicer import GradientExchangeServicer, generic_handler
from gradwire.server.summary import build_summary, write_summary
from gradwire.task import Task, load_task
from gradwire.threads import limit_cpu_threads

log = logging.getLogger("gradwire.server")
# gRPC answers keepalive pings so that a worker behind NAT (compose bridge) keeps
# its long-lived stream open through idle seconds of aggregation and evaluation.
KEEPALIVE_MS = 20_000


MODEL_BYTES_PER_PARAM = 4  # float32
KEEP_BLOCKS_FROM_MODEL_BYTES = 8 * 2**20  # see serve(): from here on the page faults of mmap'd blocks count


@dataclass
class RunningServer:
    server: grpc.Server
    engine: RoundEngine
    health: health.HealthServicer
    port: int
    thread: threading.Thread
    metrics_http: WSGIServer | None = None
    receive_limit: int = 0  # grpc.max_receive_message_length: admission.receive_limit_bytes

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_http.server_port if self.metrics_http is not None else None

    def summary(self) -> dict:
        return build_summary(self.engine)

    def stop(self, grace: float | None = 1.0) -> None:
        self.engine.stop()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server.stop(grace).wait()
        if self.metrics_http is not None:
            self.metrics_http.shutdown()
            self.metrics_http.server_close()


def start_server(config: ServerConfig, task: Task | None = None) -> RunningServer:
    """Build the round engine, bind, start serving and start the rounds thread."""
    if task is None:
        task = load_task(config.task_ref, config.seed, config.data_dir or None, config.model or None)
    engine = RoundEngine(config, task)
    send_limit = config.max_message_mb * 2**20
    receive_limit = receive_limit_bytes(engine.specs, engine.buffer_specs, send_limit)
    credentials = Credentials.load(config.token, config.token_file)
    gate = StreamGate(config.max_streams or default_max_streams(config.workers), config.hello_timeout_s)
    threads = executor_threads(gate.max_streams)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gradwire-rpc"),
        interceptors=[TokenInterceptor(credentials)] if credentials else [],
        maximum_concurrent_rpcs=threads,  # beyond: RESOURCE_EXHAUSTED at once, not an endless queue
        options=[
            ("grpc.max_receive_message_length", receive_limit),
            ("grpc.max_send_message_length", send_limit),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
            *flow_control_options(receive_limit),
        ],
    )
    server.add_generic_rpc_handlers((generic_handler(GradientExchangeServicer(engine, credentials, gate)),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.tls_cert:
        port = server.add_secure_port(config.address, server_credentials(config.tls_cert, config.tls_key, config.tls_ca))
    else:
        port = server.add_insecure_port(config.address)
    if port == 0:
        raise RuntimeError(f"cannot listen on {config.address}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    metrics_http = serve_metrics(engine, config.metrics_address) if config.metrics_address else None
    thread = threading.Thread(target=engine.run, name="gradwire-rounds", daemon=True)
    thread.start()
    return RunningServer(server, engine, health_servicer, port, thread, metrics_http, receive_limit)


def serve(config: ServerConfig, task: Task | None = None) -> int:
    """`gradwire server`: run until the rounds are done (or SIGTERM), write the summary."""
    limit_cpu_threads(1)
    log.info("config %s", config.to_json())
    running = start_server(config, task)
    # Two glibc policies, by model size. A large model's blocks (updates, broadcasts) are freed and
    # allocated again every round: kept in the heap, their pages stay mapped (gradwire/memory.py; a
    # fresh mmap costs ~0.5 ms of page faults per MB). A small model's blocks cost little either
    # way, and there a hostile peer's refused messages are the largest blocks the PS sees: served
    # by mmap, their memory goes back to the OS when they are freed (admission.py; `gradwire fuzz`).
    if MODEL_BYTES_PER_PARAM * running.engine.params >= KEEP_BLOCKS_FROM_MODEL_BYTES:
        keep_large_blocks()
    else:
        return_large_buffers_to_the_os()
    host = config.address.rsplit(":", 1)[0]
    print(f"listening on {host}:{running.port}", flush=True)
    log.info("largest message received: %d bytes (an honest update for this model; --max-message-mb caps it)",
             running.receive_limit)
    if running.metrics_port:
        log.info("Prometheus metrics on port %d", running.metrics_port)
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.warning("signal %d: stopping after the current round", signum)
        running.engine.stop()
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while running.thread.is_alive():
        running.thread.join(0.5)
    summary = running.summary()
    out_paths = [config.json_path]
    if config.out:
        out_paths.append(str(Path(config.out) / "summary.json"))
    write_summary(summary, *out_paths)
    log.info("summary: %s", {k: summary[k] for k in ("codec", "workers", "rounds", "final_accuracy", "final_loss", "uplink_bits_per_entry")})
    deadline = time.monotonic() + config.linger_s
    while not stop.is_set() and time.monotonic() < deadline:
        stop.wait(0.5)
    running.stop(grace=2.0)
    return 0 if summary["rounds"] > 0 else 1
