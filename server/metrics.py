"""Prometheus metrics of a running PS, read from the coordinator's ledger at scrape time.

Reading the ledger (rather than keeping a second set of counters) means the
metrics can never disagree with `Status` and the run summary.
"""

from __future__ import annotations

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import CollectorRegistry


class LedgerCollector:
    def __init__(self, coordinator):
        self.coord = coordinator

    def collect(self):
        snap = self.coord.snapshot()
        yield GaugeMetricFamily("gradwire_round", "Current round of the parameter server", value=snap["round"])
        counters = {
            "uplink_payload_bytes": "Codec payload bytes received (what the codec claims to send)",
            "uplink_message_bytes": "Serialized protobuf bytes of update messages received",
            "downlink_message_bytes": "Serialized protobuf bytes sent to the worker",
            "downlink_payload_bytes": "Model payload bytes sent to the worker (float32 models or downlink-codec deltas)",
            "rejected_messages": "Messages refused with a gRPC status",
            "rounds_aggregated": "Rounds in which the worker's update was aggregated",
        }
        for key, doc in counters.items():
            fam = CounterMetricFamily(f"gradwire_worker_{key}", doc, labels=["worker_id", "rank"])
            for r in snap["records"]:
                fam.add_metric([r["worker_id"], str(r["rank"])], r[key])
            yield fam
        connected = GaugeMetricFamily("gradwire_workers_connected", "Workers with an open stream")
        connected.add_metric([], sum(1 for r in snap["records"] if r["connected"]))
        yield connected
        evaluated = [e for e in snap["rounds_log"] if e.get("test_loss") is not None]
        if evaluated:
            last = evaluated[-1]
            yield GaugeMetricFamily("gradwire_test_loss", "Test loss at the last evaluation", value=last["test_loss"])
            if last.get("test_accuracy") is not None:
                yield GaugeMetricFamily("gradwire_test_accuracy", "Test accuracy at the last evaluation", value=last["test_accuracy"])


def serve_metrics(coordinator, address: str):
    """Serve /metrics on host:port (port 0: any free one); returns the HTTP server."""
    host, _, port = address.rpartition(":")
    registry = CollectorRegistry()
    registry.register(LedgerCollector(coordinator))
    server, _thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=registry)
    return server
