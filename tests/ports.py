"""Ports for the servers the tests start: below the kernel's ephemeral range (32768-60999 by default),
so the outgoing connections of Ray's own processes cannot take one between its choice and its use, and
distinct within one call (closed sockets may hand the same ephemeral port out twice)."""
import random
import socket

_rng = random.Random()


def free_ports(n: int) -> list[int]:
    chosen: list[int] = []
    while len(chosen) < n:
        port = _rng.randrange(20000, 32000)
        if port in chosen:
            continue
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        chosen.append(port)
    return chosen


def free_port() -> int:
    return free_ports(1)[0]
