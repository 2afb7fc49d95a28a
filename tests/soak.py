"""A soak with faults: many edits at once, bad inputs among them, model processes killed
and callers giving up along the way, against a real server.

Every edit goes through the client library (`EditClient`, which retries what is
transient). Each 10th is a bad input of a kind the server must refuse as invalid; every
100 edits one model process is killed with SIGKILL and one caller abandons its edit.
The report counts what happened to each edit and why, samples the server's memory, and
checks that health was answered the whole time.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import psutil

from edit_pipeline.preprocess import decode_image
from pix2pix_client import DeadlineExceeded, EditClient, EditError, InvalidArgument
from pix2pix_client.contract import InvalidArgumentError
from serving.procfs import model_processes
from serving.tritonserver import TritonServer
from tests.bad_images import mutations, named_cases
from tests.serving import photo, png_bytes

# Killed in turn, one every 100 edits: the edit model and every kind of component.
VICTIMS = ("instruct_pix2pix", "unet_pix2pix", "vae_decoder", "text_encoder", "vae_encoder")
PROMPT = "make it snowy"


@dataclass
class SoakReport:
    """What happened to every edit, with the faults that were injected."""

    sent: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    retried: int = 0  # edits that succeeded after at least one failed attempt
    failures: list[str] = field(default_factory=list)  # unexplained: must stay empty
    kills: list[str] = field(default_factory=list)
    rss_mb: dict[int, float] = field(default_factory=dict)
    health_checks: int = 0
    health_unanswered: int = 0
    seconds: float = 0.0

    def table(self) -> str:
        rows = [
            ("edits sent", self.sent),
            ("succeeded", self.outcomes["succeeded"]),
            ("  of which after a retry", self.retried),
            ("refused as invalid (bad input sent on purpose)", self.outcomes["invalid"]),
            ("abandoned by their caller on purpose", self.outcomes["abandoned"]),
            ("failed, unexplained", len(self.failures)),
        ]
        lines = [f"{label:<48} {count:>6}" for label, count in rows]
        lines.append(
            f"{'model processes killed':<48} {len(self.kills):>6}  ({', '.join(self.kills)})"
        )
        lines += [
            f"server RSS at edit {n:<4}{'':<29} {mb:>6.0f} MB" for n, mb in self.rss_mb.items()
        ]
        lines.append(
            f"{'health checks answered':<48} {self.health_checks - self.health_unanswered:>6}"
            f" of {self.health_checks}"
        )
        lines.append(f"{'seconds':<48} {self.seconds:>6.0f}")
        return "\n".join(lines)


def server_rss_mb(server: TritonServer) -> float:
    """tritonserver and its model processes, resident memory in MB."""
    assert server.process is not None
    root = psutil.Process(server.process.pid)
    total = root.memory_info().rss
    for child in root.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / 1e6


def _bad_inputs(seed: int) -> itertools.cycle:
    """(what, image, keyword arguments) of bad requests, each kind in turn."""
    hostile = list(named_cases().values())
    broken = [data for _, data in mutations(200, seed) if not _decodes(data)]
    cases = [
        ("bad steps", None, {"num_inference_steps": 1001}),
        ("bad temperature", None, {"temperature": 0.0}),
        ("oversize prompt", None, {"prompt": "x" * 5000}),
        ("hostile file", hostile, {}),
        ("broken image", broken, {}),
    ]
    return itertools.cycle(cases)


def _decodes(data: bytes) -> bool:
    try:
        decode_image(data)
    except InvalidArgumentError:
        return False
    return True


def run_soak(server: TritonServer, edits: int, concurrency: int = 4, seed: int = 0) -> SoakReport:
    """Runs the soak and returns its report; raises nothing for failed edits."""
    rng = random.Random(seed)
    report = SoakReport()
    good = png_bytes(photo(48, 48))
    bad = _bad_inputs(seed)
    lock = threading.Lock()
    stop_health = threading.Event()
    victims = itertools.cycle(VICTIMS)

    def health() -> None:
        while not stop_health.wait(0.5):
            answered = True
            try:
                with EditClient(server.grpc_url, retries=0, timeout_s=5) as client:
                    client.health()
            except EditError:
                answered = False
            with lock:
                report.health_checks += 1
                report.health_unanswered += not answered

    def kill_one() -> None:
        assert server.process is not None
        model = next(victims)
        candidates = [p for p in model_processes(server.process.pid) if p.model == model]
        if candidates:
            victim = rng.choice(candidates)
            os.kill(victim.pid, signal.SIGKILL)
            report.kills.append(victim.instance)

    def one(index: int) -> None:
        with EditClient(server.grpc_url, retries=12, backoff_s=0.5, timeout_s=120) as client:
            if index % 100 == 50:
                # A caller that gives up after a moment: its deadline passes mid-edit.
                try:
                    client.edit(good, PROMPT, num_inference_steps=400, seed=index, timeout_s=0.5)
                except DeadlineExceeded:
                    outcome = "abandoned"
                else:
                    outcome = "not abandoned"
            elif index % 10 == 5:
                what, images, case = next(bad)
                options = dict(case)
                image = rng.choice(images) if images else good
                try:
                    client.edit(image, options.pop("prompt", PROMPT), seed=index, **options)
                except InvalidArgument:
                    outcome = "invalid"
                except EditError as error:
                    outcome = f"{what}: {type(error).__name__}: {error}"
                else:
                    outcome = f"{what}: accepted"
            else:
                try:
                    result = client.edit(good, PROMPT, num_inference_steps=3, seed=index)
                except EditError as error:
                    outcome = f"{type(error).__name__}: {error}"
                else:
                    outcome = "succeeded"
                    with lock:
                        report.retried += result.attempts > 1
        with lock:
            report.sent += 1
            if outcome in ("succeeded", "invalid", "abandoned"):
                report.outcomes[outcome] += 1
            else:
                report.failures.append(f"edit {index}: {outcome}"[:200])
            if report.sent % 100 == 0:
                report.rss_mb[report.sent] = server_rss_mb(server)
            if report.sent % 100 == 60:
                kill_one()

    checker = threading.Thread(target=health, daemon=True)
    checker.start()
    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(edits)))
    report.seconds = time.monotonic() - started
    stop_health.set()
    checker.join()
    return report
