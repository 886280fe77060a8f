"""`gradwire bytes --stack`: a `docker stack deploy` stack read as a compose project is.

A fake engine stands in for the docker SDK (the real one is exercised by tests/gradwire/test_swarm.py):
containers carry the labels swarm gives a task's container, plus the compose labels the image got when
compose built it (which is what a stack's containers really carry: seen on Docker 26).
"""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from gradwire import bytes_report as br
from gradwire.bytes_report_docker import collect
from gradwire.links import profile_for_rank
from tests.gradwire.test_bytes_report import fake_summary

IMAGE_LABELS = {"com.docker.compose.project": "gradwire", "com.docker.compose.service": "ps"}


def _matches(labels: dict[str, str], filters: dict | None) -> bool:
    if not filters or "label" not in filters:
        return True
    key, _, value = filters["label"].partition("=")
    return labels.get(key) == value


class FakeContainer:
    def __init__(self, name: str, cid: str, hostname: str, status: str, labels: dict[str, str],
                 created: str = "2026-12-01T02:00:00Z", summary: dict | None = None):
        self.name, self.id, self.status, self.labels = name, cid, status, labels
        self.attrs = {"Config": {"Hostname": hostname, "Env": ["GRADWIRE_OUT=/runs"]}, "Created": created}
        self._summary = summary

    def get_archive(self, path: str):
        assert path == "/runs/summary.json"
        if self._summary is None:
            raise FileNotFoundError(path)
        data = json.dumps(self._summary).encode()
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo("summary.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        return [buf.getvalue()], {}

    def stats(self, **_):  # only running containers are asked
        raise AssertionError("stats of a stopped container")


class FakeAPI:
    def __init__(self, services: list[dict], tasks: dict[str, list[dict]], manager: bool):
        self._services, self._tasks, self._manager = services, tasks, manager

    def services(self, filters=None):
        if not self._manager:
            raise RuntimeError("This node is not a swarm manager.")
        return [s for s in self._services if _matches(s["Spec"]["Labels"], filters)]

    def tasks(self, filters=None):
        return self._tasks[filters["service"]]


class FakeContainers:
    def __init__(self, containers: list[FakeContainer]):
        self._containers = containers

    def list(self, all=False, filters=None):
        return [c for c in self._containers if _matches(c.labels, filters)]


class FakeClient:
    def __init__(self, containers: list[FakeContainer], manager: bool = True):
        self.containers = FakeContainers(containers)
        # Worker rank 1 (hostname bbbbbbbbbbbb) runs on another node: only the swarm API knows it.
        remote = {"ID": "t-remote", "Slot": 2, "Status": {"State": "complete",
                                                          "ContainerStatus": {"ContainerID": "b" * 64}},
                  "Spec": {"ContainerSpec": {"Env": ["GRADWIRE_LINK=10mbit"]}}}
        local = {"ID": "t-local", "Slot": 1, "Status": {"State": "complete",
                                                        "ContainerStatus": {"ContainerID": "a" * 64}},
                 "Spec": {"ContainerSpec": {"Env": []}}}
        ps = {"ID": "t-ps", "Slot": 1, "Status": {"State": "complete", "ContainerStatus": {"ContainerID": "e" * 64}},
              "Spec": {"ContainerSpec": {"Hostname": "ps"}}}
        labels = {"com.docker.stack.namespace": "gws"}
        self.api = FakeAPI(
            [{"ID": "s-worker", "Spec": {"Name": "gws_worker", "Labels": labels}},
             {"ID": "s-ps", "Spec": {"Name": "gws_ps", "Labels": labels}}],
            {"s-worker": [local, remote], "s-ps": [ps]}, manager)


def _stack_labels(service: str, slot: int, task: str) -> dict[str, str]:
    return {**IMAGE_LABELS, "com.docker.stack.namespace": "gws", "com.docker.swarm.service.name": f"gws_{service}",
            "com.docker.swarm.task.name": f"gws_{service}.{slot}.{task}"}


def _engine(manager: bool = True) -> FakeClient:
    old_run = fake_summary(rounds=2)
    return FakeClient([
        FakeContainer("gws_ps.1.t-ps", "e" * 64, "ps", "exited", _stack_labels("ps", 1, "t-ps"),
                      created="2026-12-01T02:10:00Z", summary=fake_summary(rounds=4)),
        # An earlier task of the same stack's PS (a stack keeps its containers): not this run.
        FakeContainer("gws_ps.1.t-old", "f" * 64, "ps", "exited", _stack_labels("ps", 1, "t-old"),
                      created="2026-12-01T01:00:00Z", summary=old_run),
        FakeContainer("gws_worker.1.t-local", "a" * 64, "aaaaaaaaaaaa", "exited", _stack_labels("worker", 1, "t-local")),
    ], manager)


def test_stack_rows_are_named_as_docker_stack_ps_names_them():
    rep = collect(_engine(), "gradwire", stack="gws")
    assert rep["stack"] == "gws" and rep["project"] is None and rep["round"] == 4  # the newest PS's run
    by_rank = {w["rank"]: w for w in rep["workers"]}
    assert sorted(by_rank) == [0, 1] and rep["distinct_ranks"]
    local, remote = by_rank[0], by_rank[1]
    assert local["name"] == "gws_worker.1" and local["state"] == "exited" and local["interface_source"] == "recorded"
    # On another node: named from the swarm API, its bytes from the counters it recorded itself.
    assert remote["name"] == "gws_worker.2" and remote["state"] == "complete"
    assert remote["interface_source"] == "recorded" and remote["interface_tx_bytes"] > remote["uplink_protobuf_bytes"]
    assert remote["link_profile"] == str(profile_for_rank("10mbit", "", 1))  # its task's GRADWIRE_LINK
    assert rep["ps"]["name"] == "gws_ps.1" and rep["ps"]["container"] == "gws_ps.1.t-ps"
    assert len(rep["workers"]) == 2  # no row for a worker container twice, none for the old PS


def test_a_project_name_with_no_compose_containers_is_read_as_a_stack():
    rep = collect(_engine(), "gws")
    assert rep["stack"] == "gws" and {w["name"] for w in rep["workers"]} == {"gws_worker.1", "gws_worker.2"}


def test_stack_containers_are_not_a_compose_project_despite_the_image_labels():
    """The image compose built carries com.docker.compose.project=gradwire: a stack's containers inherit it,
    and were once reported as compose project gradwire (with a worker as its PS)."""
    with pytest.raises(br.ReportError, match=r"no containers of compose project 'gradwire'; found stacks \(--stack\): gws"):
        collect(_engine(), "gradwire")


def test_not_a_manager_reports_the_local_containers():
    rep = collect(_engine(manager=False), "gradwire", stack="gws")
    by_rank = {w["rank"]: w for w in rep["workers"]}
    assert by_rank[0]["name"] == "gws_worker.1"
    assert by_rank[1]["container"] is None and by_rank[1]["name"] == "bbbbbbbbbbbb"  # the PS knows it: still a row


def test_cli_takes_stack(monkeypatch, capsys):
    monkeypatch.setattr(br, "docker_client", lambda: _engine())
    assert br.main(["--stack", "gws", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["stack"] == "gws" and rep["ps"]["name"] == "gws_ps.1"
    assert br.main(["--stack", "gws"]) == 0
    assert "stack gws" in capsys.readouterr().out


class _RunningPS(FakeContainer):
    """A running compose PS whose first docker-stats reading is far below its own counters."""

    def __init__(self, readings: list[dict]):
        super().__init__("gwt-ps-1", "d" * 64, "ps", "running",
                         {"com.docker.compose.project": "gwt", "com.docker.compose.service": "ps"})
        self.readings = readings

    def stats(self, **_):
        return {"networks": self.readings.pop(0)}


def test_a_ps_live_reading_below_its_own_counters_is_read_again_and_never_used(monkeypatch):
    """A container test once read 5,006 B rx (docker stats) for a PS whose Status counted 1.26 MB
    received: the report now reads again after the Status, and refuses a reading still below it."""
    import gradwire.bytes_report_docker as docker_report
    from tests.gradwire.test_bytes_report import fake_status

    status = fake_status()  # the PS's own counters: 50,000 B sent, 30,000 B received on eth0
    monkeypatch.setattr(docker_report, "_status_via_exec", lambda _c: status)
    stale, good = {"eth0": {"tx_bytes": 900, "rx_bytes": 5_006}}, {"eth0": {"tx_bytes": 50_100, "rx_bytes": 30_200}}

    ps = _RunningPS([stale, good])
    rep = collect(FakeClient([ps]), "gwt")["ps"]
    assert rep["interface_source"] == "docker-stats" and rep["interface_rx_bytes"] == 30_200 and not ps.readings

    ps = _RunningPS([stale, stale])
    rep = collect(FakeClient([ps]), "gwt")["ps"]
    assert rep["interface_source"] == "recorded" and rep["interface_rx_bytes"] == 30_000
