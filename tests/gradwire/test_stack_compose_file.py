"""docker-compose.yml deploys unchanged as a swarm stack (`docker stack deploy -c docker-compose.yml`).

Fast checks, no engine: `docker stack config` (the docker CLI's own stack loader and schema; it needs
no daemon) where the CLI has it, and the settings a stack needs read with PyYAML. The run itself is
tests/gradwire/test_swarm.py (marker `container`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
OVERRIDE = ROOT / "docker-compose.override.yml"


def _docker_cli_has(*subcommand: str) -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", *subcommand, "--help"], capture_output=True, text=True, timeout=60)
    return probe.returncode == 0


def _clean_env() -> dict[str, str]:
    # The file interpolates GRADWIRE_* from the shell: test the file, not this shell's settings.
    return {k: v for k, v in os.environ.items() if not k.startswith("GRADWIRE_")}


def _strings(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in _strings(k) + _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def test_docker_stack_config_accepts_the_compose_file():
    """Before: `services.report.depends_on must be a list`, then pull_policy, a top-level name and
    ${VAR:+...} were refused one after the other."""
    if not _docker_cli_has("stack", "config"):
        pytest.skip("this docker CLI has no `docker stack config` (Docker >= 20.10)")
    proc = subprocess.run(["docker", "stack", "config", "-c", str(COMPOSE)], cwd=ROOT, env=_clean_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "error" not in proc.stderr.lower(), proc.stderr
    assert "replicas: 3" in proc.stdout


def test_the_stack_settings_a_swarm_needs():
    yaml = pytest.importorskip("yaml")
    spec = yaml.safe_load(COMPOSE.read_text())
    # docker stack deploy interpolates only ${VAR}, ${VAR:-x}, ${VAR-x}, ${VAR:?x}, ${VAR?x}.
    assert not [s for s in _strings(spec) if "${" in s and ":+" in s]
    assert "name" not in spec, "docker stack deploy rejects a top-level name"
    services = spec["services"]
    assert set(services) == {"ps", "worker", "report"}
    for name, service in services.items():
        assert "pull_policy" not in service, f"{name}: docker stack deploy rejects pull_policy"
        # Swarm restarts a task that ends unless told not to: a run is done once, like compose's restart "no".
        assert service["deploy"]["restart_policy"]["condition"] == "none", name
        depends = service.get("depends_on", [])
        assert isinstance(depends, list), f"{name}: docker stack deploy wants depends_on as a list"
    # The report reads the PS's summary from the node-local runs volume: both on a manager.
    for name in ("ps", "report"):
        assert "node.role == manager" in services[name]["deploy"]["placement"]["constraints"], name
    assert str(services["worker"]["deploy"]["replicas"]).startswith("${GRADWIRE_WORKERS")
    # The project network is an internal overlay in a swarm: no gwbridge leg, so eth0 carries the traffic.
    assert spec["networks"]["default"]["internal"] is True
    # What the stack format refuses but `docker compose up` keeps, beside it.
    override = yaml.safe_load(OVERRIDE.read_text())
    assert override["name"] == "gradwire"
    assert override["services"]["ps"]["pull_policy"] == "build"
    assert override["services"]["worker"]["pull_policy"] == override["services"]["report"]["pull_policy"] == "never"


def test_docker_compose_still_merges_the_compose_only_settings():
    if not _docker_cli_has("compose"):
        pytest.skip("no docker compose plugin")
    proc = subprocess.run(["docker", "compose", "config", "--format", "json"], cwd=ROOT, env=_clean_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    import json

    cfg = json.loads(proc.stdout)
    assert cfg["name"] == "gradwire"
    assert cfg["services"]["ps"]["pull_policy"] == "build"
    assert cfg["services"]["worker"]["depends_on"]["ps"]["condition"] == "service_started"
    # The entry point turns a given data folder into GRADWIRE_DATA_DIR=/data; none given: unset.
    assert cfg["services"]["ps"]["environment"]["GRADWIRE_HOST_DATA_DIR"] == ""


def test_the_tls_overlay_keeps_the_compose_only_settings():
    """`-f docker-compose.yml -f docker-compose.tls.yml` skips docker-compose.override.yml: without
    its settings repeated, the TLS cluster would be named after the folder (gradwire bytes looks for
    project gradwire) and the PS would not be rebuilt from this checkout."""
    if not _docker_cli_has("compose"):
        pytest.skip("no docker compose plugin")
    import json

    files = ["-f", "docker-compose.yml", "-f", "docker-compose.tls.yml"]
    proc = subprocess.run(["docker", "compose", *files, "config", "--format", "json"], cwd=ROOT,
                          env=_clean_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads(proc.stdout)
    assert cfg["name"] == "gradwire"
    assert cfg["services"]["ps"]["pull_policy"] == "build"
    assert cfg["services"]["worker"]["pull_policy"] == cfg["services"]["report"]["pull_policy"] == "never"
    assert cfg["services"]["ps"]["environment"]["GRADWIRE_TLS_CA"] == "/etc/gradwire/tls/ca.pem"
