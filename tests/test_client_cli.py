"""The `pix2pix` command: arguments, outputs, progress, JSON and exit codes.

Edits go to the gRPC stand-in of test_client_standin.py (these are unit tests; the
integration tests run a real tritonserver); connection failures are real refused
connections on an unused localhost port.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from PIL import Image

from pix2pix_client import contract
from pix2pix_client.cli import build_parser, main
from tests.test_client_standin import Failure, StandInTriton, png_bytes, serve

UNUSED_URL = "127.0.0.1:1"
RED = (200, 30, 40)


@pytest.fixture
def standin() -> StandInTriton:
    return StandInTriton()


@pytest.fixture
def url(standin: StandInTriton) -> Iterator[str]:
    with serve(standin) as address:
        yield address


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    path.write_bytes(png_bytes(RED))
    return path


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    directory = tmp_path / "photos"
    directory.mkdir()
    for index in range(5):
        (directory / f"photo{index}.png").write_bytes(png_bytes((index * 40, 10, 10)))
    (directory / "notes.txt").write_text("not an image, not an input")
    return directory


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("pix2pix")
    assert ": error: " in lines[0]
    return lines[0]


def test_every_contract_parameter_has_a_flag() -> None:
    args = vars(build_parser().parse_args(["edit", "a.png", "-p", "x"]))
    for parameter in contract.PARAMETERS:
        if parameter.name != "image":
            assert parameter.name in args
    for scheduler in contract.SCHEDULERS:
        parsed = build_parser().parse_args(["edit", "a.png", "-p", "x", "--scheduler", scheduler])
        assert parsed.scheduler == scheduler


def test_flags_parse_to_contract_names() -> None:
    command_line = (
        "edit a.png b.png -p snowy --steps 30 --cfg 8 --image-cfg 1.2 --temperature 0.7 "
        "--seed 9 --scheduler ddim --negative-prompt blurry --model instruct_pix2pix "
        "--url host:9001 --ssl --header authorization=Bearer --header x-a=b --timeout 30 "
        "--concurrency 8 --json"
    )
    args = build_parser().parse_args(shlex.split(command_line))
    assert args.inputs == ["a.png", "b.png"]
    assert args.prompt == "snowy"
    assert (args.num_inference_steps, args.guidance_scale, args.image_guidance_scale) == (
        30,
        8.0,
        1.2,
    )
    assert (args.temperature, args.seed, args.scheduler) == (0.7, 9, "ddim")
    assert args.negative_prompt == "blurry"
    assert (args.url, args.ssl, args.timeout, args.concurrency, args.json) == (
        "host:9001",
        True,
        30.0,
        8,
        True,
    )
    assert args.header == ["authorization=Bearer", "x-a=b"]


def test_url_default_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIX2PIX_URL", "triton.internal:8001")
    assert build_parser().parse_args(["health"]).url == "triton.internal:8001"
    monkeypatch.delenv("PIX2PIX_URL")
    assert build_parser().parse_args(["health"]).url == "localhost:8001"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--steps", "1"], "--steps: num_inference_steps=1 is out of range: allowed 2..1000"),
        (["--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
        (["--cfg", "20"], "--cfg: guidance_scale=20.0 is out of range: allowed 1..14"),
        (["--cfg", "nan"], "--cfg: guidance_scale=nan is not a finite number"),
        (["--image-cfg", "11"], "--image-cfg: image_guidance_scale=11.0 is out of range"),
        (["--temperature", "0"], "--temperature: temperature=0.0 is out of range"),
        (["--seed", "-3"], "--seed: seed=-3 is out of range: allowed 0..2^63-1"),
        (["--scheduler", "heun"], "argument --scheduler: invalid choice: 'heun'"),
        (["--model", "sdxl"], "argument --model: invalid choice: 'sdxl'"),
        (
            ["--model", "img2img", "--image-cfg", "1.5"],
            "--image-cfg: image_guidance_scale is not an input of img2img",
        ),
        (["--concurrency", "0"], "--concurrency=0 is out of range: allowed >= 1"),
        (["--timeout", "0"], "--timeout=0.0 is out of range: allowed > 0"),
        (["--retries", "-1"], "--retries=-1 is out of range: allowed >= 0"),
        (["--header", "no-equals-sign"], "--header 'no-equals-sign' is not KEY=VALUE"),
        (["--root-certificates", "/missing/ca.pem"], "given without ssl=True"),
        (["-o", "out.xyz"], "-o out.xyz: .xyz is no format the result is saved in: allowed"),
        (["--url", "localhost:99999"], "has port 99999: allowed 1..65535"),
        (["--ssl", "--root-certificates", "/missing/ca.pem"], "is not a readable file"),
    ],
)
def test_invalid_flag_values_exit_2_with_one_line(
    flags: list[str], expected: str, photo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The unused port proves nothing was sent: a request would have failed with exit 1.
    code = main(["edit", str(photo), "-p", "snowy", "--url", UNUSED_URL, *flags])
    captured = capsys.readouterr()
    assert code == 2
    assert expected in _one_error_line(captured.err)
    assert captured.out == ""


@pytest.mark.parametrize("command", ["api", "ui"])
@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--port", "99999"], "--port=99999 is out of range: allowed 1..65535"),
        (["--port", "0"], "--port=0 is out of range: allowed 1..65535"),
        (["--url", "http://localhost:8001"], "is an HTTP URL: allowed host:port"),
    ],
)
def test_served_pages_check_their_port_and_server_address(
    command: str, flags: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, *flags]) == 2
    assert expected in _one_error_line(capsys.readouterr().err)


def test_missing_prompt_and_missing_command_exit_2(
    photo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["edit", str(photo)]) == 2
    assert "the following arguments are required: -p/--prompt" in capsys.readouterr().err
    assert main([]) == 2
    assert "a command is required" in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["edit", "--help"]) == 0
    help_text = capsys.readouterr().out
    assert "exit codes" in help_text
    assert "2..1000" in help_text  # ranges come from the contract
    assert "euler_a" in help_text


@pytest.mark.parametrize(
    ("make_input", "expected"),
    [
        (lambda d: d / "missing.png", "missing.png: no such file or directory"),
        (lambda d: d, "no images in directory"),
    ],
)
def test_unusable_inputs_exit_2(
    make_input, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["edit", str(make_input(empty)), "-p", "x", "--url", UNUSED_URL])
    assert code == 2
    assert expected in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("command", ["edit", "health", "models"])
def test_refused_connection_exits_1(
    command: str, photo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arguments = [str(photo), "-p", "x", "-o", str(photo.with_name("out.png"))]
    extra = arguments if command == "edit" else []
    code = main([command, *extra, "--url", UNUSED_URL, "--retries", "0"])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 1
    assert f"server unavailable at {UNUSED_URL}" in line
    assert "Connection refused" in line
    assert not photo.with_name("out.png").exists()


def test_installed_command_exits_1_on_refused_connection() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "pix2pix_client", "health", "--url", UNUSED_URL, "--retries", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 1
    assert "server unavailable" in _one_error_line(completed.stderr)


def test_single_edit_writes_the_output_file(
    standin: StandInTriton, url: str, photo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = photo.with_name("snowy.png")
    code = main(
        [
            *["edit", str(photo), "-p", "make it snowy", "-o", str(output), "--url", url],
            *["--seed", "42", "--steps", "10", "--header", "Authorization=Bearer t0ken"],
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert Image.open(output).getpixel((0, 0)) == tuple(255 - c for c in RED)
    assert f"{photo} -> {output}  seed=42" in captured.out
    (request,) = standin.requests
    assert request.inputs["num_inference_steps"] == 10
    assert request.metadata["authorization"] == "Bearer t0ken"
    assert captured.err == ""


def test_single_edit_default_output_and_jpeg_output(
    url: str, photo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["edit", str(photo), "-p", "x", "--url", url]) == 0
    assert Image.open(tmp_path / "photo_edited.png").format == "PNG"
    assert main(["edit", str(photo), "-p", "x", "--url", url, "-o", "out.jpg"]) == 0
    assert Image.open(tmp_path / "out.jpg").format == "JPEG"


def test_directory_runs_concurrently_with_json_lines(
    standin: StandInTriton, url: str, photos: Path, tmp_path: Path, capsys
) -> None:
    standin.infer_delay_s = 0.1
    output = tmp_path / "edited"
    code = main(
        [
            *["edit", str(photos), "-p", "x", "-o", str(output), "--url", url],
            *["--json", "--concurrency", "2", "--model", "img2img", "--temperature", "0.5"],
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert sorted(Path(r["input"]).name for r in records) == [f"photo{i}.png" for i in range(5)]
    for record in records:
        assert Path(record["output"]) == output / Path(record["input"]).name
        assert Path(record["output"]).is_file()
        assert record["seed"] == 1234
        assert record["model"] == "img2img"
        assert record["latency_s"] >= 0.1
        assert record["parameters"] == {"prompt": "x", "temperature": 0.5}
    assert standin.max_in_flight == 2


def test_one_bad_input_among_many_exits_2_and_the_rest_are_written(
    url: str, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but truncated")
    bad = photos / "not-an-image.jpg"
    bad.write_text("hello")
    output = tmp_path / "out"
    code = main(["edit", str(photos), "-p", "x", "-o", str(output), "--url", url, "--json"])
    captured = capsys.readouterr()
    assert code == 2
    errors = [line for line in captured.err.splitlines() if line]
    assert len(errors) == 2
    assert any("not-an-image.jpg: image file" in line for line in errors)
    assert len(list(output.glob("photo*.png"))) == 5
    failed = [json.loads(line) for line in captured.out.splitlines() if '"error"' in line]
    assert {record["error"]["type"] for record in failed} == {"InvalidArgument"}


def test_server_invalid_argument_exits_2_server_error_exits_1(
    standin: StandInTriton, url: str, photo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    standin.script = [
        Failure(grpc.StatusCode.INVALID_ARGUMENT, "prompt='' is empty: allowed UTF-8 text")
    ]
    assert main(["edit", str(photo), "-p", "x", "--url", url, "-o", str(photo) + ".out.png"]) == 2
    assert "prompt='' is empty" in _one_error_line(capsys.readouterr().err)

    standin.script = [Failure(grpc.StatusCode.INTERNAL, "sampler failed:\nCUDA error")]
    assert main(["edit", str(photo), "-p", "x", "--url", url, "-o", str(photo) + ".out.png"]) == 1
    assert "sampler failed: CUDA error" in _one_error_line(capsys.readouterr().err)


def test_unavailable_server_stops_a_batch_at_the_first_failure(
    standin: StandInTriton, url: str, photos: Path, tmp_path: Path, capsys
) -> None:
    standin.script = [Failure(grpc.StatusCode.UNAVAILABLE, "draining") for _ in range(50)]
    code = main(
        [
            *["edit", str(photos), "-p", "x", "-o", str(tmp_path / "o"), "--url", url],
            *["--retries", "0", "--concurrency", "1"],
        ]
    )
    assert code == 1
    assert "server unavailable" in _one_error_line(capsys.readouterr().err)
    assert len(standin.requests) == 1


def test_outputs_that_would_collide_or_overwrite_inputs_exit_2(
    tmp_path: Path, photo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    twin = other / "photo.png"
    twin.write_bytes(png_bytes())
    code = main(["edit", str(photo), str(twin), "-p", "x", "-o", str(tmp_path / "out")])
    assert code == 2
    assert "would both be written to" in _one_error_line(capsys.readouterr().err)
    assert main(["edit", str(photo), "-p", "x", "-o", str(photo)]) == 2
    assert "would overwrite the input" in _one_error_line(capsys.readouterr().err)
    assert main(["edit", str(photo), str(twin), "-p", "x", "-o", str(photo)]) == 2
    assert "need an output directory" in _one_error_line(capsys.readouterr().err)


def test_health_and_models_commands(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["health", "--url", url]) == 0
    shown = capsys.readouterr().out
    assert f"server {url}: live=yes ready=yes" in shown
    assert "img2img           not ready" in shown

    assert main(["health", "--url", url, "--json"]) == 0
    health = json.loads(capsys.readouterr().out)
    assert health["models"] == {"instruct_pix2pix": True, "img2img": False}

    assert main(["models", "--url", url]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["NAME", "VERSION", "STATE", "REASON"]
    assert table[3].split() == ["unet_pix2pix", "UNAVAILABLE", "unloaded"]

    assert main(["models", "--url", url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] == "instruct_pix2pix"


def test_health_of_a_server_that_is_not_ready_exits_1(
    standin: StandInTriton, url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    standin.ready = False
    assert main(["health", "--url", url]) == 1
    assert "is not ready" in _one_error_line(capsys.readouterr().err)
