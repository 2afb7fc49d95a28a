"""Publishes a built model repository to S3-compatible object storage, for Triton to serve.

    python -m model_repository.publish REPOSITORY s3://BUCKET/PREFIX [--endpoint-url URL]
        [--delete]

Every file of the repository becomes an object under PREFIX; an empty folder becomes a
folder marker object (`PREFIX/model/1/`), since object storage has no empty folders and
Triton needs every version folder to exist. A file whose object already holds the same
bytes (the sha256 recorded in the object's metadata at upload, and the size) is skipped,
so publishing again after a rebuild uploads only what changed. Objects under PREFIX that
the repository no longer has are listed, and removed with --delete: Triton would load
them as models. Credentials come from boto3's standard chain (AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY, a profile, an instance role).

Triton names a store that is not AWS in the repository path itself, as
`s3://[http://|https://]HOST:PORT/BUCKET/PREFIX`; the command prints the path to serve.
`S3Location` reads both forms, so `serving.serve` and `TritonServer` accept
whatever Triton accepts.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edit_pipeline.cpu_graph import CPU_GRAPH_DIR

SCHEME = "s3://"
# The object metadata key that records a file's sha256 (x-amz-meta-sha256 on the wire).
DIGEST_METADATA = "sha256"
# Triton's own pattern for a store named in the path: s3://[scheme://]host:port/bucket/...
_ENDPOINT_IN_PATH = re.compile(r"^s3://(?:(https?)://)?([0-9A-Za-z.\-]+):([0-9]+)/(.+)$")


@dataclass(frozen=True)
class S3Location:
    """A repository in object storage: the bucket, the key prefix and, for a store that is
    not AWS, its endpoint."""

    bucket: str
    prefix: str
    endpoint_url: str | None = None

    @classmethod
    def parse(cls, url: str, endpoint_url: str | None = None) -> S3Location:
        """Reads `s3://BUCKET/PREFIX` or Triton's `s3://[http(s)://]HOST:PORT/BUCKET/PREFIX`
        (Triton speaks plain HTTP to HOST:PORT unless told https://)."""
        if not url.startswith(SCHEME):
            raise ValueError(f"{url}: not an s3:// URL")
        named = _ENDPOINT_IN_PATH.match(url)
        if named is not None:
            if endpoint_url is not None:
                raise ValueError(f"{url} names its endpoint already; drop --endpoint-url")
            scheme, host, port, rest = named.groups()
            endpoint_url = f"{scheme or 'http'}://{host}:{port}"
        else:
            rest = url[len(SCHEME) :]
        bucket, _, prefix = rest.strip("/").partition("/")
        if not bucket:
            raise ValueError(f"{url}: no bucket")
        return cls(bucket=bucket, prefix=prefix.strip("/"), endpoint_url=endpoint_url)

    def key(self, relative: str) -> str:
        """The object key of a path relative to the repository root."""
        return f"{self.prefix}/{relative}" if self.prefix else relative

    @property
    def triton_url(self) -> str:
        """The repository path Triton serves (`--model-repository`)."""
        path = f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket
        if self.endpoint_url is None:
            return f"{SCHEME}{path}"
        endpoint = urlsplit(self.endpoint_url)
        # Triton assumes plain HTTP for a host:port and wants https:// spelled out.
        scheme = "https://" if endpoint.scheme == "https" else ""
        return f"{SCHEME}{scheme}{endpoint.netloc}/{path}"

    def client(self) -> Any:
        """A boto3 S3 client for this store, with the standard credential chain."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url)


def read_text(url: str, relative: str) -> str | None:
    """The text of one file of a repository in object storage; None when it is absent."""
    from botocore.exceptions import BotoCoreError, ClientError

    location = S3Location.parse(url)
    try:
        body = location.client().get_object(Bucket=location.bucket, Key=location.key(relative))
        return body["Body"].read().decode()
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise RuntimeError(f"{url}: cannot read {relative}: {error}") from None
    except BotoCoreError as error:
        raise RuntimeError(f"{url}: cannot read {relative}: {error}") from None


@dataclass(frozen=True)
class RepositoryEntry:
    """One object the repository needs: a file (with its size and digest) or, for an empty
    folder, a folder marker (`relative` ends with a slash, no file)."""

    relative: str
    path: Path | None = None
    size: int = 0
    sha256: str = ""

    @property
    def is_marker(self) -> bool:
        return self.path is None


@dataclass
class PublishReport:
    """What a publish did: objects uploaded, skipped as unchanged, and left over."""

    location: S3Location
    uploaded: list[RepositoryEntry] = field(default_factory=list)
    unchanged: list[RepositoryEntry] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)

    @property
    def uploaded_bytes(self) -> int:
        return sum(entry.size for entry in self.uploaded)

    @property
    def total_bytes(self) -> int:
        return self.uploaded_bytes + sum(entry.size for entry in self.unchanged)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def repository_entries(repository: Path) -> list[RepositoryEntry]:
    """Every file of the repository, and a marker for every empty folder, sorted by path;
    not the graphs optimized for the building machine's CPU (CPU_GRAPH_DIR): as many
    bytes again to download, for a replica that may have another CPU, where optimizing
    at load costs seconds."""
    entries = []
    for folder, subfolders, files in _walk(repository):
        if CPU_GRAPH_DIR in subfolders:
            subfolders.remove(CPU_GRAPH_DIR)
        relative_folder = folder.relative_to(repository).as_posix()
        if not files and not subfolders and folder != repository:
            entries.append(RepositoryEntry(f"{relative_folder}/"))
        for name in files:
            path = folder / name
            relative = path.relative_to(repository).as_posix()
            entries.append(RepositoryEntry(relative, path, path.stat().st_size, file_sha256(path)))
    return sorted(entries, key=lambda entry: entry.relative)


def _walk(root: Path) -> Iterator[tuple[Path, list[str], list[str]]]:
    # The builder hard-links or copies; a symbolic link is followed like the file it names.
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders.sort()
        yield Path(folder), subfolders, sorted(files)


def _remote_objects(client: Any, location: S3Location) -> dict[str, int]:
    """Key -> size of every object under the prefix."""
    prefix = location.key("") if location.prefix else ""
    found: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=location.bucket, Prefix=prefix
    ):
        for item in page.get("Contents", []):
            found[item["Key"]] = int(item["Size"])
    return found


def _unchanged(client: Any, location: S3Location, entry: RepositoryEntry, remote_size: int) -> bool:
    if entry.is_marker:
        return True
    if remote_size != entry.size:
        return False
    head = client.head_object(Bucket=location.bucket, Key=location.key(entry.relative))
    return head.get("Metadata", {}).get(DIGEST_METADATA) == entry.sha256


def publish(
    repository: Path,
    location: S3Location,
    *,
    delete: bool = False,
    log: Any = print,
) -> PublishReport:
    """Uploads the repository under `location`, skipping objects that hold the same bytes."""
    repository = Path(repository)
    if not (repository / "repository.json").is_file():
        raise FileNotFoundError(f"{repository}: not a built repository (no repository.json)")
    client = location.client()
    remote = _remote_objects(client, location)
    report = PublishReport(location)
    entries = repository_entries(repository)
    for entry in entries:
        key = location.key(entry.relative)
        if key in remote and _unchanged(client, location, entry, remote[key]):
            report.unchanged.append(entry)
            continue
        if entry.is_marker:
            client.put_object(Bucket=location.bucket, Key=key, Body=b"")
            log(f"  marker    {key}")
        else:
            assert entry.path is not None
            # Multipart above boto3's threshold: large UNets upload in parallel parts.
            client.upload_file(
                str(entry.path),
                location.bucket,
                key,
                ExtraArgs={"Metadata": {DIGEST_METADATA: entry.sha256}},
            )
            log(f"  uploaded  {key}  ({_size(entry.size)})")
        report.uploaded.append(entry)
    wanted = {location.key(entry.relative) for entry in entries}
    report.stale = sorted(set(remote) - wanted)
    if delete and report.stale:
        for start in range(0, len(report.stale), 1000):
            batch = report.stale[start : start + 1000]
            client.delete_objects(
                Bucket=location.bucket, Delete={"Objects": [{"Key": key} for key in batch]}
            )
        report.deleted = list(report.stale)
    return report


def _size(count: int) -> str:
    return f"{count / 1e6:.1f} MB" if count >= 100_000 else f"{count / 1e3:.1f} kB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repository", type=Path, help="a built model repository folder")
    parser.add_argument("destination", help="s3://BUCKET/PREFIX")
    parser.add_argument(
        "--endpoint-url",
        help="an S3-compatible store that is not AWS, e.g. http://127.0.0.1:9000",
    )
    parser.add_argument(
        "--delete",
        action="store_true",
        help="remove objects under PREFIX that the repository does not have",
    )
    args = parser.parse_args(argv)
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        location = S3Location.parse(args.destination, args.endpoint_url)
        print(f"publishing {args.repository} to s3://{location.bucket}/{location.prefix}")
        report = publish(args.repository, location, delete=args.delete)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (BotoCoreError, ClientError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"uploaded {len(report.uploaded)} objects ({_size(report.uploaded_bytes)}), "
        f"{len(report.unchanged)} unchanged; repository {_size(report.total_bytes)} in all"
    )
    for key in report.stale:
        verb = "deleted" if report.deleted else "not in the repository (--delete removes it)"
        print(f"  {verb}: {key}")
    print(f"serve it: python -m serving.serve --repository {location.triton_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
