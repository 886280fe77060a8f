"""Link profiles: shape a worker's uplink and downlink with Linux token-bucket filters.

A profile is ``RATE`` (both directions) or ``UP/DOWN``, each a tc-style rate (``10mbit``,
``500kbit``, ``1gbit``, ``250kbps``) or ``unshaped``. ``GRADWIRE_LINK`` gives every worker the
same profile; ``GRADWIRE_LINKS=10mbit,10mbit,100mbit`` gives rank *i* entry *i* (mod the list's
length).

How a profile is applied, inside the worker's own network namespace (its container, or the
namespace ``gradwire simulate --link`` makes for it):

- uplink: a ``tbf`` qdisc on the interface's egress;
- downlink: the interface's ingress is redirected (``mirred``) to an ``ifb`` device whose egress
  has a ``tbf`` qdisc. This kernel has ``tbf``, ``htb``, ``ifb`` and ``mirred`` but not ``netem``,
  so a profile sets rates only: no delay or loss emulation.

TBF silently drops any packet larger than its bucket, so the burst is never below the interface's
MTU plus headroom (64 KiB MTU on loopback); a larger burst (10 ms at the rate) keeps short
messages from being throttled below the rate.

The netlink calls go through pyroute2 (a maintained netlink library) instead of the ``tc``
binary, so the image needs no iproute2 and errors come back as exceptions with a reason.
Shaping needs CAP_NET_ADMIN in that namespace.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

IFB_PREFIX = "gwifb"
TBF_LATENCY = "400ms"  # how long a packet may wait in the bucket before TBF drops it
BURST_SECONDS = 0.01
ETH_P_ALL = 0x0003

_UNITS = {"bit": 1, "kbit": 1_000, "mbit": 1_000_000, "gbit": 1_000_000_000,
          "bps": 8, "kbps": 8_000, "mbps": 8_000_000, "gbps": 8_000_000_000}
_RATE = re.compile(r"^(\d+(?:\.\d+)?)\s*([a-z]+)$")
UNSHAPED = ("", "unshaped", "none", "off")
MAX_PROFILE_CHARS = 1024


class LinkError(ValueError):
    """A profile that cannot be parsed or applied; the message says why."""


def parse_rate(text: str) -> int | None:
    """Bits per second of a tc-style rate, or None for an unshaped direction."""
    t = text.strip().lower()
    if t in UNSHAPED:
        return None
    m = _RATE.match(t)
    if not m or m.group(2) not in _UNITS:
        raise LinkError(f"bad link rate {text!r}: expected e.g. 10mbit, 500kbit, 1gbit, 250kbps or unshaped")
    bps = int(float(m.group(1)) * _UNITS[m.group(2)])
    if not 8_000 <= bps <= 100_000_000_000:
        raise LinkError(f"link rate {text!r} is outside 8kbit..100gbit")
    return bps


def format_rate(bps: int | None) -> str:
    if bps is None:
        return "unshaped"
    for unit, scale in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if bps % scale == 0:
            return f"{bps // scale}{unit}"
    return f"{bps}bit"


@dataclass(frozen=True)
class LinkProfile:
    """Rates of one worker's link; None is an unshaped direction."""

    up_bps: int | None = None
    down_bps: int | None = None

    @classmethod
    def parse(cls, text: str) -> LinkProfile:
        if len(text) > MAX_PROFILE_CHARS:
            raise LinkError(f"link profile is {len(text)} characters; at most {MAX_PROFILE_CHARS}")
        up, sep, down = text.partition("/")
        return cls(parse_rate(up), parse_rate(down if sep else up))

    @property
    def shaped(self) -> bool:
        return self.up_bps is not None or self.down_bps is not None

    def __str__(self) -> str:
        if self.up_bps == self.down_bps:
            return format_rate(self.up_bps)
        return f"{format_rate(self.up_bps)}/{format_rate(self.down_bps)}"


def profile_for_rank(link: str = "", links: str = "", rank: int = 0) -> LinkProfile:
    """The profile of worker ``rank`` from GRADWIRE_LINKS (by rank, cyclically) or GRADWIRE_LINK."""
    if links.strip():
        entries = [e.strip() for e in links.split(",")]
        if any(not e for e in entries):
            raise LinkError(f"GRADWIRE_LINKS={links!r} has an empty entry")
        return LinkProfile.parse(entries[rank % len(entries)])
    return LinkProfile.parse(link)


def validate(link: str = "", links: str = "") -> None:
    """Fail at start-up, not after joining, on a profile that does not parse."""
    if links.strip():
        for i in range(len(links.split(","))):
            profile_for_rank(links=links, rank=i)
    else:
        LinkProfile.parse(link)


def burst_bytes(rate_bps: int, mtu: int) -> int:
    # At least one full packet plus its link-layer header, or TBF drops it outright.
    return max(mtu + 64, int(rate_bps / 8 * BURST_SECONDS))


def _iproute():
    try:
        from pyroute2 import IPRoute
    except ImportError as exc:  # pragma: no cover - pyroute2 is a core dependency
        raise LinkError("link shaping needs pyroute2 (pip install pyroute2)") from exc
    return IPRoute()


def apply(profile: LinkProfile, ifname: str) -> None:
    """Shape ``ifname`` in the current network namespace (replacing any earlier shaping)."""
    clear(ifname)
    if not profile.shaped:
        return
    from pyroute2.netlink.exceptions import NetlinkError

    ifb_name = f"{IFB_PREFIX}{ifname}"[:15]
    try:
        with _iproute() as ip:
            found = ip.link_lookup(ifname=ifname)
            if not found:
                raise LinkError(f"no interface {ifname!r} to shape")
            idx = found[0]
            mtu = int(ip.get_links(idx)[0].get_attr("IFLA_MTU") or 1500)
            if profile.up_bps is not None:
                ip.tc("add", "tbf", idx, rate=f"{profile.up_bps}bit", burst=burst_bytes(profile.up_bps, mtu),
                      latency=TBF_LATENCY)
            if profile.down_bps is not None:
                ip.link("add", ifname=ifb_name, kind="ifb")
                ifb = ip.link_lookup(ifname=ifb_name)[0]
                ip.link("set", index=ifb, state="up", mtu=mtu)
                ip.tc("add", "tbf", ifb, rate=f"{profile.down_bps}bit", burst=burst_bytes(profile.down_bps, mtu),
                      latency=TBF_LATENCY)
                ip.tc("add", "ingress", idx, "ffff:")
                ip.tc("add-filter", "u32", idx, parent="ffff:", protocol=ETH_P_ALL, prio=10,
                      keys=["0x0/0x0+0"], target=0x10001,
                      action={"kind": "mirred", "direction": "egress", "action": "redirect", "ifindex": ifb})
    except NetlinkError as exc:
        hint = " (shaping needs CAP_NET_ADMIN: cap_add NET_ADMIN in compose, or root)" if exc.code == 1 else ""
        raise LinkError(f"cannot shape {ifname} to {profile}: {exc}{hint}") from None


def clear(ifname: str) -> None:
    """Remove gradwire's shaping from ``ifname`` (root and ingress qdiscs, its ifb device)."""
    from pyroute2.netlink.exceptions import NetlinkError

    with _iproute() as ip:
        found = ip.link_lookup(ifname=ifname)
        if not found:
            return
        idx = found[0]
        for kind, handle in (("root", None), ("ingress", "ffff:")):
            try:
                if handle:
                    ip.tc("del", kind, idx, handle)
                else:
                    ip.tc("del", index=idx, parent=0xFFFFFFFF)
            except NetlinkError:
                pass  # nothing was there
        ifb = ip.link_lookup(ifname=f"{IFB_PREFIX}{ifname}"[:15])
        if ifb:
            ip.link("del", index=ifb[0])

