"""`gradwire bytes`, the report: per-container rows, PS row, totals and rounds as plain data.

Part of the bytes report (``gradwire bytes``, docs/algorithms.md §6; overview in
``gradwire/bytes_report.py``). ``build_report`` joins a run's ``RunData`` with the project's
containers (``ContainerInfo``, matched by hostname) into the dict ``--json`` prints and the
tables render: interface bytes over the session, ratios to the protobuf bytes, bits per entry,
compression against dense float32, and the honest-accounting allowance check.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gradwire.bytes_report_run import RunData, WorkerRun
from gradwire.counters import LinkCounters, total
from gradwire.links import LinkError, LinkProfile, profile_for_rank

DEFAULT_PS_SERVICE = "ps"
DEFAULT_WORKER_SERVICE = "worker"
DENSE_BYTES_PER_ENTRY = 4  # float32: what an uncompressed update costs per entry

# The honest-accounting check (docs/algorithms.md §6): the interface must count at least the protobuf
# bytes, and at most 10 % more plus a fixed allowance per message (gRPC's 5-byte prefix, HTTP/2
# frame headers, TCP/IP headers of small segments, the TCP acknowledgements of the reply) and per
# connection (TCP handshake, HTTP/2 preface and SETTINGS, request headers, keepalive pings).
ALLOWANCE_RELATIVE = 0.10
ALLOWANCE_PER_MESSAGE_BYTES = 1024
ALLOWANCE_PER_CONNECTION_BYTES = 8192


@dataclass
class ContainerInfo:
    name: str
    id: str
    hostname: str
    service: str
    state: str  # docker's status: running, exited, created, ...
    number: int = 0
    # docker stats while running: interface name -> {"tx_bytes", "rx_bytes"}; None otherwise
    live: dict[str, dict[str, int]] | None = None
    # The container's GRADWIRE_LINK / GRADWIRE_LINKS (empty: unset, i.e. an unshaped link)
    link: str = ""
    links: str = ""
    # What its orchestrator calls it, where that is not compose's SERVICE-N: a swarm task's
    # STACK_SERVICE.SLOT (``gw_worker.1``, as ``docker stack ps`` shows it)
    display_name: str = ""

    @property
    def compose_name(self) -> str:
        """What ``docker compose`` calls it (``worker-1``: service and replica number from its labels),
        or ``docker stack ps`` (``display_name``)."""
        if self.display_name:
            return self.display_name
        return f"{self.service}-{self.number}" if self.service and self.number else self.name


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def allowance_bytes(message_bytes: int, messages: int, connections: int = 1) -> float:
    """How far above ``message_bytes`` an interface count may honestly be."""
    return (ALLOWANCE_RELATIVE * message_bytes + ALLOWANCE_PER_MESSAGE_BYTES * messages
            + ALLOWANCE_PER_CONNECTION_BYTES * connections)


def within_allowance(interface_bytes: int | None, message_bytes: int, messages: int, connections: int = 1) -> bool | None:
    """message bytes <= interface bytes <= message bytes + allowance; None when not measured."""
    if interface_bytes is None:
        return None
    return message_bytes <= interface_bytes <= message_bytes + allowance_bytes(message_bytes, messages, connections)


def counters_below(now: Mapping[str, Any], recorded: Mapping[str, Any]) -> bool:
    """Either of ``now``'s tx/rx counters is below ``recorded``'s (counters only grow)."""
    return any(int(now[k]) < int(recorded[k]) for k in ("tx_bytes", "rx_bytes"))


def interface_bytes(start: Mapping[str, Any] | None, end: Mapping[str, Any] | None,
                    live: Mapping[str, Mapping[str, int]] | None,
                    end_is_floor: bool = False) -> tuple[int | None, int | None, str]:
    """(tx, rx, source) over the session: live or recorded end counters minus the recorded start.

    ``end_is_floor``: ``end`` was read before any live reading could be (a worker's final report),
    so a live reading below it is refused, as one below ``start`` always is."""
    iface = (start or end or {}).get("interface")
    now: Mapping[str, Any] | None = None
    source = "none"
    if live:
        if iface and iface in live:
            now, source = live[iface], "docker-stats"
            # Counters only grow: a live reading below what the worker itself recorded (its end, or
            # its start) is not of this session's interface at a later time. docker stats of a
            # container whose network is being torn down as it exits gave such a reading (1,851 B
            # tx after the worker had recorded 419 KB sent); the recorded counters are then right.
            floor = end if end_is_floor and end and end.get("interface") == iface else start
            if floor and counters_below(now, floor):
                now, source = None, "none"
        elif not iface:
            # Nothing recorded yet: the whole namespace (all interfaces but loopback).
            now = {"tx_bytes": sum(v["tx_bytes"] for k, v in live.items() if k != "lo"),
                   "rx_bytes": sum(v["rx_bytes"] for k, v in live.items() if k != "lo")}
            source = "docker-stats"
    if now is None and end:
        now, source = end, "recorded"
    if now is None:
        return None, None, "none"
    tx, rx = int(now["tx_bytes"]), int(now["rx_bytes"])
    if start and (source == "recorded" or start.get("interface") == iface):
        tx, rx = tx - int(start["tx_bytes"]), rx - int(start["rx_bytes"])
    return tx, rx, source


def _match(worker: WorkerRun, containers: list[ContainerInfo]) -> ContainerInfo | None:
    """A worker's container: by hostname (compose: the container id's first 12 hex digits)."""
    for key in (worker.hostname, worker.worker_id):
        if not key:
            continue
        for c in containers:
            if key in (c.hostname, c.name) or (len(key) >= 12 and c.id.startswith(key)):
                return c
    return None


def _session_bytes(start: Mapping[str, Any] | None, end: Mapping[str, Any] | None,
                   live: Mapping[str, Mapping[str, int]] | None, sent: int, received: int,
                   end_is_floor: bool = False) -> tuple[int | None, int | None, str]:
    """``interface_bytes``, with None where the counters recorded are not on the traffic's path.

    Recorded counters that did not move at all while the PS counted messages over the link belong to
    an interface the traffic never crossed (``gradwire simulate`` without ``--link`` talks over
    loopback while the processes record eth0): no counter exists for that traffic, so n/a, not 0.
    """
    tx, rx, source = interface_bytes(start, end, live, end_is_floor)
    if source == "recorded" and tx == 0 and rx == 0 and (sent > 0 or received > 0):
        return None, None, "not-on-path"
    return tx, rx, source


def _link_profile(container: ContainerInfo | None, rank: int, link: str | None, links: str | None) -> LinkProfile | None:
    """The worker's link profile: its container's GRADWIRE_LINK/LINKS (unset: unshaped), else the
    profiles the user gave (``--link``/``--links``), else None (unknown: the summary does not carry it)."""
    if container is not None:
        link, links = container.link, container.links
    elif link is None and links is None:
        return None
    try:
        return profile_for_rank(link or "", links or "", rank)
    except LinkError:
        return None  # a worker with a bad profile fails at start-up, so this one ran unknown


def _bps(nbytes: int | None, seconds: float | None) -> float | None:
    if nbytes is None or seconds is None or seconds <= 0:
        return None
    return 8.0 * nbytes / seconds


def _bits_per_entry(nbytes: int | None, params: int, updates: int) -> float | None:
    if nbytes is None or params <= 0 or updates <= 0:
        return None
    return 8.0 * nbytes / (params * updates)


def build_report(run: RunData, containers: Iterable[ContainerInfo] = (), *, project: str | None = None,
                 ps_service: str = DEFAULT_PS_SERVICE, worker_service: str = DEFAULT_WORKER_SERVICE,
                 link_env: str | None = None, links_env: str | None = None, stack: str | None = None) -> dict[str, Any]:
    """The report as plain data (what ``--json`` prints): every figure the tables show.

    ``project``: the compose project the containers belong to; ``stack``: the swarm stack instead.

    ``link_env``/``links_env``: the run's GRADWIRE_LINK/GRADWIRE_LINKS where no container says (a summary).
    Compression is dense-equivalent bytes (4 B × params × messages) over payload or interface bytes,
    per direction; achieved throughput is interface bits over the PS's training time (``elapsed_s``).
    """
    containers = list(containers)
    worker_containers = [c for c in containers if c.service == worker_service]
    ps_container = next((c for c in containers if c.service == ps_service), None)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for w in sorted(run.workers, key=lambda w: (w.rank, w.worker_id)):
        c = _match(w, worker_containers)
        if c is not None:
            seen.add(c.id)
        up_msg = w.link.uplink_message_bytes + w.uplink_control_bytes
        tx, rx, source = _session_bytes(w.interface_start, w.interface_end, c.live if c else None,
                                        up_msg, w.link.downlink_message_bytes, end_is_floor=True)
        messages = w.rounds + (2 if w.uplink_control_bytes else 0)
        dense_bytes = DENSE_BYTES_PER_ENTRY * run.params * w.rounds
        down_dense = None if w.downlink_models is None else DENSE_BYTES_PER_ENTRY * run.params * w.downlink_models
        profile = _link_profile(c, w.rank, link_env, links_env)
        rows.append({
            "name": c.compose_name if c else (w.hostname or w.worker_id),
            "container": c.name if c else None, "container_id": c.id[:12] if c else None,
            "state": c.state if c else ("connected" if w.connected else "gone"),
            "worker_id": w.worker_id, "hostname": w.hostname, "rank": w.rank, "rounds": w.rounds,
            **w.link.to_dict(), "uplink_control_bytes": w.uplink_control_bytes, "uplink_protobuf_bytes": up_msg,
            "downlink_models": w.downlink_models,
            "link_profile": None if profile is None else str(profile),
            "link_up_bps": None if profile is None else profile.up_bps,
            "link_down_bps": None if profile is None else profile.down_bps,
            "achieved_up_bps": _bps(tx, run.elapsed_s), "achieved_down_bps": _bps(rx, run.elapsed_s),
            "interface": (w.interface_start or w.interface_end or {}).get("interface"),
            "interface_source": source, "interface_tx_bytes": tx, "interface_rx_bytes": rx,
            "tx_over_message": ratio(tx, up_msg), "rx_over_downlink": ratio(rx, w.link.downlink_message_bytes),
            "message_over_payload": ratio(w.link.uplink_message_bytes, w.link.uplink_payload_bytes),
            "payload_bits_per_entry": _bits_per_entry(w.link.uplink_payload_bytes, run.params, w.rounds),
            "interface_bits_per_entry": _bits_per_entry(tx, run.params, w.rounds),
            "dense_equivalent_bytes": dense_bytes,
            "payload_compression": ratio(dense_bytes, w.link.uplink_payload_bytes),
            "interface_compression": ratio(dense_bytes, tx),
            "downlink_dense_equivalent_bytes": down_dense,
            "downlink_payload_compression": ratio(down_dense, w.link.downlink_payload_bytes),
            "downlink_interface_compression": ratio(down_dense, rx),
            "uplink_within_allowance": within_allowance(tx, up_msg, messages),
            "uplink_allowance_bytes": allowance_bytes(up_msg, messages),
            **_rate_figures(run, w.rank),
        })
    # Worker containers the PS has not heard of (not joined yet, or failed before joining).
    for c in sorted(worker_containers, key=lambda c: c.number):
        if c.id in seen:
            continue
        tx, rx, source = interface_bytes(None, None, c.live)
        rows.append({
            "name": c.compose_name,
            "container": c.name, "container_id": c.id[:12], "state": c.state, "worker_id": None, "hostname": c.hostname,
            "rank": None, "rounds": 0, **LinkCounters().to_dict(), "uplink_control_bytes": 0,
            "uplink_protobuf_bytes": 0, "downlink_models": None,
            # The rank (which picks a GRADWIRE_LINKS entry) comes from the PS: not known before joining.
            "link_profile": None, "link_up_bps": None, "link_down_bps": None,
            "achieved_up_bps": None, "achieved_down_bps": None,
            "interface": None, "interface_source": source, "interface_tx_bytes": tx,
            "interface_rx_bytes": rx, "tx_over_message": None, "rx_over_downlink": None, "message_over_payload": None,
            "payload_bits_per_entry": None, "interface_bits_per_entry": None, "dense_equivalent_bytes": 0,
            "payload_compression": None, "interface_compression": None, "downlink_dense_equivalent_bytes": None,
            "downlink_payload_compression": None, "downlink_interface_compression": None, "uplink_within_allowance": None,
            "uplink_allowance_bytes": None, **_rate_figures(run, None),
        })

    joined = [r for r in rows if r["rank"] is not None]
    # Every worker the PS knows, with the uplink messages counted whole: Hello and WorkerReport too.
    links = total(w.link for w in run.workers)
    links.uplink_message_bytes += sum(w.uplink_control_bytes for w in run.workers)
    total_msg, total_down = links.uplink_message_bytes, links.downlink_message_bytes
    txs = [r["interface_tx_bytes"] for r in joined]
    rxs = [r["interface_rx_bytes"] for r in joined]
    total_tx = sum(txs) if txs and None not in txs else None
    total_rx = sum(rxs) if rxs and None not in rxs else None
    dense_total = sum(r["dense_equivalent_bytes"] for r in joined)
    down_denses = [r["downlink_dense_equivalent_bytes"] for r in joined]
    down_dense_total = sum(down_denses) if down_denses and None not in down_denses else None
    updates = sum(r["rounds"] for r in joined)

    # The PS's live reading was taken after its recorded end (Status's own reading) or re-read after
    # it (bytes_report_docker.collect): a live reading below it is refused. One was once 5,006 B of rx
    # for a PS whose Status counted 1.26 MB received from its workers.
    ps_tx, ps_rx, ps_source = _session_bytes(run.server_interface_start, run.server_interface_end,
                                             ps_container.live if ps_container else None, total_down, total_msg,
                                             end_is_floor=True)
    ps = {
        "name": ps_container.compose_name if ps_container else DEFAULT_PS_SERVICE,
        "container": ps_container.name if ps_container else None,
        "state": ps_container.state if ps_container else None,
        "interface": (run.server_interface_start or run.server_interface_end or {}).get("interface"),
        "interface_source": ps_source, "interface_tx_bytes": ps_tx, "interface_rx_bytes": ps_rx,
        **links.to_dict(),
        "rx_over_uplink_message": ratio(ps_rx, total_msg), "tx_over_downlink": ratio(ps_tx, total_down),
        "achieved_up_bps": _bps(ps_rx, run.elapsed_s), "achieved_down_bps": _bps(ps_tx, run.elapsed_s),
    }
    ranks = [r["rank"] for r in joined]
    uplink = {"payload_compression": ratio(dense_total, links.uplink_payload_bytes),
              "interface_compression": ratio(dense_total, total_tx)}
    downlink = {"payload_compression": ratio(down_dense_total, links.downlink_payload_bytes),
                "interface_compression": ratio(down_dense_total, total_rx)}
    return {
        # What a reader wants first: how well it trained, how long it took, what each direction saved.
        "headline": {"final_accuracy": run.final_accuracy, "elapsed_s": run.elapsed_s, "round": run.round,
                     "total_rounds": run.total_rounds, "workers": len(joined), "uplink": uplink, "downlink": downlink},
        "elapsed_s": run.elapsed_s,
        "throughput_over": "interface bytes × 8 / elapsed_s, the PS's training time (first round to finish)",
        "project": project, "stack": stack, "source": run.source, "codec": run.codec, "downlink_codec": run.downlink_codec,
        "params": run.params, "round": run.round,
        "total_rounds": run.total_rounds, "finished": run.finished, "final_accuracy": run.final_accuracy,
        "distinct_ranks": len(set(ranks)) == len(ranks),
        "allowance": {"relative": ALLOWANCE_RELATIVE, "per_message_bytes": ALLOWANCE_PER_MESSAGE_BYTES,
                      "per_connection_bytes": ALLOWANCE_PER_CONNECTION_BYTES},
        "workers": rows,
        "ps": ps,
        "totals": {
            "workers": len(joined), "updates": updates, **links.to_dict(),
            "interface_tx_bytes": total_tx, "interface_rx_bytes": total_rx,
            "tx_over_message": ratio(total_tx, total_msg), "rx_over_downlink": ratio(total_rx, total_down),
            "payload_bits_per_entry": _bits_per_entry(links.uplink_payload_bytes, run.params, updates),
            "interface_bits_per_entry": _bits_per_entry(total_tx, run.params, updates),
            "dense_equivalent_bytes": dense_total,
            "payload_compression": ratio(dense_total, links.uplink_payload_bytes),
            "interface_compression": ratio(dense_total, total_tx),
            "downlink_dense_equivalent_bytes": down_dense_total,
            "downlink_payload_compression": downlink["payload_compression"],
            "downlink_interface_compression": downlink["interface_compression"],
            "achieved_up_bps": _bps(total_tx, run.elapsed_s), "achieved_down_bps": _bps(total_rx, run.elapsed_s),
        },
        "rounds": [
            {"round": r.round, "workers": r.workers, **r.link.to_dict(),
             "payload_bits_per_entry": _bits_per_entry(r.link.uplink_payload_bytes, run.params, r.workers),
             "train_loss": r.train_loss, "test_accuracy": r.test_accuracy,
             # the adaptive codec's choice this round, by rank (None for other codecs)
             "rates": {str(k): v for k, v in sorted(r.rates.items())} if r.rates else None,
             "round_trip_s": {str(k): v for k, v in sorted(r.measured_s.items())} if r.measured_s else None}
            for r in run.rounds
        ],
        "rate_target_s": run.rate_target_s,
    }


def _rate_figures(run: RunData, rank: int | None) -> dict[str, Any]:
    """One worker's rates as a bandwidth-adaptive codec chose them, and the link the PS measured."""
    rates = [r.rates[rank] for r in run.rounds if rank is not None and rank in r.rates]
    trips = [r.measured_s[rank] for r in run.rounds if rank is not None and rank in r.measured_s]
    speeds = [r.throughput_bps[rank] for r in run.rounds if rank is not None and rank in r.throughput_bps]
    target = run.rate_target_s
    return {
        "rate_last": rates[-1] if rates else None,
        "rate_mean": sum(rates) / len(rates) if rates else None,
        "rate_changes": sum(a != b for a, b in zip(rates, rates[1:], strict=False)) if rates else None,
        "measured_link_bps": sum(speeds) / len(speeds) if speeds else None,
        "round_trips_within_target": (sum(t <= target for t in trips) / len(trips)) if trips and target else None,
    }
