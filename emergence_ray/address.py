"""A Ray cluster's address (`--address`, `RAY_ADDRESS`): parsed, and checked with a plain socket.

ray.init on an address with nothing behind it retries its GCS connection for minutes, printing
time-outs, and a malformed one ends in a traceback; this says the same in seconds, as one `error:`
line naming the address and what to check. No Ray import: the CLI checks the address before it
loads Ray and torch (which alone take many seconds on a busy machine).
"""

from __future__ import annotations

import os
import re
import socket

from emergence_ray.errors import AddressError

PROBE_TIMEOUT_S = 10.0  # per socket step (connect, first bytes): an address is checked well within 30 s


def given_address(address: str | None) -> tuple[str | None, str]:
    """The cluster address to use (`address`, else $RAY_ADDRESS; None: an embedded Ray) and where
    it came from, for messages."""
    if address:
        return address, "--address"
    return os.environ.get("RAY_ADDRESS") or None, "RAY_ADDRESS"


_HOST_PORT = re.compile(r"\[(?P<ip6>[0-9A-Fa-f:.]+)\]:(?P<port6>\d+)|(?P<host>[A-Za-z0-9._-]+):(?P<port>\d+)")


def _check_hint(host: str, port: int) -> str:
    return (f"check that the cluster is running (`ray status --address {host}:{port}` on the head), that "
            "this is its GCS address (the head's `ray start --port`, 6379 by default; not the "
            "dashboard's 8265) and that no firewall blocks the port; or drop --address and unset "
            "RAY_ADDRESS to train on an embedded local Ray")


def check_address(address: str, source: str = "RAY_ADDRESS", timeout_s: float = PROBE_TIMEOUT_S) -> str:
    """`address` if a Ray cluster can answer there, else an AddressError naming it and what to check.

    ray.init on an address with nothing behind it retries its GCS connection for minutes, printing
    time-outs, and a malformed one ends in a traceback; a plain socket says the same in seconds.
    Accepted: HOST:PORT (the GCS), ray://HOST:PORT (Ray Client), `auto` (Ray's own discovery)."""
    where = f"{source}={address}"
    if address == "auto":
        return address
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "", address
    if scheme in ("http", "https"):
        raise AddressError(f"{where} is an HTTP address (a dashboard / Jobs API, for `ray job submit`); "
                           "emergence-ray connects to the cluster's GCS address HOST:PORT (the head's "
                           "`ray start --port`, 6379 by default), or submit the command as a job: "
                           f"ray job submit --address {address} -- emergence-ray train ...")
    if scheme not in ("", "ray"):
        raise AddressError(f"{where}: unknown scheme {scheme}://; use HOST:PORT (the GCS address) or "
                           "ray://HOST:PORT (Ray Client)")
    match = _HOST_PORT.fullmatch(rest.rstrip("/"))
    if not match:
        raise AddressError(f"{where} is not a Ray address: expected HOST:PORT (the head's GCS address, "
                           "e.g. 10.0.0.5:6379), ray://HOST:PORT (Ray Client) or auto")
    host, port = match["ip6"] or match["host"], int(match["port6"] or match["port"])
    if not 1 <= port <= 65535:
        raise AddressError(f"{where}: port {port} is out of range (1-65535)")
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            foreign = _not_grpc(sock, timeout_s)
    except socket.gaierror as err:
        raise AddressError(f"{where}: host {host!r} not found ({err.strerror}); check the name, or "
                           "use the head's IP address") from None
    except OSError as err:
        reason = err.strerror or type(err).__name__.replace("Error", " error").lower()
        raise AddressError(f"{where}: no Ray cluster answers at {host}:{port} ({reason}); "
                           + _check_hint(host, port)) from None
    if foreign:
        raise AddressError(f"{where}: {host}:{port} answers, but not as Ray does (an HTTP server: a "
                           "dashboard / Jobs API?); it is no Ray GCS or Ray Client port; " + _check_hint(host, port))
    return address


def _not_grpc(sock: socket.socket, timeout_s: float) -> bool:
    """Whether the server behind `sock` answers an HTTP/2 connection preface with something other
    than HTTP/2 (a web server's status line or page). Ray's GCS and Ray Client servers are gRPC:
    their first frame is SETTINGS (type byte 4 after a 3-byte length)."""
    sock.settimeout(timeout_s)
    try:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        first = sock.recv(16)
    except OSError:
        return False  # no answer yet: leave the verdict to ray.init
    return bool(first) and first[3:4] != b"\x04"
