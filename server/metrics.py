"""Prometheus metrics of a running PS, read from the round engine's ledger at scrape time.

Reading the ledger (rather than keeping a second set of counters) means the
metrics can never disagree with `Status` and the run summary.
"""

from __future__ import annotations

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import CollectorRegistry

from gradwire.counters import WorkerCounters


class LedgerCollector:
    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        snap = self.engine.snapshot()
        yield GaugeMetricFamily("gradwire_round", "Current round of the parameter server", value=snap.round)
        for key, doc in WorkerCounters.docs().items():
            fam = CounterMetricFamily(f"gradwire_worker_{key}", doc, labels=["worker_id", "rank"])
            for r in snap.records:
                fam.add_metric([r.worker_id, str(r.rank)], getattr(r.counters, key))
            yield fam
        connected = GaugeMetricFamily("gradwire_workers_connected", "Workers with an open stream")
        connected.add_metric([], sum(1 for r in snap.records if r.connected))
        yield connected
        evaluated = [e for e in snap.rounds if e.test_loss is not None]
        if evaluated:
            last = evaluated[-1]
            yield GaugeMetricFamily("gradwire_test_loss", "Test loss at the last evaluation", value=last.test_loss)
            if last.test_accuracy is not None:
                yield GaugeMetricFamily("gradwire_test_accuracy", "Test accuracy at the last evaluation", value=last.test_accuracy)


def serve_metrics(engine, address: str):
    """Serve /metrics on host:port (port 0: any free one); returns the HTTP server."""
    host, _, port = address.rpartition(":")
    registry = CollectorRegistry()
    registry.register(LedgerCollector(engine))
    server, _thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=registry)
    return server
