"""End to end on Docker Swarm: docker-compose.yml deployed unchanged as a stack, 3 workers, `gradwire bytes --stack`.

On one node: the engine is made a single-node swarm only if it is not in one already (advertising and
listening on 127.0.0.1 only), and leaves it again afterwards (removing the docker_gwbridge network
that swarm mode created). The stack trains a few rounds with 3 worker replicas over the stack's
overlay network; then `gradwire bytes --stack NAME --json` must report 3 workers with distinct ranks,
every round done, each worker's interface counting at least its protobuf bytes (and at most the
allowance above them), and the `report` service must have printed the table. Then `docker stack rm`.

Needs a Docker engine (see tests/gradwire/test_containers.py: skipped only where none answers, failed
instead with GRADWIRE_REQUIRE_CONTAINERS=1) and the gradwire image (built by its `image` fixture).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.gradwire.test_containers import (  # noqa: F401 - engine and image are fixtures used below
    IMAGE,
    PER_CONNECTION_BYTES,
    PER_MESSAGE_BYTES,
    RELATIVE,
    _cluster_env,
    _run,
    engine,
    image,
)

pytestmark = [pytest.mark.container, pytest.mark.slow]

WORKERS = 3
ROUNDS = 4
TIMEOUT_S = 600


def _swarm_state() -> tuple[str, bool]:
    out = subprocess.run(["docker", "info", "--format", "{{.Swarm.LocalNodeState}} {{.Swarm.ControlAvailable}}"],
                         capture_output=True, text=True, timeout=60).stdout.split()
    return (out[0], out[1] == "true") if len(out) == 2 else ("unknown", False)


def _network_exists(name: str) -> bool:
    return subprocess.run(["docker", "network", "inspect", name], capture_output=True, timeout=60).returncode == 0


@pytest.fixture(scope="module")
def swarm(image):  # noqa: F811 - the fixture imported above
    """A swarm manager to deploy on: this engine's swarm, or a single-node one made for the test."""
    state, manager = _swarm_state()
    created = False
    gwbridge_before = _network_exists("docker_gwbridge")
    if state == "inactive":
        # Loopback only: a one-node swarm needs no other address, and nothing outside can join it.
        proc = subprocess.run(["docker", "swarm", "init", "--advertise-addr", "127.0.0.1",
                               "--listen-addr", "127.0.0.1:2377"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"docker swarm init failed: {proc.stderr}"
        created = True
    elif state != "active" or not manager:
        pytest.fail(f"this engine's swarm state is {state!r} (manager: {manager}): a stack needs a manager")
    try:
        yield
    finally:
        if created:
            subprocess.run(["docker", "swarm", "leave", "--force"], capture_output=True, timeout=120)
            if not gwbridge_before:
                subprocess.run(["docker", "network", "rm", "docker_gwbridge"], capture_output=True, timeout=60)


def _stack_containers(stack: str) -> list[str]:
    out = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=com.docker.stack.namespace={stack}"],
                         capture_output=True, text=True, timeout=60).stdout
    return out.split()


def _remove_stack(stack: str, env: dict[str, str]) -> None:
    _run(["docker", "stack", "rm", stack], env, timeout=120, check=False)
    # docker stack rm returns before the tasks' containers and the network are gone, and keeps the volume.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (_stack_containers(stack) or _network_exists(f"{stack}_default")):
        time.sleep(1)
    _run(["docker", "volume", "rm", f"{stack}_runs"], env, timeout=60, check=False)


@pytest.fixture(scope="module")
def stack(swarm):
    name = f"gws{os.getpid()}"
    env = _cluster_env()
    env.update({
        "GRADWIRE_IMAGE": IMAGE, "GRADWIRE_WORKERS": str(WORKERS), "GRADWIRE_ROUNDS": str(ROUNDS),
        "GRADWIRE_CODEC": "dense", "GRADWIRE_EVAL_EVERY": "1", "GRADWIRE_JOIN_GRACE_S": "3", "GRADWIRE_LINGER_S": "2",
    })
    t0 = time.monotonic()
    try:
        _run(["docker", "stack", "deploy", "-c", "docker-compose.yml", name], env, timeout=120)
        yield name, env, t0
    finally:
        _remove_stack(name, env)


def _bytes_json(stack: str, env: dict[str, str]) -> dict | None:
    proc = _run([sys.executable, "-m", "gradwire.cli", "bytes", "--json", "--stack", stack], env, timeout=120,
                check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def test_stack_from_the_compose_file_trains_3_workers_and_gradwire_bytes_reports_it(stack):
    name, env, t0 = stack
    deadline = time.monotonic() + TIMEOUT_S
    rep = None
    while time.monotonic() < deadline:
        rep = _bytes_json(name, env)
        # Done: the PS has stopped (its summary is read out of its container) and every worker reported.
        if rep is not None and rep["finished"] and rep["source"] == "summary" and rep["ps"]["state"] == "exited":
            break
        time.sleep(3)
    tasks = _run(["docker", "stack", "ps", name, "--no-trunc", "--format", "{{.Name}} {{.CurrentState}} {{.Error}}"],
                 env, check=False).stdout
    assert rep is not None and rep["finished"] and rep["source"] == "summary", (
        f"the stack did not finish within {TIMEOUT_S} s\n{tasks}\n"
        + _run(["docker", "service", "logs", "--tail", "30", f"{name}_ps"], env, check=False).stdout[-3000:])
    print(f"\nstack {name}: {ROUNDS} rounds with {WORKERS} workers in {time.monotonic() - t0:.0f} s "
          f"(from deploy), accuracy {rep['final_accuracy']:.4f}", file=sys.stderr)

    assert rep["stack"] == name and rep["round"] == rep["total_rounds"] == ROUNDS
    workers = [w for w in rep["workers"] if w["rank"] is not None]
    assert len(workers) == WORKERS and rep["distinct_ranks"]
    assert sorted(w["rank"] for w in workers) == list(range(WORKERS))
    # Named as `docker stack ps` names them, one per replica slot.
    assert sorted(w["name"] for w in workers) == [f"{name}_worker.{slot}" for slot in range(1, WORKERS + 1)]
    assert rep["ps"]["name"] == f"{name}_ps.1"
    for w in workers:
        assert w["rounds"] == ROUNDS and w["state"] == "exited", w
        # The overlay network is the container's eth0 (an internal network: no docker_gwbridge leg).
        assert w["interface"] == "eth0" and w["interface_source"] == "recorded"
        protobuf = w["uplink_protobuf_bytes"]
        bound = protobuf * (1 + RELATIVE) + PER_MESSAGE_BYTES * (w["rounds"] + 2) + PER_CONNECTION_BYTES
        assert protobuf <= w["interface_tx_bytes"] <= bound, w
        assert w["downlink_message_bytes"] <= w["interface_rx_bytes"], w
        assert w["uplink_within_allowance"] is True
        print(f"  {w['name']} rank {w['rank']}: protobuf {protobuf} B, interface tx {w['interface_tx_bytes']} B",
              file=sys.stderr)
    ps = rep["ps"]
    assert ps["interface_rx_bytes"] >= ps["uplink_message_bytes"] and ps["interface_tx_bytes"] >= ps["downlink_message_bytes"]
    assert 0.0 <= rep["final_accuracy"] <= 1.0

    # Every task ran once and ended (restart_policy none), the report service included.
    states = dict(line.split(" ", 1) for line in tasks.strip().splitlines())
    assert all(state.startswith("Complete") for state in states.values()), tasks
    assert sorted(states) == sorted([f"{name}_ps.1", f"{name}_report.1"]
                                    + [f"{name}_worker.{slot}" for slot in range(1, WORKERS + 1)]), tasks
    # One network per service, the stack's overlay: no second leg (docker_gwbridge, ingress) whose
    # counters could carry the gRPC traffic instead of the eth0 the processes record.
    for service in ("ps", "worker"):
        spec = json.loads(_run(["docker", "service", "inspect", f"{name}_{service}"], env).stdout)[0]["Spec"]
        networks = (spec.get("TaskTemplate") or {}).get("Networks") or spec.get("Networks") or []
        assert len(networks) == 1 and not spec.get("EndpointSpec", {}).get("Ports"), spec
    report_log = _run(["docker", "service", "logs", "--raw", f"{name}_report"], env).stdout
    assert "gradwire bytes" in report_log and "(PS)" in report_log, report_log[-2000:]
