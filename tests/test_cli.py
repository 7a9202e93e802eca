"""lowbit.cli (argparse types, cli_entry) and lowbit.runs.check_output_path."""

from __future__ import annotations

import argparse
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lowbit import cli
from lowbit.errors import UserError
from lowbit.runs import check_output_path


def _parser(type_fn) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(allow_abbrev=False, exit_on_error=True)
    parser.add_argument("--value", type=type_fn)
    return parser


@pytest.mark.parametrize(
    "type_fn, good, bad",
    [
        (cli.positive_int, {"1": 1, "640": 640}, ["0", "-1", "1.5", "x", ""]),
        (cli.non_negative_int, {"0": 0, "7": 7}, ["-1", "2.0", "seven"]),
        (cli.int_range(1, 999_999), {"1": 1, "999999": 999_999}, ["0", "1000000"]),
        (cli.imgsz, {"32": 32, "640": 640}, ["0", "16", "100", "-32", "64.0"]),
        (cli.positive_float, {"0.5": 0.5, "3": 3.0}, ["0", "-1", "nan", "inf", "x"]),
        (cli.unit_interval, {"0": 0.0, "1": 1.0, "0.45": 0.45}, ["-0.1", "1.01", "nan", "x"]),
    ],
)
def test_value_types(type_fn, good, bad, capsys):
    parser = _parser(type_fn)
    for text, value in good.items():
        assert parser.parse_args(["--value", text]).value == value
    for text in bad:
        with pytest.raises(SystemExit) as info:
            parser.parse_args([f"--value={text}"])
        assert info.value.code == 2
        assert "argument --value" in capsys.readouterr().err  # argparse names the flag


def test_existing_file(tmp_path, capsys):
    parser = _parser(cli.existing_file)
    real = tmp_path / "a.txt"
    real.write_text("x")
    assert parser.parse_args(["--value", str(real)]).value == real
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "gone")
    for bad in (tmp_path / "nope", tmp_path, dangling):
        with pytest.raises(SystemExit):
            parser.parse_args(["--value", str(bad)])
        assert "argument --value" in capsys.readouterr().err


def test_check_imgsz_raises_user_error_with_the_flag():
    assert cli.check_imgsz(640, "IMGSZ") == 640
    with pytest.raises(UserError) as info:
        cli.check_imgsz(100, "IMGSZ")
    assert info.value.flag == "IMGSZ"


def _entry(exc: BaseException | None = None, code: int = 0):
    @cli.cli_entry
    def main(argv=None):
        if exc is not None:
            raise exc
        return code

    return main


def test_cli_entry_return_codes(capsys):
    assert _entry(code=0)([]) == 0 and _entry(code=3)([]) == 3
    assert _entry(UserError("bad", flag="--x"))([]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert _entry(SystemExit(2))([]) == 2  # argparse's usage error
    assert _entry(SystemExit(None))([]) == 0  # --help


@pytest.mark.parametrize(
    "exc",
    [
        PermissionError(errno.EACCES, "Permission denied", "/ro/out.onnx"),
        NotADirectoryError(errno.ENOTDIR, "Not a directory", "/file/out.onnx"),
        IsADirectoryError(errno.EISDIR, "Is a directory", "/runs/out"),
        OSError(errno.EROFS, "Read-only file system", "/mnt/ro/x"),
    ],
)
def test_cli_entry_turns_path_errors_into_one_line(exc, capsys):
    assert _entry(exc)([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and exc.filename in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "exc",
    [
        OSError(errno.EACCES, "Permission denied"),  # no filename: not about a path the user gave
        OSError(errno.EIO, "Input/output error", "/dev/sda"),  # not a path problem
        ValueError("a bug"),
        KeyError("a bug"),
    ],
)
def test_cli_entry_keeps_tracebacks_of_bugs(exc):
    with pytest.raises(type(exc)):
        _entry(exc)([])


def test_cli_entry_on_a_real_unwritable_path(tmp_path, capsys):
    (tmp_path / "file").write_text("x")

    @cli.cli_entry
    def main(argv=None):
        (tmp_path / "file" / "out.txt").write_text("result")  # a parent that is a file
        return 0

    assert main([]) == 2
    assert str(tmp_path / "file" / "out.txt") in capsys.readouterr().err


@pytest.mark.parametrize("case", ["folder", "parent_is_file", "grandparent_is_file", "suffix", "exists", "unwritable"])
def test_check_output_path_rejects(case, tmp_path, monkeypatch):
    path = tmp_path / "out" / "result.json"
    expected = "--out"
    if case == "folder":
        path.mkdir(parents=True)
    elif case == "parent_is_file":
        (tmp_path / "out").write_text("x")
    elif case == "grandparent_is_file":
        (tmp_path / "out").write_text("x")
        path = tmp_path / "out" / "deeper" / "result.json"
    elif case == "suffix":
        path = tmp_path / "out" / "result.txt"
    elif case == "exists":
        path.parent.mkdir()
        path.write_text("{}")
        expected = "--overwrite"
    elif case == "unwritable":  # tests may run as root, which ignores folder modes
        monkeypatch.setattr(os, "access", lambda p, mode: False)
    with pytest.raises(UserError) as info:
        check_output_path(path, "--out", overwrite=False, suffix=".json")
    assert info.value.flag == expected


def test_check_output_path_accepts_new_and_overwritten_files(tmp_path):
    path = tmp_path / "a" / "b" / "result.json"
    assert check_output_path(path, "--out") == path
    assert not (tmp_path / "a").exists()  # nothing is created
    path.parent.mkdir(parents=True)
    path.write_text("{}")
    assert check_output_path(path, "--out", overwrite=True) == path


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_output_path_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    with pytest.raises(UserError) as info:
        check_output_path(folder / "x.json", "--out")
    assert info.value.flag == "--out"


def test_script_help_and_usage_errors_exit_cleanly():
    script = Path(__file__).resolve().parent.parent / "scripts/cv-models/make_calib_list.py"
    env = {**os.environ, "PYTHONPATH": str(script.parents[2])}
    ok = subprocess.run(
        [sys.executable, str(script), "--help"], check=False, capture_output=True, text=True, env=env, timeout=120
    )
    assert ok.returncode == 0 and "--eval-max-images" in ok.stdout
    bad = subprocess.run(
        [sys.executable, str(script), "--eval-max-images", "-5", "--out", "x.txt"],
        check=False, capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "--eval-max-images" in bad.stderr and "Traceback" not in bad.stderr
