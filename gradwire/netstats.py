"""Interface byte counters of this process's network namespace (Linux /sys)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

SYS_NET = Path("/sys/class/net")


def default_interface() -> str | None:
    """GRADWIRE_INTERFACE, else eth0 when present (containers), else None."""
    name = os.environ.get("GRADWIRE_INTERFACE")
    if name:
        return name
    return "eth0" if (SYS_NET / "eth0").exists() else None


def read_counters(interface: str | None = None) -> dict[str, Any] | None:
    """``{"interface", "tx_bytes", "rx_bytes"}`` or None where none can be read."""
    interface = interface or default_interface()
    if not interface:
        return None
    stats = SYS_NET / interface / "statistics"
    try:
        tx = int((stats / "tx_bytes").read_text())
        rx = int((stats / "rx_bytes").read_text())
    except (OSError, ValueError):
        return None
    return {"interface": interface, "tx_bytes": tx, "rx_bytes": rx}
