"""How both clients reach the servers: addresses, TLS, headers, deadlines and retries.

A client takes one address (a server, or a load balancer in front of several) or several
server addresses. With several, a call that meets a transient error (the server is down,
draining, busy or replacing a model) goes at once to the next address; once every
address has failed, retries wait with exponential backoff. The address that answered
last is tried first next time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from pix2pix_client import contract
from pix2pix_client.errors import InvalidArgument

DEFAULT_URL = "localhost:8001"


class ConnectionOptions(TypedDict, total=False):
    """The keyword arguments of EditClient and AsyncEditClient besides the address.

    `ssl=True` uses TLS; `root_certificates`, `private_key` and `certificate_chain` are
    PEM file paths. `headers` (for example {"authorization": "Bearer ..."}) go with every
    call; `admin_key` opens the server's restricted APIs (`models()` needs it). Calls that
    fail transiently are retried `retries` times (default 2), with exponential backoff
    from `backoff_s` (default 0.5). `timeout_s` is the default overall deadline of a call,
    retries included (default: none).
    """

    ssl: bool
    root_certificates: str | Path | None
    private_key: str | Path | None
    certificate_chain: str | Path | None
    headers: dict[str, str] | None
    admin_key: str | None
    retries: int
    backoff_s: float
    timeout_s: float | None


# The longest wait between two tries, however many retries are asked for.
MAX_BACKOFF_S = 30.0


def parse_urls(url: str | Sequence[str]) -> list[str]:
    """ "host:port", "a:8001,b:8001" or a list of addresses -> the list."""
    urls = [part.strip() for part in url.split(",")] if isinstance(url, str) else list(url)
    if not urls or not all(urls):
        raise InvalidArgument("url", f"url={url!r} has no address: allowed host:port[,host:port]")
    for address in urls:
        _check_address(address)
    return urls


def _check_address(address: str) -> None:
    """What gRPC would take for another address: an HTTP URL, a port out of range (gRPC
    wraps it to another port). Its own schemes (dns:///, unix:, ipv4:) pass as they are."""
    if address.lower().startswith(("http://", "https://")):
        raise InvalidArgument(
            "url", f"url={address!r} is an HTTP URL: allowed host:port (gRPC, no scheme)"
        )
    port = address.rpartition(":")[2]
    if port.lstrip("-").isdigit() and not 1 <= int(port) <= 65535:
        raise InvalidArgument("url", f"url={address!r} has port {port}: allowed 1..65535")


@dataclass
class Connection:
    """What every call of one client needs to know, checked once."""

    urls: list[str]
    tls: dict[str, Any]
    headers: dict[str, str] | None
    retries: int
    backoff_s: float
    timeout_s: float | None
    preferred: int = 0  # index of the address that answered last

    @classmethod
    def from_options(cls, url: str | Sequence[str], options: ConnectionOptions) -> Connection:
        retries = options.get("retries", 2)
        backoff_s = options.get("backoff_s", 0.5)
        if retries < 0:
            raise InvalidArgument("retries", f"retries={retries} is negative: allowed >= 0")
        if backoff_s < 0:
            raise InvalidArgument("backoff_s", f"backoff_s={backoff_s} is negative: allowed >= 0")
        timeout_s = options.get("timeout_s")
        Deadline(timeout_s)  # rejects a non-positive default early
        return cls(
            urls=parse_urls(url),
            tls=tls_arguments(
                options.get("ssl", False),
                options.get("root_certificates"),
                options.get("private_key"),
                options.get("certificate_chain"),
            ),
            headers=normalise_headers(options.get("headers"), options.get("admin_key")),
            retries=retries,
            backoff_s=backoff_s,
            timeout_s=timeout_s,
        )

    def deadline(self, timeout_s: float | None) -> Deadline:
        return Deadline(self.timeout_s if timeout_s is None else timeout_s)

    def attempts(self) -> Iterator[tuple[int, float]]:
        """(address index, seconds to wait first) for the first try and each retry."""
        count = len(self.urls)
        yield self.preferred, 0.0
        for retry in range(1, self.retries + 1):
            # Every other address once, at once; after that, backoff.
            doublings = min(retry - count, 32)  # past the cap long before; no huge powers
            wait = 0.0 if retry < count else min(self.backoff_s * 2**doublings, MAX_BACKOFF_S)
            yield (self.preferred + retry) % count, wait


class Deadline:
    """The time left of an optional overall timeout, shared by all attempts of a call."""

    def __init__(self, timeout_s: float | None) -> None:
        if timeout_s is not None and not timeout_s > 0:
            raise InvalidArgument(
                "timeout_s", f"timeout_s={timeout_s!r} is not positive: allowed > 0 or None"
            )
        self._end = None if timeout_s is None else time.monotonic() + timeout_s

    def remaining(self) -> float | None:
        """Seconds left (at least a millisecond, so gRPC still reports the deadline)."""
        return None if self._end is None else max(self._end - time.monotonic(), 1e-3)

    def allows(self, wait_s: float) -> bool:
        """Whether waiting `wait_s` still leaves time for another attempt."""
        return self._end is None or time.monotonic() + wait_s < self._end


def normalise_headers(
    headers: dict[str, str] | None, admin_key: str | None = None
) -> dict[str, str] | None:
    """The gRPC metadata of every call: keys lowercase (HTTP-style spellings accepted),
    plus the header that opens the server's restricted APIs when an admin key is given."""
    merged = {str(key).lower(): str(value) for key, value in (headers or {}).items()}
    if admin_key:
        merged[contract.ADMIN_GRPC_HEADER] = admin_key
    return merged or None


def tls_arguments(
    ssl: bool,
    root_certificates: str | Path | None,
    private_key: str | Path | None,
    certificate_chain: str | Path | None,
) -> dict[str, Any]:
    """tritonclient's TLS keyword arguments, with the PEM files checked to be readable."""
    files = {
        "root_certificates": root_certificates,
        "private_key": private_key,
        "certificate_chain": certificate_chain,
    }
    given = {name: path for name, path in files.items() if path is not None}
    if given and not ssl:
        raise InvalidArgument(
            next(iter(given)), f"{', '.join(given)} given without ssl=True: allowed with TLS only"
        )
    for name, path in given.items():
        if not Path(path).is_file():
            raise InvalidArgument(name, f"{name}={str(path)!r} is not a readable file")
    return {"ssl": ssl, **{name: str(path) for name, path in given.items()}}
