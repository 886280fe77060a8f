"""A worker never crashes on what a (broken or hostile) PS sends: it reconnects, then exits clearly."""

from __future__ import annotations

from concurrent import futures

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gradwire import protocol
from gradwire.protocol import SERVICE_NAME
from gradwire.server.servicer import parse_worker_message
from gradwire.tasks import make_task
from gradwire.v1 import exchange_pb2 as pb
from gradwire.worker.config import WorkerConfig
from gradwire.worker.loop import Worker, WorkerFailed


class UnusablePS:
    """Welcomes every worker with a model whose entries are all ``value``; counts what comes back."""

    def __init__(self, value: float):
        model = make_task("digits", None, 0, None).build_model()
        self.model = protocol.model_to_proto({n: np.full(tuple(p.shape), value, dtype=np.float32)
                                          for n, p in model.named_parameters()})
        self.sessions = 0
        self.updates = 0

    def Train(self, requests, _context):
        first = next(requests, None)
        if first is None or first.message is None:
            return
        self.sessions += 1
        yield pb.ServerMessage(welcome=pb.Welcome(
            protocol=protocol.PROTOCOL, worker_id="w0", rank=0, codec_spec="dense", round=0, total_rounds=5,
            task=pb.TaskSpec(dataset="digits", batch_size=32, num_shards=1, shard_index=0, partition="iid", seed=0),
            model=self.model, downlink_codec_spec="dense", workers=1,
        ))
        for item in requests:
            if item.message is not None and item.message.WhichOneof("body") == "update":
                self.updates += 1
            return


@pytest.mark.parametrize("value", [np.nan, 3e38])
def test_a_model_the_worker_cannot_train_on_ends_the_session_and_then_the_worker_exits_clearly(value):
    ps = UnusablePS(value)
    server = grpc.server(futures.ThreadPoolExecutor(8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {
        "Train": grpc.stream_stream_rpc_method_handler(ps.Train, request_deserializer=parse_worker_message,
                                                       response_serializer=pb.ServerMessage.SerializeToString),
    }),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        worker = Worker(WorkerConfig(server=f"127.0.0.1:{port}", worker_id="w0", connect_timeout_s=10,
                                     max_reconnects=2))
        with pytest.raises(WorkerFailed, match="gave up after 3 sessions"):
            worker.run()
        assert ps.sessions == 3
        assert ps.updates == 0  # nothing computed on that model was sent
    finally:
        server.stop(None)
