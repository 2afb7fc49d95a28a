"""`make demo` (serving.demo): weights -> export -> repository -> tritonserver -> an
edited astronaut, run for real against a temporary build folder."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export.presets import PRESET_RECORD
from model_repository.chain import BuiltModel
from serving import demo, serve

TIMED_STEPS = ("build", "export", "repository", "server start", "edit", "server stop", "total")


def test_demo_edits_the_astronaut_and_reports_timings(
    tiny_preset: Path, tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build_dir = tmp_path / "build"
    # The session's export of the same preset folder: the demo finds it current and goes
    # straight to the repository, as `make demo` does on its second run.
    shutil.copytree(tiny_export, build_dir / "onnx" / tiny_preset.name)
    out_dir = tmp_path / "out"
    argv = ["--model", str(tiny_preset), "--build-dir", str(build_dir), "--out", str(out_dir)]

    assert demo.main([*argv, "--steps", "2", "--seed", "5"]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()

    photo = np.asarray(demo.astronaut())
    with Image.open(out_dir / "edited.png") as edited_file:
        assert edited_file.format == "PNG"
        edited = np.asarray(edited_file.convert("RGB"))
    assert edited.shape == photo.shape == (512, 512, 3)

    with Image.open(out_dir / "compare.png") as compare_file:
        compare = np.asarray(compare_file.convert("RGB"))
    # input | output side by side, parameters printed on white underneath.
    margin, gap = 8, 8
    assert compare.shape[1] == margin * 2 + 512 + gap + 512
    assert compare.shape[0] > margin + 512 + margin + 3 * 14
    assert np.array_equal(compare[margin : margin + 512, margin : margin + 512], photo)
    right = margin + 512 + gap
    assert np.array_equal(compare[margin : margin + 512, right : right + 512], edited)
    text_area = compare[margin + 512 + margin :]
    assert (text_area < 128).any(), "no text under the images"

    assert f"edited:  {out_dir / 'edited.png'}  (instruct_pix2pix, " in printed
    assert "seed 5)" in printed
    assert f"compare: {out_dir / 'compare.png'}  (input | output)" in lines
    assert lines.count(demo.RANDOM_WEIGHTS_NOTE) == 1
    assert "tritonserver stopped" in lines

    table = lines[lines.index("timings:") + 1 :]
    assert [line.split()[0] for line in table] == [step.split()[0] for step in TIMED_STEPS]
    seconds = {}
    for step, line in zip(TIMED_STEPS, table, strict=True):
        match = re.match(rf"  {step}\s+(\d+\.\d\d) s", line)
        assert match, line
        seconds[step] = float(match.group(1))
    assert seconds["server start"] > 0 and seconds["edit"] > 0
    assert seconds["total"] == pytest.approx(
        sum(v for k, v in seconds.items() if k != "total"), abs=0.05
    )
    assert "skipped: MODEL given" in table[0]


def test_demo_reports_a_missing_model_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = demo.main(["--model", str(tmp_path / "absent"), "--build-dir", str(tmp_path)])
    assert code == 2
    assert "no such folder" in capsys.readouterr().err


@pytest.mark.parametrize("command", [demo.main, serve.main], ids=["demo", "serve"])
def test_a_read_only_build_folder_is_one_line(
    command, read_only_copy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "build").mkdir()
    build_dir = read_only_copy(tmp_path / "build")
    assert command(["--preset", "tiny", "--build-dir", str(build_dir)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error
    assert "Read-only file system" in error or "Permission denied" in error


def test_random_weights_are_recognised_by_the_preset_marker(tmp_path: Path) -> None:
    preset = tmp_path / "tiny"
    (preset / "instruct-pix2pix").mkdir(parents=True)
    (preset / PRESET_RECORD).write_text("{}")
    checkpoint = tmp_path / "instruct-pix2pix"
    checkpoint.mkdir()

    def built(weights: Path) -> BuiltModel:
        return BuiltModel("m", weights, tmp_path, None, tmp_path)

    assert built(preset).random_weights
    assert built(preset / "instruct-pix2pix").random_weights
    assert not built(checkpoint).random_weights
