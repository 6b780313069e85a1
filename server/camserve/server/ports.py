"""Port reservation for the multi-process layout.

The frontends share the gRPC (and HTTP) port with SO_REUSEPORT, which would also let a stale
server on the same port take a share of the connections without anyone noticing. So the
supervisor first binds the port without SO_REUSEPORT (refused if anything listens there), then
holds it with SO_REUSEPORT without listening: only its own frontends join, the port stays the
same across restarts, and port 0 becomes one concrete port for all of them.
"""

from __future__ import annotations

import socket

from camserve.server.settings import SettingsError


def _family(host: str) -> socket.AddressFamily:
    infos = socket.getaddrinfo(host.strip("[]"), None, type=socket.SOCK_STREAM)
    return infos[0][0] if infos else socket.AF_INET


def reserve_port(host: str, port: int, what: str) -> socket.socket:
    """A socket holding `host:port` for this server's processes; SettingsError if taken."""
    family = _family(host)
    address = (host.strip("[]"), port)
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no owner
        probe.bind(address)
        chosen = probe.getsockname()[1]
    except OSError as exc:
        raise SettingsError(
            f"{what} {host}:{port} is already in use ({exc.strerror}); stop the process that "
            "holds it (a previous camserve?) or choose another port"
        ) from None
    finally:
        probe.close()
    held = socket.socket(family, socket.SOCK_STREAM)
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        held.bind((address[0], chosen))
    except OSError as exc:
        held.close()
        raise SettingsError(
            f"{what} {host}:{chosen} was taken meanwhile ({exc.strerror})"
        ) from None
    return held
