"""`gradwire bytes`, Docker: a compose project's or swarm stack's containers, live counters, Status and summary.

Part of the bytes report (``gradwire bytes``, docs/algorithms.md §6; overview in
``gradwire/bytes_report.py``). Through the docker SDK: lists the project's containers (or a
``docker stack deploy`` stack's: its tasks' containers on this node, and on a manager its tasks on
other nodes), reads each running local container's interface counters (``docker stats``), fetches
the PS's Status from inside the PS container over its loopback, else copies its summary.json out,
and builds the report (``collect``).
"""

from __future__ import annotations

import io
import json
import tarfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gradwire.bytes_report_model import (
    DEFAULT_PS_SERVICE,
    DEFAULT_WORKER_SERVICE,
    ContainerInfo,
    build_report,
    counters_below,
)
from gradwire.bytes_report_run import ReportError, json_int, run_from_status, run_from_summary

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
NUMBER_LABEL = "com.docker.compose.container-number"
DEFAULT_PROJECT = "gradwire"
DEFAULT_PORT = 50051
# docker stack deploy: every task's container carries its stack and service (STACK_SERVICE), and
# its task name STACK_SERVICE.SLOT.TASKID. Its compose labels, if any, are the image's (compose
# labels the images it builds), so they say nothing about the container.
STACK_LABEL = "com.docker.stack.namespace"
SWARM_SERVICE_LABEL = "com.docker.swarm.service.name"
SWARM_TASK_NAME_LABEL = "com.docker.swarm.task.name"


def docker_client():
    try:
        import docker
    except ImportError as e:  # pragma: no cover - docker is a dependency
        raise ReportError("the docker Python package is missing: pip install docker") from e
    try:
        client = docker.from_env()
        client.ping()
    except Exception as e:
        raise ReportError(f"cannot talk to a Docker engine ({e}). Is it running (scripts/install_docker.sh)? "
                          "For a run's saved summary use: gradwire bytes --summary PATH/summary.json") from e
    return client


def _live_counters(container) -> dict[str, dict[str, int]] | None:
    try:
        stats = container.stats(stream=False, one_shot=True)
    except TypeError:  # docker SDK < 6.1 has no one_shot
        stats = container.stats(stream=False)
    except Exception:
        return None
    nets = stats.get("networks") or {}
    out = {name: {"tx_bytes": int(v.get("tx_bytes", 0)), "rx_bytes": int(v.get("rx_bytes", 0))}
           for name, v in nets.items()}
    return out or None


def _at_least(live: dict[str, dict[str, int]] | None, recorded: dict[str, Any] | None) -> bool:
    """``live`` has the interface ``recorded`` names, with counters no lower (or nothing to compare)."""
    if not live or not recorded or not recorded.get("interface"):
        return True
    now = live.get(recorded["interface"])
    return now is not None and not counters_below(now, recorded)


def list_containers(client, project: str) -> list[tuple[Any, ContainerInfo]]:
    """The project's containers (docker SDK objects and their ContainerInfo, without live counters)."""
    out = []
    for c in client.containers.list(all=True, filters={"label": f"{PROJECT_LABEL}={project}"}):
        labels = c.labels or {}
        if STACK_LABEL in labels:
            continue  # a swarm task of an image compose built: the compose labels are the image's
        out.append((c, ContainerInfo(
            name=c.name, id=c.id, hostname=(c.attrs.get("Config") or {}).get("Hostname", ""),
            service=labels.get(SERVICE_LABEL, ""), state=c.status, number=json_int(labels.get(NUMBER_LABEL)),
            link=_container_env(c, "GRADWIRE_LINK") or "", links=_container_env(c, "GRADWIRE_LINKS") or "",
        )))
    return out


def _task_slot(task_name: str, swarm_service: str) -> int:
    """The replica slot in a task name ``STACK_SERVICE.SLOT.TASKID`` (0 where there is none)."""
    slot = task_name.removeprefix(swarm_service + ".").split(".", 1)[0]
    return int(slot) if slot.isdigit() else 0


def _env_value(env: list[str] | None, name: str) -> str:
    for item in env or []:
        key, _, value = item.partition("=")
        if key == name:
            return value
    return ""


def list_stack_containers(client, stack: str) -> list[tuple[Any, ContainerInfo]]:
    """A swarm stack's task containers: those on this node (docker SDK object and ContainerInfo), then,
    where this engine is a swarm manager, the stack's tasks on other nodes (None and a ContainerInfo
    from the task: no live counters there; their workers' recorded counters still reach the report
    through the PS). Names are what ``docker stack ps`` shows: ``STACK_SERVICE.SLOT``."""
    out: list[tuple[Any, ContainerInfo]] = []
    prefix = f"{stack}_"
    for c in client.containers.list(all=True, filters={"label": f"{STACK_LABEL}={stack}"}):
        labels = c.labels or {}
        swarm_service = labels.get(SWARM_SERVICE_LABEL, "")
        slot = _task_slot(labels.get(SWARM_TASK_NAME_LABEL, ""), swarm_service)
        out.append((c, ContainerInfo(
            name=c.name, id=c.id, hostname=(c.attrs.get("Config") or {}).get("Hostname", ""),
            service=swarm_service.removeprefix(prefix), state=c.status, number=slot,
            link=_container_env(c, "GRADWIRE_LINK") or "", links=_container_env(c, "GRADWIRE_LINKS") or "",
            display_name=f"{swarm_service}.{slot}" if slot else c.name,
        )))
    local_ids = {info.id for _, info in out}
    out.extend((None, info) for info in _remote_tasks(client, stack, local_ids))
    return out


def _remote_tasks(client, stack: str, local_ids: set[str]) -> list[ContainerInfo]:
    """The stack's tasks whose containers are not on this node (a multi-node swarm), from the swarm
    API; none where this engine is not a manager (it cannot list tasks)."""
    try:
        services = client.api.services(filters={"label": f"{STACK_LABEL}={stack}"})
    except Exception:
        return []  # not a swarm manager, or swarm mode is off
    out = []
    for service in services:
        swarm_service = (service.get("Spec") or {}).get("Name", "")
        try:
            tasks = client.api.tasks(filters={"service": service["ID"]})
        except Exception:
            continue
        for task in tasks:
            status = task.get("Status") or {}
            container_id = (status.get("ContainerStatus") or {}).get("ContainerID", "")
            if container_id in local_ids:
                continue
            spec = (task.get("Spec") or {}).get("ContainerSpec") or {}
            slot = int(task.get("Slot") or 0)
            env = spec.get("Env")
            out.append(ContainerInfo(
                name=f"{swarm_service}.{slot}.{task.get('ID', '')}", id=container_id,
                # A task's container is named after its id unless the service sets a hostname.
                hostname=spec.get("Hostname") or container_id[:12], service=swarm_service.removeprefix(f"{stack}_"),
                state=status.get("State", ""), number=slot, link=_env_value(env, "GRADWIRE_LINK"),
                links=_env_value(env, "GRADWIRE_LINKS"), display_name=f"{swarm_service}.{slot}",
            ))
    return out


def _stack_names(client) -> list[str]:
    return sorted({s for c in client.containers.list(all=True) if (s := (c.labels or {}).get(STACK_LABEL))})


def _container_env(container, name: str) -> str | None:
    for item in (container.attrs.get("Config") or {}).get("Env") or []:
        key, _, value = item.partition("=")
        if key == name:
            return value
    return None


def _ps_port(container) -> int:
    address = _container_env(container, "GRADWIRE_ADDRESS") or ""
    try:
        return int(address.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return DEFAULT_PORT


# Runs inside the PS container: imports only grpc and the generated protos (~0.3 s), unlike the
# full CLI, so the Status and the interface counters read beside it are close in time. With TLS
# on (docker-compose.tls.yml) it presents the PS's own credentials from the container's
# environment: its certificate (which may act as a client) and its token.
_STATUS_SNIPPET = (
    "import json, os, sys\n"
    "from gradwire.channel import client_channel, token_from_environment\n"
    "from gradwire.status import fetch_status, status_as_dict\n"
    "e = os.environ.get\n"
    "with client_channel(sys.argv[1], [], e('GRADWIRE_TLS_CA', ''), e('GRADWIRE_TLS_CERT', ''),\n"
    "                    e('GRADWIRE_TLS_KEY', ''), token_from_environment()) as ch:\n"
    "    print(json.dumps(status_as_dict(fetch_status(ch))))\n"
)


def _status_via_exec(container) -> dict | None:
    """The PS's Status, fetched inside the PS container over its loopback."""
    address = f"127.0.0.1:{_ps_port(container)}"
    for cmd in (["python", "-c", _STATUS_SNIPPET, address],
                ["gradwire", "status", "--json", "--address", address]):
        try:
            result = container.exec_run(cmd, demux=True)
        except Exception:
            return None
        stdout = (result.output[0] if isinstance(result.output, tuple) else result.output) or b""
        if result.exit_code == 0:
            try:
                return json.loads(stdout)
            except json.JSONDecodeError:
                continue
    return None


def _summary_via_archive(container) -> dict | None:
    """summary.json copied out of the PS container (which may have stopped)."""
    out = _container_env(container, "GRADWIRE_OUT") or "/runs"
    try:
        stream, _ = container.get_archive(f"{out.rstrip('/')}/summary.json")
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            member = next(m for m in tar.getmembers() if m.isfile())
            return json.load(tar.extractfile(member))  # type: ignore[arg-type]  # a file member has a reader
    except Exception:
        return None


def collect(client, project: str, ps_service: str = DEFAULT_PS_SERVICE,
            worker_service: str = DEFAULT_WORKER_SERVICE, *, link: str | None = None,
            links: str | None = None, stack: str | None = None) -> dict[str, Any]:
    """The report of compose project ``project``, or of swarm stack ``stack`` when given. A project
    name with no compose containers but a stack of that name is read as that stack."""
    if stack:
        pairs, kind, name = list_stack_containers(client, stack), "stack", stack
    else:
        pairs, kind, name = list_containers(client, project), "compose project", project
        if not pairs and (stack_pairs := list_stack_containers(client, project)):
            pairs, kind, name = stack_pairs, "stack", project
    if not pairs:
        projects = sorted({p for c in client.containers.list(all=True)
                           if (p := (c.labels or {}).get(PROJECT_LABEL)) and STACK_LABEL not in (c.labels or {})})
        stacks = _stack_names(client)
        found = ([f"compose projects: {', '.join(projects)}"] if projects else []) + (
            [f"stacks (--stack): {', '.join(stacks)}"] if stacks else [])
        raise ReportError(f"no containers of {kind} {name!r}"
                          + (f"; found {'; '.join(found)}" if found
                             else "; is it up (docker compose up, or docker stack deploy)?"))
    ps_pairs = [(c, info) for c, info in pairs if info.service == ps_service]
    # A stack keeps the containers of earlier tasks: the running PS, else the newest one.
    local_ps = sorted((c for c, _ in ps_pairs if c is not None),
                      key=lambda c: (c.status == "running", (c.attrs or {}).get("Created", "")))
    ps = local_ps[-1] if local_ps else None
    if ps is None:
        remote = next((info for c, info in ps_pairs if c is None), None)
        if remote is not None:
            raise ReportError(f"the PS of {kind} {name!r} ({remote.compose_name}) runs on another node: run "
                              "gradwire bytes on that node (or point DOCKER_HOST at its engine)")
        raise ReportError(f"{kind} {name!r} has no {ps_service!r} service container")
    # The Status and every running container's counters are read at the same time, so that during
    # training they describe (nearly) the same moment.
    running = [(c, info) for c, info in pairs if c is not None and c.status == "running"]
    with ThreadPoolExecutor(max_workers=min(16, len(running) + 1)) as pool:
        status = pool.submit(_status_via_exec, ps) if ps.status == "running" else None
        for (_, info), live in zip(running, pool.map(lambda pair: _live_counters(pair[0]), running), strict=True):
            info.live = live
        data = status.result() if status is not None else None
    run = run_from_status(data) if data else None
    ps_info = next((info for c, info in running if c is ps), None)
    if run is not None and ps_info is not None and not _at_least(ps_info.live, run.server_interface_end):
        # Read at the same moment, so a reading taken just before the PS's own may be lower by what
        # moved in between: read again, now after it. What the report then finds below the PS's own
        # counters is refused (build_report: the PS's recorded end is a floor).
        ps_info.live = _live_counters(ps)
    if run is None:
        summary = _summary_via_archive(ps)
        if summary is None:
            raise ReportError(f"the PS of {kind} {name!r} ({ps.name}, {ps.status}) answers no Status and has "
                              "written no summary.json yet; try again in a moment")
        run = run_from_summary(summary)
    # The other PS containers (earlier tasks of a stack) are no part of this run's report.
    infos = [info for c, info in pairs if info.service != ps_service or c is ps]
    return build_report(run, infos, project=name if kind != "stack" else None,
                        stack=name if kind == "stack" else None, ps_service=ps_service,
                        worker_service=worker_service, link_env=link, links_env=links)
