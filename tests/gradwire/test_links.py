"""Link profiles: parsing, and a shaped link's measured rate in network namespaces the test makes.

The rate test builds two namespaces joined by a veth pair (both ends inside namespaces this test
created, so no packet can leave the machine), shapes one end with ``gradwire.links.apply`` and
times a 3 MB TCP transfer in each direction against the set rate.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from gradwire.links import LinkError, LinkProfile, burst_bytes, parse_rate, profile_for_rank, validate


def test_rates_parse_like_tc():
    assert parse_rate("10mbit") == 10_000_000
    assert parse_rate("500kbit") == 500_000
    assert parse_rate("1gbit") == 1_000_000_000
    assert parse_rate("250kbps") == 2_000_000
    assert parse_rate("1.5mbit") == 1_500_000
    assert parse_rate("unshaped") is None and parse_rate("") is None


@pytest.mark.parametrize("bad", ["10", "fast", "10mbits", "-1mbit", "1bit", "10mbit/5x", "x" * 2000])
def test_bad_profiles_fail_with_a_reason(bad):
    with pytest.raises(LinkError):
        LinkProfile.parse(bad)


def test_profiles_by_rank_cycle_and_split_directions():
    links = "10mbit,10mbit/100mbit,unshaped"
    assert profile_for_rank(links=links, rank=0) == LinkProfile(10_000_000, 10_000_000)
    assert profile_for_rank(links=links, rank=1) == LinkProfile(10_000_000, 100_000_000)
    assert not profile_for_rank(links=links, rank=2).shaped
    assert profile_for_rank(links=links, rank=3) == profile_for_rank(links=links, rank=0)
    assert profile_for_rank(link="20mbit", rank=7) == LinkProfile(20_000_000, 20_000_000)
    assert str(LinkProfile(10_000_000, 100_000_000)) == "10mbit/100mbit"
    with pytest.raises(LinkError, match="empty entry"):
        validate(links="10mbit,,1gbit")


def test_burst_never_below_a_full_packet():
    # TBF drops packets larger than its bucket: at low rates the MTU, not the rate, sets the burst.
    assert burst_bytes(100_000, 65536) > 65536
    assert burst_bytes(1_000_000_000, 1500) == 1_250_000


# ------------------------------------------------------------------ measured rate

def _can_make_namespaces() -> str:
    if os.geteuid() != 0:
        return "needs root"
    if not shutil.which("ip"):
        return "needs iproute2's ip"
    probe = subprocess.run(["ip", "netns", "add", f"gwprobe{os.getpid()}"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot make a network namespace: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", f"gwprobe{os.getpid()}"], check=False)
    return ""


@pytest.fixture
def two_hosts():
    why = _can_make_namespaces()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI runs as root with iproute2: the shaped-link test must run ({why})")
        pytest.skip(why)
    tag = f"{os.getpid() % 100000}"
    a, b = f"gwla{tag}", f"gwlb{tag}"
    cmds = [
        ["ip", "netns", "add", a], ["ip", "netns", "add", b],
        ["ip", "link", "add", f"gwva{tag}", "netns", a, "type", "veth", "peer", "name", f"gwvb{tag}", "netns", b],
        ["ip", "-n", a, "addr", "add", "169.254.77.1/30", "dev", f"gwva{tag}"],
        ["ip", "-n", b, "addr", "add", "169.254.77.2/30", "dev", f"gwvb{tag}"],
        ["ip", "-n", a, "link", "set", f"gwva{tag}", "up"], ["ip", "-n", b, "link", "set", f"gwvb{tag}", "up"],
        ["ip", "-n", a, "link", "set", "lo", "up"], ["ip", "-n", b, "link", "set", "lo", "up"],
    ]
    try:
        for cmd in cmds:
            subprocess.run(cmd, check=True, capture_output=True, text=True)
        yield a, b, f"gwva{tag}"
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


RECEIVER = textwrap.dedent("""
    import socket, sys, time
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], 47001)); s.listen(1); s.settimeout(30)
    print("ready", flush=True)
    c, _ = s.accept(); c.settimeout(30)
    n, t0 = 0, None
    while True:
        b = c.recv(1 << 16)
        if not b:
            break
        if t0 is None:
            t0 = time.monotonic()
        n += len(b)
    print(n, time.monotonic() - t0, flush=True)
""")
SENDER = textwrap.dedent("""
    import socket, sys
    c = socket.create_connection((sys.argv[1], 47001), timeout=30)
    c.sendall(b"x" * int(sys.argv[2])); c.close()
""")
SHAPE = "import sys; from gradwire.links import LinkProfile, apply; apply(LinkProfile.parse(sys.argv[1]), sys.argv[2])"


def _goodput_bps(src_ns: str, dst_ns: str, dst_addr: str, nbytes: int) -> float:
    recv = subprocess.Popen(["ip", "netns", "exec", dst_ns, sys.executable, "-c", RECEIVER, dst_addr],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert recv.stdout.readline().strip() == "ready"
        subprocess.run(["ip", "netns", "exec", src_ns, sys.executable, "-c", SENDER, dst_addr, str(nbytes)],
                       check=True, timeout=60)
        n, seconds = recv.stdout.readline().split()
        assert int(n) == nbytes
        return int(n) * 8 / float(seconds)
    finally:
        recv.kill()
        recv.wait()


@pytest.mark.slow
def test_shaped_link_rate_within_15_percent_each_way(two_hosts):
    a, b, ifname = two_hosts
    up, down = 8_000_000, 16_000_000
    subprocess.run(["ip", "netns", "exec", a, sys.executable, "-c", SHAPE, "8mbit/16mbit", ifname],
                   check=True, timeout=60)
    # Goodput excludes TCP/IP headers (about 4.5 % of a 1500-byte frame), so it sits a little
    # under the set rate; the bound is the 15 %.
    measured_up = _goodput_bps(a, b, "169.254.77.2", 3_000_000)
    measured_down = _goodput_bps(b, a, "169.254.77.1", 6_000_000)
    print(f"measured up {measured_up/1e6:.2f} down {measured_down/1e6:.2f} Mbit/s")
    assert abs(measured_up - up) / up < 0.15, f"uplink {measured_up / 1e6:.2f} Mbit/s vs {up / 1e6} set"
    assert abs(measured_down - down) / down < 0.15, f"downlink {measured_down / 1e6:.2f} Mbit/s vs {down / 1e6}"


@pytest.mark.slow
def test_simulate_shapes_each_worker_in_its_own_namespace(tmp_path):
    """`gradwire simulate --link 1mbit`: rounds take at least the time the bytes need at that rate,
    the workers report their own veth counters, and every namespace is gone afterwards."""
    import json
    from pathlib import Path

    from gradwire.netns import why_unavailable

    why = why_unavailable()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI runs as root with iproute2: the shaped simulate test must run ({why})")
        pytest.skip(why)
    gradwire = str(Path(sys.executable).with_name("gradwire"))
    out = tmp_path / "summary.json"
    done = subprocess.run([gradwire, "simulate", "--workers", "2", "--rounds", "4", "--eval-every", "2",
                           "--link", "1mbit", "--json", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(out.read_text())
    rate_bps, rounds = 1_000_000, summary["rounds"]
    model_bytes = 4 * summary["params"]
    # Each round after the first moves a full model down and a dense update up over the shaped link.
    floor_s = (rounds - 1) * 2 * model_bytes * 8 / rate_bps
    first, last = summary["rounds_log"][0], summary["rounds_log"][-1]
    assert first["round"] == 0 and last["round"] == rounds - 1
    assert summary["elapsed_s"] >= 0.95 * floor_s, (summary["elapsed_s"], floor_s)
    for w in summary["per_worker"]:
        start, end = w["interface_start"], w["interface_end"]
        assert start["interface"].startswith("gw") and start["interface"] == end["interface"]
        sent = end["tx_bytes"] - start["tx_bytes"]
        # the worker's own veth carried its uplink: at least the payload, with TCP/IP and gRPC framing
        assert w["uplink_payload_bytes"] <= sent <= 1.3 * w["uplink_payload_bytes"] + 20_000
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "gwsim" not in namespaces
