"""Every command turns any bad input into one line and a non-zero exit, never a traceback.

Each command is fed, wherever it reads a file, a binary file, an empty file, a directory and a
wrong-schema YAML, and out-of-range numbers where it takes them (issue 13, item 6). The inputs
are refused before anything is started (no broker, no training).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedfmx_cli.main import app

BadFile = Callable[[Path], Path]


def binary_file(tmp: Path) -> Path:
    path = tmp / "binary.yaml"
    path.write_bytes(os.urandom(512) + b"\xff\xfe\x00")
    return path


def empty_file(tmp: Path) -> Path:
    path = tmp / "empty.yaml"
    path.write_bytes(b"")
    return path


def directory(tmp: Path) -> Path:
    path = tmp / "a-directory.yaml"
    path.mkdir()
    return path


def wrong_schema(tmp: Path) -> Path:
    path = tmp / "wrong.yaml"
    path.write_text("protocol:\n  num_tasks: many\nbogus_section: {a: 1}\n")
    return path


def missing(tmp: Path) -> Path:
    return tmp / "does-not-exist.yaml"


def alias_bomb(tmp: Path) -> Path:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 12)]
    path = tmp / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


BAD_FILES = [binary_file, empty_file, directory, wrong_schema, missing, alias_bomb]

FILE_COMMANDS: list[tuple[str, str]] = [
    ("simulate --fleet", "simulate --fleet {f}"),
    ("simulate --transport inproc", "simulate --transport inproc --fleet {f}"),
    ("serve --fleet", "serve --fleet {f}"),
    ("join --config", "join --config {f}"),
    ("status --fleet", "status --fleet {f}"),
    ("status --state", "status --state {f}"),
    ("provision --fleet", "provision --out {tmp}/out --fleet {f} --devices 2"),
    ("export --checkpoint", "export --checkpoint {f} --out {tmp}/m.onnx"),
    ("predict --model", "predict --model {f} --input {f}"),
    ("predict --profile", "predict --model {f} --input {f} --profile {f}"),
    ("bench fcil --fleet", "bench fcil --fleet {f} --out {tmp}/b"),
    ("doctor --config", "doctor --config {f}"),
    ("rollback --fleet", "rollback --to 0 --fleet {f}"),
    ("rollback --state", "rollback --to 0 --state {f}"),
    ("devices list --credentials", "devices list --credentials {f}"),
    (
        "enrol --ca",
        "enrol --device-id d1 --fleet-name f --enrol-url mqtts://127.0.0.1:9 --ca {f} "
        "--token t --out {tmp}/e --wait 1",
    ),
    ("camera-demo --data-path", "camera-demo {tmp}/demo --data-path {f}"),
]
"""Each command line with `{f}` where the bad file goes."""

OUT_OF_RANGE = [
    ["provision", "--out", "{tmp}/p", "--devices", "-3"],
    ["provision", "--out", "{tmp}/p", "--devices", "0"],
    ["provision", "--out", "{tmp}/p", "--devices", "2", "--port", "70000"],
    ["simulate", "--method", "bogus"],
    ["simulate", "--seed", "not-a-number"],
    ["predict", "--model", "{tmp}/m", "--input", "{tmp}/i", "--threads", "0"],
    ["export", "--checkpoint", "{tmp}/c", "--out", "{tmp}/o", "--calibration-samples", "-1"],
]


def assert_one_line_refusal(arguments: list[str]) -> None:
    result = CliRunner().invoke(app, arguments)
    shown = result.output
    assert result.exit_code != 0, f"{arguments} exited 0: {shown}"
    assert "Traceback" not in shown, shown
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{arguments} raised {result.exception!r}"
    )
    assert "unexpected" not in shown, f"{arguments}: an unforeseen error reached the user: {shown}"


@pytest.mark.parametrize("bad", BAD_FILES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("command", FILE_COMMANDS, ids=lambda c: c[0])
def test_every_command_refuses_a_bad_file_in_one_line(
    tmp_path: Path, command: tuple[str, str], bad: BadFile
) -> None:
    path = bad(tmp_path)
    line = command[1].format(f=path, tmp=tmp_path)
    assert_one_line_refusal(line.split())


@pytest.mark.parametrize("arguments", OUT_OF_RANGE, ids=lambda a: " ".join(a[:3]))
def test_out_of_range_numbers_and_unknown_names_are_refused_in_one_line(
    tmp_path: Path, arguments: list[str]
) -> None:
    assert_one_line_refusal([a.replace("{tmp}", str(tmp_path)) for a in arguments])
