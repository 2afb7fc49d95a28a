"""An HAProxy configuration that balances edits over Triton replicas by their readiness.

    python -m deploy.balancer --listen 0.0.0.0:8001 \\
        --replica 10.0.0.11:8001:8000 --replica 10.0.0.12:8001:8000 > haproxy.cfg
    haproxy -f haproxy.cfg

Why HAProxy: a replica that drains or replaces a model still accepts connections and
answers UNAVAILABLE inside a healthy HTTP/2 stream, so only an active check of Triton's
readiness (`GET /v2/health/ready` on the HTTP port) takes it out in time. Open-source
nginx has passive checks only (failed connections), which never see that. HAProxy checks
each replica's HTTP port over HTTP/1.1 and sends the gRPC streams to its gRPC port over
HTTP/2 (`proto h2`), one edit per stream, to the replica with the fewest edits in flight.

What it does per failure:
- not ready (draining, a model being replaced): out of rotation after one failed check
  (`CHECK_INTERVAL_MS`), back after two passing ones; edits in flight there finish.
- dead (connection refused): the connection is retried on another replica, unseen by
  the client.
- died mid-edit: that edit gets UNAVAILABLE (HTTP 502 from the balancer); the client
  retries it. The balancer does not resend a request that already reached a replica.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

CHECK_INTERVAL_MS = 500
# Request header whose value the log line shows, so a client can tell its attempts apart.
ATTEMPT_HEADER = "x-edit-attempt"
# The log line of every edit: client, replica, HTTP status, total ms, balancer retries
# and the attempt header.
LOG_FORMAT = '"%ci:%cp %b %s %ST %Ta %rc %{+Q}hr"'


@dataclass(frozen=True)
class Replica:
    """One tritonserver: where its gRPC and HTTP (health) ports are."""

    name: str
    host: str
    grpc_port: int
    http_port: int

    @classmethod
    def parse(cls, text: str, index: int) -> Replica:
        """HOST:GRPC_PORT:HTTP_PORT."""
        host, grpc_port, http_port = text.rsplit(":", 2)
        return cls(f"replica{index}", host, int(grpc_port), int(http_port))


def haproxy_config(
    listen: str,
    replicas: list[Replica],
    *,
    log_target: str = "stdout",
    edit_timeout_s: int = 600,
    backend: str = "replicas",
    extra_listeners: dict[str, list[Replica]] | None = None,
    stats_socket: str | None = None,
) -> str:
    """The configuration: one gRPC listener in front of `replicas`.

    `extra_listeners` maps further listen addresses to subsets of replicas (the tests
    measure one replica and two behind the same balancer). `stats_socket` is a UNIX
    socket for HAProxy's runtime API (`show stat`: each replica's state and edits in
    flight)."""
    lines = [
        "global",
        f"    log {log_target} format raw local0",
        *([f"    stats socket {stats_socket} mode 600 level operator"] if stats_socket else []),
        "defaults",
        "    mode http",
        "    log global",
        "    timeout connect 2s",
        # An edit is one request: the client and server timeouts bound the longest edit.
        f"    timeout client {edit_timeout_s}s",
        f"    timeout server {edit_timeout_s}s",
        "    timeout check 2s",
        # A refused connection goes to another replica (nothing of the edit was sent yet).
        "    retries 2",
        "    option redispatch 1",
    ]
    listeners = {listen: (backend, replicas)}
    for index, (address, subset) in enumerate((extra_listeners or {}).items()):
        listeners[address] = (f"{backend}_{index + 1}", subset)
    for index, (address, (name, members)) in enumerate(listeners.items()):
        lines += [
            f"frontend grpc_{index}",
            f"    bind {address} proto h2",
            f"    capture request header {ATTEMPT_HEADER} len 64",
            f"    log-format {LOG_FORMAT}",
            f"    default_backend {name}",
            f"backend {name}",
            "    balance leastconn",
            "    option httpchk",
            "    http-check send meth GET uri /v2/health/ready ver HTTP/1.1 hdr Host triton",
            "    http-check expect status 200",
        ]
        lines += [
            f"    server {r.name} {r.host}:{r.grpc_port} proto h2 check port {r.http_port} "
            f"check-proto h1 inter {CHECK_INTERVAL_MS}ms fall 1 rise 2"
            for r in members
        ]
    return "\n".join(lines) + "\n"


def replica_states(stats_socket: str) -> dict[tuple[str, str], dict[str, str]]:
    """(backend, replica) -> HAProxy's stats row for it (`status` UP/DOWN, `scur` edits in
    flight, ...), read from the runtime API."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.connect(stats_socket)
        connection.sendall(b"show stat\n")
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    header, *rows = b"".join(chunks).decode().strip().splitlines()
    names = header.lstrip("# ").split(",")
    states = {}
    for row in rows:
        values = dict(zip(names, row.split(","), strict=False))
        if values.get("svname") not in ("FRONTEND", "BACKEND"):
            states[(values["pxname"], values["svname"])] = values
    return states


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:8001", help="gRPC address clients use")
    parser.add_argument(
        "--replica",
        action="append",
        required=True,
        metavar="HOST:GRPC_PORT:HTTP_PORT",
        help="a tritonserver (repeat for each)",
    )
    parser.add_argument("--edit-timeout", type=int, default=600, help="seconds (default 600)")
    parser.add_argument("--stats-socket", help="a UNIX socket for HAProxy's runtime API")
    args = parser.parse_args(argv)
    replicas = [Replica.parse(text, index) for index, text in enumerate(args.replica)]
    config = haproxy_config(
        args.listen, replicas, edit_timeout_s=args.edit_timeout, stats_socket=args.stats_socket
    )
    sys.stdout.write(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
