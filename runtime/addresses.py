"""Which hosts count as this machine only: the live view and the OPC UA server listen on
those unless the user allows more (the line's images and verdicts are not for the plant
network by default)."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """`localhost`, 127.0.0.0/8 or ::1."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
