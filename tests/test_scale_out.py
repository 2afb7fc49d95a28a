"""Past one machine: the tiny preset's lean repository (one pipeline, no streaming models)
published to an S3-compatible store (moto_server on loopback), served from there by two
`serving.serve` replicas behind HAProxy (the configuration of deploy/balancer.py), which
balances on Triton's readiness.

The failover test sends 60 edits at concurrency 4 through the balancer while one replica
is killed with SIGKILL and started again and the other is drained with SIGTERM: every
edit must come back, identical to the same edit made once directly, with each retry
counted and a table of where each attempt ran.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from deploy.balancer import ATTEMPT_HEADER, Replica, haproxy_config, replica_states
from deploy.check import adapter_series
from edit_pipeline.cpu_graph import CPU_GRAPH_DIR
from model_repository.publish import S3Location, publish
from model_repository.publish import main as publish_main
from pix2pix_client import EditClient, EditError
from serving.procfs import children, model_processes
from serving.tritonserver import TritonServer, free_port
from tests.serving import photo, png_bytes

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "models"
PREFIX = "tiny/v1"
PROMPT = "make it snowy"
# Long enough (about a second under load here) that the faults land on edits in flight.
FAILOVER_STEPS = 40
THROUGHPUT_STEPS = 20
EDITS = 60
CONCURRENCY = 4
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "scale-out-test",
    "AWS_SECRET_ACCESS_KEY": "scale-out-test",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _ensure_haproxy() -> str:
    """HAProxy from Debian's packages, installed when missing (the tests run as root in CI)."""
    found = shutil.which("haproxy")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "haproxy"]):
            subprocess.run(command, check=False, capture_output=True, timeout=600)
        found = shutil.which("haproxy")
    if not found:
        pytest.skip("haproxy is not installed and could not be installed (apt-get as root)")
    return found


@pytest.fixture(scope="module", autouse=True)
def credentials() -> Iterator[None]:
    """The standard AWS variables, for boto3 here and for the replicas' tritonserver."""
    saved = {name: os.environ.get(name) for name in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def object_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An S3-compatible endpoint on loopback (moto_server) with an empty bucket."""
    import boto3

    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        client = boto3.client("s3", endpoint_url=endpoint)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except Exception:
                assert process.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "moto_server did not answer in 30 s"
                time.sleep(0.2)
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def published(object_store: str, lean_repository: Path, summary) -> S3Location:
    location = S3Location(BUCKET, PREFIX, object_store)
    started = time.perf_counter()
    report = publish(lean_repository, location, log=lambda line: None)
    summary(
        "object storage (moto_server on loopback)",
        f"publish: {len(report.uploaded)} objects, {report.uploaded_bytes / 1e6:.1f} MB in "
        f"{time.perf_counter() - started:.1f} s -> {location.triton_url}",
    )
    return location


# --------------------------------------------------------------------------- replicas


@dataclass
class ServeProcess:
    """One `python -m serving.serve` replica on loopback ports of its own."""

    name: str
    repository: str
    log_dir: Path
    grpc_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    starts: int = 0

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self) -> None:
        self.starts += 1
        log = self.log_dir / f"{self.name}-{self.starts}.log"
        command = [
            sys.executable, "-m", "serving.serve",
            "--repository", self.repository,
            "--grpc-port", str(self.grpc_port),
            "--http-port", str(self.http_port),
            "--metrics-port", str(self.metrics_port),
            "--log-file", str(log),
            "--grace", "60",
        ]  # fmt: skip
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(
            command,
            stdout=(self.log_dir / f"{self.name}-{self.starts}.out").open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=ROOT,
        )

    def ready(self) -> bool:
        url = f"http://127.0.0.1:{self.http_port}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout_s: float = 300) -> float:
        """Seconds from start until ready."""
        assert self.process is not None
        deadline = self.started_at + timeout_s
        while not self.ready():
            assert self.process.poll() is None, self.output()
            assert time.monotonic() < deadline, f"{self.name} not ready\n{self.output()}"
            time.sleep(0.1)
        return time.monotonic() - self.started_at

    def output(self) -> str:
        return (self.log_dir / f"{self.name}-{self.starts}.out").read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL to every process of the replica at once, as when its machine or
        container dies: the supervisor, tritonserver and the model processes (which
        outlive a killed tritonserver)."""
        assert self.process is not None
        tritonservers = children(self.process.pid)
        stubs = [stub for pid in tritonservers for stub in model_processes(pid)]
        for pid in [self.process.pid, *tritonservers, *(stub.pid for stub in stubs)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()
        # Nothing of the replica is left to remove its model processes' shared memory.
        for stub in stubs:
            with contextlib.suppress(FileNotFoundError):
                (Path("/dev/shm") / stub.shm_region).unlink()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="module")
def replicas(
    published: S3Location, tmp_path_factory: pytest.TempPathFactory, summary
) -> Iterator[list[ServeProcess]]:
    """Two replicas serving the published repository, started together."""
    log_dir = tmp_path_factory.mktemp("replicas")
    started = [ServeProcess(name, published.triton_url, log_dir) for name in ("A", "B")]
    try:
        for replica in started:
            replica.start()
        seconds = [replica.wait_ready() for replica in started]
        summary(
            "replica cold start (S3 download + model load, tiny preset)",
            "two replicas started together on the 2 cores: ready in "
            + ", ".join(f"{r.name} {s:.1f} s" for r, s in zip(started, seconds, strict=True)),
        )
        yield started
    finally:
        for replica in started:
            replica.stop()


@dataclass
class Balancer:
    url: str
    one_replica_url: str
    stats_socket: str
    log: Path
    process: subprocess.Popen[bytes]

    def states(self) -> dict[str, dict[str, str]]:
        return {
            server: row
            for (backend, server), row in replica_states(self.stats_socket).items()
            if backend == "replicas"
        }

    def attempts(self) -> dict[str, tuple[str, int]]:
        """Attempt id -> (replica that answered, HTTP status), from the balancer's log."""
        found = {}
        for line in self.log.read_text(errors="replace").splitlines():
            fields = line.split()
            if len(fields) == 7 and fields[6].startswith('"{'):
                attempt = fields[6].strip('"{}')
                found[attempt] = (fields[2], int(fields[3]))
        return found


@pytest.fixture(scope="module")
def balancer(
    replicas: list[ServeProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Balancer]:
    haproxy = _ensure_haproxy()
    folder = tmp_path_factory.mktemp("haproxy")
    members = [
        Replica(f"replica_{r.name}", "127.0.0.1", r.grpc_port, r.http_port) for r in replicas
    ]
    listen, one_replica = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    config = folder / "haproxy.cfg"
    stats = str(folder / "stats.sock")
    config.write_text(
        haproxy_config(
            listen, members, extra_listeners={one_replica: members[:1]}, stats_socket=stats
        )
    )
    log = folder / "haproxy.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [haproxy, "-db", "-f", str(config)], stdout=output, stderr=subprocess.STDOUT
        )
    try:
        running = Balancer(listen, one_replica, stats, log, process)
        deadline = time.monotonic() + 30
        while not Path(stats).exists() or any(
            row["status"] != "UP" for row in running.states().values()
        ):
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield running
    finally:
        process.terminate()
        process.wait(timeout=30)


# --------------------------------------------------------------------------- edits


@pytest.fixture(scope="module")
def image() -> bytes:
    return png_bytes(photo(64, 64))


def _edit(url: str, image: bytes, steps: int, attempt: str = "") -> bytes:
    headers = {ATTEMPT_HEADER: attempt} if attempt else None
    with EditClient(url, retries=0, timeout_s=120, headers=headers) as client:
        return client.edit(image, PROMPT, seed=7, num_inference_steps=steps).png


def test_s3_locations_read_both_forms_triton_accepts() -> None:
    aws = S3Location.parse("s3://models/sd15/v1")
    assert (aws.bucket, aws.prefix, aws.endpoint_url) == ("models", "sd15/v1", None)
    assert aws.triton_url == "s3://models/sd15/v1"
    local = S3Location.parse("s3://127.0.0.1:9000/models/tiny/")
    assert (local.endpoint_url, local.prefix) == ("http://127.0.0.1:9000", "tiny")
    assert local.triton_url == "s3://127.0.0.1:9000/models/tiny"
    tls = S3Location.parse("s3://https://store.example:443/models/tiny")
    assert tls.endpoint_url == "https://store.example:443"
    assert tls.triton_url == "s3://https://store.example:443/models/tiny"
    given = S3Location.parse("s3://models/tiny", "https://store.example:443")
    assert given.triton_url == tls.triton_url
    with pytest.raises(ValueError, match="no bucket"):
        S3Location.parse("s3://")
    with pytest.raises(ValueError, match="not an s3"):
        S3Location.parse("/models/tiny")


def test_publish_uploads_the_repository_then_skips_what_is_unchanged(
    published: S3Location, lean_repository: Path
) -> None:
    import boto3

    every = [p for p in lean_repository.rglob("*") if p.is_file()]
    # The graphs optimized for this machine's CPU stay here (model_repository/publish.py).
    files = [p for p in every if CPU_GRAPH_DIR not in p.relative_to(lean_repository).parts]
    assert len(files) < len(every)
    client = boto3.client("s3", endpoint_url=published.endpoint_url)
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=PREFIX + "/")["Contents"]
    assert len(listed) == len(files)
    assert not any(f"/{CPU_GRAPH_DIR}/" in item["Key"] for item in listed)
    again = publish(lean_repository, published, log=lambda line: None)
    assert again.uploaded == [] and len(again.unchanged) == len(files)
    # A changed file is uploaded again, alone.
    changed = S3Location(BUCKET, "tiny/changed", published.endpoint_url)
    publish(lean_repository, changed, log=lambda line: None)
    head = client.head_object(Bucket=BUCKET, Key="tiny/changed/repository.json")
    assert len(head["Metadata"]["sha256"]) == 64
    client.put_object(Bucket=BUCKET, Key="tiny/changed/repository.json", Body=b"{}")
    client.put_object(Bucket=BUCKET, Key="tiny/changed/old_model/config.pbtxt", Body=b"")
    third = publish(lean_repository, changed, delete=True, log=lambda line: None)
    assert [entry.relative for entry in third.uploaded] == ["repository.json"]
    assert third.deleted == ["tiny/changed/old_model/config.pbtxt"]


def test_publish_marks_empty_folders_and_prints_what_it_uploaded(
    object_store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """S3 has no empty folders, and Triton needs every version folder to exist."""
    import boto3

    repository = tmp_path / "repository"
    (repository / "empty_version" / "1").mkdir(parents=True)
    (repository / "empty_version" / "config.pbtxt").write_text('name: "empty_version"\n')
    (repository / "repository.json").write_text("{}\n")
    destination = f"s3://{BUCKET}/markers"
    code = publish_main([str(repository), destination, "--endpoint-url", object_store])
    printed = capsys.readouterr().out
    assert code == 0, printed
    keys = {
        item["Key"]
        for item in boto3.client("s3", endpoint_url=object_store).list_objects_v2(
            Bucket=BUCKET, Prefix="markers/"
        )["Contents"]
    }
    assert keys == {
        "markers/empty_version/1/",
        "markers/empty_version/config.pbtxt",
        "markers/repository.json",
    }
    assert "marker    markers/empty_version/1/" in printed
    assert "uploaded 3 objects" in printed
    host = object_store.removeprefix("http://")
    assert f"--repository s3://{host}/{BUCKET}/markers" in printed


def test_an_edit_served_from_s3_equals_the_edit_served_from_the_local_folder(
    replicas: list[ServeProcess], tiny_server: TritonServer, image: bytes
) -> None:
    from_s3 = _edit(replicas[0].grpc_url, image, THROUGHPUT_STEPS)
    from_folder = _edit(tiny_server.grpc_url, image, THROUGHPUT_STEPS)
    assert from_s3.startswith(b"\x89PNG") and from_s3 == from_folder


def _queue_counters(replica: ServeProcess) -> tuple[float, float]:
    """(queue microseconds, edits completed) as the prometheus-adapter rule of deploy/k8s
    reads them: the queue time of every edit model; the streaming models' successful
    requests where they are served (every edit runs there), the unary models' otherwise."""
    url = f"http://127.0.0.1:{replica.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    queue = 0.0
    success: dict[bool, float] = {}
    for line in text.splitlines():
        model = re.search(r'model="((?:instruct_pix2pix|img2img)(_stream)?)"', line)
        if model and line.startswith("nv_inference_queue_duration_us{"):
            queue += float(line.rsplit(" ", 1)[1])
        elif model and line.startswith("nv_inference_request_success{"):
            streaming = model.group(2) is not None
            success[streaming] = success.get(streaming, 0.0) + float(line.rsplit(" ", 1)[1])
    return queue, success.get(True, success.get(False, 0.0))


def _run_edits(url: str, image: bytes, count: int) -> float:
    """Edits per second for `count` edits at concurrency 4."""
    started = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        results = list(pool.map(lambda _: _edit(url, image, THROUGHPUT_STEPS), range(count)))
    assert all(png.startswith(b"\x89PNG") for png in results)
    return count / (time.perf_counter() - started)


def test_throughput_with_one_and_two_replicas(
    balancer: Balancer, replicas: list[ServeProcess], image: bytes, summary
) -> None:
    """The same load through the balancer to one replica and to two, interleaved in rounds.
    On 2 cores both replicas share the same cores: this measures what the balancer and a
    second tritonserver cost or give here, not what a second machine would add."""
    _run_edits(balancer.url, image, CONCURRENCY)  # every model has run once
    # The series the autoscaler's prometheus-adapter rule reads, as a replica exports them.
    with urllib.request.urlopen(f"http://127.0.0.1:{replicas[0].metrics_port}/metrics") as page:
        exported = page.read().decode()
    for series in adapter_series():
        assert f'{series}{{model="instruct_pix2pix"' in exported, series
    figures: dict[str, list[float]] = {"1 replica": [], "2 replicas": []}
    queue_ms: dict[str, list[float]] = {"1 replica": [], "2 replicas": []}
    for _ in range(3):
        for label, url in (("1 replica", balancer.one_replica_url), ("2 replicas", balancer.url)):
            before = [_queue_counters(r) for r in replicas]
            figures[label].append(_run_edits(url, image, 2 * CONCURRENCY))
            after = [_queue_counters(r) for r in replicas]
            queued = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
            served = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
            queue_ms[label].append(queued / 1000 / max(served, 1))
    for label, rounds in figures.items():
        summary(
            "throughput through the balancer (tiny, 64x64, 20 steps, concurrency 4, 2 cores)",
            f"{label:<10}: {sorted(rounds)[1]:.2f} edits/s median of "
            f"{', '.join(f'{r:.2f}' for r in rounds)}; queue time per edit "
            f"{sorted(queue_ms[label])[1]:.0f} ms (the HPA's signal)",
        )
    # With one replica, 4 edits meet 2 edit instances: half of them wait for one.
    assert sorted(queue_ms["1 replica"])[1] > sorted(queue_ms["2 replicas"])[1]


@dataclass
class Attempt:
    edit: int
    number: int
    started: float
    error: str = ""


def test_failover_drain_and_kill_lose_no_edit(
    balancer: Balancer, replicas: list[ServeProcess], image: bytes, summary
) -> None:
    replica_a, replica_b = replicas
    expected = _edit(replica_a.grpc_url, image, FAILOVER_STEPS)
    attempts: list[Attempt] = []
    results: dict[int, bytes] = {}
    done = threading.Semaphore(0)
    b_back = threading.Event()
    events: list[tuple[float, str]] = []
    clock = time.monotonic()

    def note(what: str) -> None:
        events.append((time.monotonic() - clock, what))

    def one_edit(index: int) -> None:
        # The second half waits until the killed replica is back, so that the drain of
        # the other one happens with a replica to go to.
        if index >= EDITS // 2:
            b_back.wait(timeout=300)
        for number in range(1, 21):
            attempt = Attempt(index, number, time.monotonic() - clock)
            attempts.append(attempt)
            try:
                results[index] = _edit(balancer.url, image, FAILOVER_STEPS, f"{index}.{number}")
                break
            except EditError as error:
                attempt.error = f"{type(error).__name__}: {error}"[:70]
                if not error.retryable:
                    break
                time.sleep(0.1 * number)
        done.release()

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        futures = [pool.submit(one_edit, index) for index in range(EDITS)]
        for _ in range(8):
            done.acquire()
        # Kill B while it has an edit in flight.
        while int(balancer.states()["replica_B"]["scur"]) == 0:
            time.sleep(0.02)
        in_flight_on_b = int(balancer.states()["replica_B"]["scur"])
        note(f"SIGKILL to every process of replica B ({in_flight_on_b} edits in flight there)")
        killed_at = time.monotonic() - clock
        replica_b.kill()
        replica_b.start()
        note("replica B started again")
        restart_s = replica_b.wait_ready()
        note(f"replica B ready ({restart_s:.1f} s after its start)")
        while balancer.states()["replica_B"]["status"] != "UP":
            time.sleep(0.05)
        note("the balancer sends to replica B again")
        b_back.set()
        # Drain A once B has taken edits again, while A has one in flight.
        served_before = int(balancer.states()["replica_B"]["stot"])
        while int(balancer.states()["replica_B"]["stot"]) < served_before + 3:
            time.sleep(0.05)
        while int(balancer.states()["replica_A"]["scur"]) == 0:
            time.sleep(0.02)
        note("SIGTERM to replica A (drain)")
        drain_started = time.monotonic() - clock
        replica_a.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        while (state := balancer.states()["replica_A"])["status"] == "UP":
            time.sleep(0.02)
        note(f"the balancer took replica A out: check {state['check_status']} {state['last_chk']}")
        for future in futures:
            future.result()
        exit_code = replica_a.process.wait(timeout=120)  # type: ignore[union-attr]
        note(f"replica A exited with {exit_code}")

    routed = balancer.attempts()

    def ran_on(attempt: Attempt) -> str:
        logged = routed.get(f"{attempt.edit}.{attempt.number}")
        if logged is not None:
            return logged[0].removeprefix("replica_")
        # HAProxy writes no log line for a stream whose replica died under it; every
        # attempt that reached a live replica has one.
        return "B killed" if attempt.error and attempt.started < killed_at else "?"

    rows = []
    for index in range(EDITS):
        mine = sorted((a for a in attempts if a.edit == index), key=lambda a: a.number)
        where = [ran_on(a) for a in mine]
        retried = "; ".join(f"#{a.number} {a.error}" for a in mine if a.error)
        rows.append(f"{index:>4} {len(mine):>8}  {' -> '.join(where):<22} {retried}")
    retries = sum(1 for a in attempts if a.error)
    summary(
        "failover: 60 edits at concurrency 4 through HAProxy, B killed and restarted, A drained",
        "\n".join(
            [
                *(f"  t={t:6.1f} s  {what}" for t, what in events),
                "edit attempts  ran on       retried because",
                *rows,
                f"{len(results)} of {EDITS} edits returned, every one identical to the direct "
                f"edit: {all(png == expected for png in results.values())}; "
                f"{retries} attempts retried; replica B restart: ready in {restart_s:.1f} s",
            ]
        ),
    )
    assert len(results) == EDITS, "an edit was lost"
    assert all(png == expected for png in results.values())
    assert exit_code == 0
    # The kill failed the edits in flight on B; their retries succeeded elsewhere.
    assert 1 <= sum(ran_on(a) == "B killed" for a in attempts) <= in_flight_on_b + 1
    assert "?" not in {ran_on(a) for a in attempts}
    # After its restart B served edits again; once A's drain began, nothing new ran on A
    # past the balancer's next check.
    assert any(ran_on(a) == "B" and a.started > killed_at + restart_s for a in attempts)
    late_on_a = [a for a in attempts if a.started > drain_started + 1.5 and ran_on(a) == "A"]
    assert not late_on_a, late_on_a
