"""Which hosts count as this machine only: the live view and the OPC UA server listen on
those unless the user allows more (the line's images and verdicts are not for the plant
network by default); and a free port to listen on."""

from __future__ import annotations

import ipaddress
import socket


def is_loopback(host: str) -> bool:
    """`localhost`, 127.0.0.0/8 or ::1."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` at the time of asking (tests and benchmarks start servers)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]
