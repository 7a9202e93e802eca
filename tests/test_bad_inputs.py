"""Bad inputs across the card's commands: each gives one clear error, a non-zero exit and no result file.

A table of cases, each run through the script's ``main([...])`` (a bash wrapper through ``bash``) on
tiny inputs. For every refused input the test checks: the exit status, exactly one ``error:`` line
(the last line of stderr; argparse prints its usage above it) that names the expected flag, env var
or file, no traceback, and none of the outputs the command would write. The few valid-but-unusual
inputs (``#`` in a file name, ``OVERWRITE=true``) must succeed.

``pytest -s tests/test_bad_inputs.py`` prints the table: case, flag, outcome.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_evaluate import IMGSZ, constant_output_model, make_dataset, oracle_raw_output

from lowbit import runs

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts" / "cv-models"
EVAL = "scripts/cv-models/eval_yolov10m_onnx_coco.py"
QUANTIZE = "scripts/cv-models/quantize_yolov10m_onnx.py"
CALIB_NPY = "scripts/cv-models/make_yolov10m_calib_npy.py"
CALIB_LIST = "scripts/cv-models/make_calib_list.py"
SMOKE = "models/cv-models/helpers/run_random_onnx_inference.py"
EXPORT = "scripts/cv-models/export_yolov10_raw_onnx.py"
STATS = "scripts/cv-models/onnx_model_stats.py"
INSPECT = "scripts/cv-models/inspect_qdq_model.py"
TORCH_SWEEP = "scripts/cv-models/yolov10m_layer_sensitivity.py"
SCHEMES = "scripts/cv-models/make_yolov10m_candidate_schemes.py"
MATERIALIZE = "scripts/cv-models/materialize_yolov10m_lowbit_candidates.py"
WORKFLOW = "scripts/cv-models/run_yolov10m_lowbit_workflow.py"
COMPARE = "scripts/cv-models/compare_sensitivity_reports.py"
SWEEP_WRAPPER = "scripts/cv-models/run_yolov10m_layer_sensitivity_sweep.sh"


@dataclass
class Inputs:
    """Tiny valid inputs shared by every case; each case breaks one thing."""

    root: Path
    model: Path  # raw-head layout, [1, 3, 64, 64] -> [1, 66, 84]
    nan_model: Path  # the same layout, every output NaN
    dynamic_model: Path  # input [1, 3, h, w]
    data: Path  # COCO root: val2017/ + annotations/instances_val2017.json
    calib: Path  # float32 [2, 3, 64, 64]
    images: list[Path]  # three JPEGs
    image_list: Path  # their absolute paths, one per line


@dataclass
class Case:
    """One input and what must happen.

    Attributes:
        name: what is wrong with the input.
        script: repo-relative script (``.py``: called as ``main(argv)``; ``.sh``: run by bash with ``argv`` as env).
        flag: the flag, env var or file role the error must name.
        argv: ``(inputs, case dir) -> argv`` (or env for a wrapper); may create files in the case dir.
        outputs: ``(inputs, case dir) -> paths`` that must not exist afterwards (or must, when ``rc`` is 0).
        rc: expected exit status; 0 for valid-but-unusual inputs.
        in_error: ``(inputs, case dir) -> texts`` the error line must also contain (paths it names).
        check: for ``rc`` 0, ``(stdout, case dir) -> None`` asserting what was done.
    """

    name: str
    script: str
    flag: str
    argv: Callable[[Inputs, Path], list[str] | dict[str, str]]
    outputs: Callable[[Inputs, Path], list[Path]] = lambda i, t: []
    rc: int = 2
    in_error: Callable[[Inputs, Path], list[str]] = lambda i, t: []
    check: Callable[[str, Path], None] | None = None
    setup: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------------
# small input makers (each writes into the case dir and returns the path)


def _write(path: Path, content: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _npy(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)
    return path


def _nan_calib(t: Path) -> Path:
    data = np.random.default_rng(0).random((2, 3, IMGSZ, IMGSZ), dtype=np.float32)
    data[1, 0, 5, 5] = np.nan
    return _npy(t / "nan.npy", data)


def _npz(t: Path) -> Path:
    path = t / "calib.npz"
    np.savez(path, images=np.zeros((1, 3, IMGSZ, IMGSZ), np.float32))
    return path


def _a_file(t: Path) -> Path:
    return _write(t / "a-file", "x")


def _read_only_dir(t: Path) -> Path:
    folder = t / "read-only"
    folder.mkdir(parents=True)
    folder.chmod(0o555)
    return folder


def _annotations(t: Path, inputs: Inputs, mutate: Callable[[dict], None]) -> Path:
    """A copy of the dataset whose annotations file is changed by ``mutate``; returns the data root."""
    root = t / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").symlink_to(inputs.data / "val2017")
    ann = json.loads((inputs.data / "annotations" / "instances_val2017.json").read_text())
    mutate(ann)
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(ann))
    return root


def _drop_file_name(ann: dict) -> None:
    del ann["images"][1]["file_name"]


def _drop_annotations(ann: dict) -> None:
    ann["annotations"] = []


def _scheme_dir(t: Path, content: str) -> Path:
    schemes = t / "run" / "schemes"
    _write(schemes / "scheme_k0.json", json.dumps({"k": 0, "nodes_to_exclude": []}))
    _write(schemes / "scheme_k2.json", content)
    return schemes


def _argv_dumper(t: Path) -> Path:
    """An executable standing in for PYTHON: prints each argument on its own line."""
    path = _write(t / "dump-argv", '#!/bin/sh\nfor a in "$@"; do printf \'%s\\n\' "$a"; done\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# the argv of a command that would work, per script


def _eval(i: Inputs, t: Path, *extra: str, model: Path | None = None, data: Path | None = None) -> list[str]:
    return ["--onnx-path", str(model or i.model), "--data-root", str(data or i.data), "--imgsz", str(IMGSZ),
            "--warmup-runs", "0", "--skip-latency", "0", "--workers", "0", "--out", str(t / "run" / "metrics.json"),
            *extra]  # fmt: skip


def _quantize(i: Inputs, t: Path, *extra: str, model: Path | None = None, calib: Path | None = None) -> list[str]:
    return ["--onnx-path", str(model or i.model), "--calib-path", str(calib or i.calib),
            "--output-path", str(t / "q" / "model-int8.onnx"), "--calibration-eps", "cpu", *extra]  # fmt: skip


def _calib_npy(i: Inputs, t: Path, listing: Path, *extra: str) -> list[str]:
    return ["--list", str(listing), "--out", str(t / "calib.npy"), "--imgsz", "32", "--workers", "1", *extra]


def _list(t: Path, lines: list[str], name: str = "list.txt") -> Path:
    return _write(t / name, "\n".join(lines) + "\n")


def _smoke(i: Inputs, t: Path, *extra: str, model: Path | None = None) -> list[str]:
    return ["--model", str(model or i.model), "--output-root", str(t / "runs"), "--runs", "1", "--warmup-runs", "0",
            *extra]  # fmt: skip


def _sweep(i: Inputs, t: Path, *extra: str, weights: bool = True) -> list[str]:
    """A sweep of ``det.pt`` (a stand-in file: every case fails before the weights are loaded)."""
    if weights:
        _write(t / "det.pt", b"stand-in")
    return ["--weights", str(t / "det.pt"), "--images", str(i.image_list), "--imgsz", str(IMGSZ), "--num-images", "2",
            "--device", "cpu", "--output-root", str(t / "runs"), *extra]  # fmt: skip


def _workflow(i: Inputs, t: Path, *extra: str) -> list[str]:
    return ["--onnx-path", str(i.model), "--data-root", str(i.data), "--calib-list", str(i.image_list),
            "--imgsz", str(IMGSZ), "--output-root", str(t / "runs"), "--dry-run", *extra]  # fmt: skip


def _materialize(i: Inputs, t: Path, *extra: str) -> list[str]:
    return ["--run-root", str(t / "run"), "--calib-path", str(i.calib), "--onnx-path", str(i.model), "--ks", "0", "2",
            *extra]  # fmt: skip


def _metrics(t: Path) -> list[Path]:
    return [t / "run" / "metrics.json", t / "run" / "detections.json"]


def _quantized(t: Path) -> list[Path]:
    q = t / "q"
    return [q / "model-int8.onnx", q / "model-int8.manifest.json", q / "model-int8.onnx.work"]


def _run_dirs(t: Path) -> list[Path]:
    return [t / "runs"]


# ---------------------------------------------------------------------------------------------------------------------
# the cases


CASES: list[Case] = [
    # evaluation
    Case("eval: --max-images 0", EVAL, "--max-images", lambda i, t: _eval(i, t, "--max-images", "0"),
         lambda i, t: _metrics(t)),
    Case("eval: --imgsz not a multiple of 32", EVAL, "--imgsz", lambda i, t: _eval(i, t, "--imgsz", "100"),
         lambda i, t: _metrics(t)),
    Case("eval: zero-byte .onnx", EVAL, "--onnx-path",
         lambda i, t: _eval(i, t, model=_write(t / "empty.onnx", b"")), lambda i, t: _metrics(t)),
    Case("eval: --out is a folder, with --overwrite", EVAL, "--out",
         lambda i, t: [*_eval(i, t, "--overwrite")[:-3], "--out", str((t / "run").mkdir(parents=True) or t / "run"),
                       "--overwrite"], lambda i, t: [t / "run" / "metrics.json"]),
    Case("eval: --out below a file", EVAL, "--out",
         lambda i, t: [*_eval(i, t)[:-2], "--out", str(_a_file(t) / "metrics.json")],
         in_error=lambda i, t: [str(t / "a-file")]),
    Case("eval: --out in a read-only folder", EVAL, "--out",
         lambda i, t: [*_eval(i, t)[:-2], "--out", str(_read_only_dir(t) / "run" / "metrics.json")],
         lambda i, t: [t / "read-only" / "run"], setup=["read-only"]),
    Case("eval: annotations without any box", EVAL, "--data-root",  # the annotations file found under it
         lambda i, t: _eval(i, t, data=_annotations(t, i, _drop_annotations)), lambda i, t: _metrics(t)),
    Case("eval: image entry without file_name", EVAL, "--data-root",
         lambda i, t: _eval(i, t, data=_annotations(t, i, _drop_file_name)), lambda i, t: _metrics(t)),
    Case("eval: model outputs are all NaN", EVAL, "--onnx-path", lambda i, t: _eval(i, t, model=i.nan_model),
         lambda i, t: _metrics(t)),
    Case("eval: missing --data-root", EVAL, "--data-root", lambda i, t: _eval(i, t, data=t / "nowhere"),
         lambda i, t: _metrics(t)),
    # quantization
    Case("quantize: zero-byte .onnx", QUANTIZE, "--onnx-path",
         lambda i, t: _quantize(i, t, model=_write(t / "empty.onnx", b"")), lambda i, t: _quantized(t)),
    Case("quantize: .npz calibration", QUANTIZE, "--calib-path", lambda i, t: _quantize(i, t, calib=_npz(t)),
         lambda i, t: _quantized(t)),
    Case("quantize: zero-byte .npy calibration", QUANTIZE, "--calib-path",
         lambda i, t: _quantize(i, t, calib=_write(t / "empty.npy", b"")), lambda i, t: _quantized(t)),
    Case("quantize: NaN in the calibration tensor (max)", QUANTIZE, "--calib-path",
         lambda i, t: _quantize(i, t, "--calibration-method", "max", calib=_nan_calib(t)), lambda i, t: _quantized(t)),
    Case("quantize: NaN in the calibration tensor (entropy)", QUANTIZE, "--calib-path",
         lambda i, t: _quantize(i, t, "--calibration-method", "entropy", calib=_nan_calib(t)),
         lambda i, t: _quantized(t)),
    Case("quantize: model with dynamic H/W", QUANTIZE, "--onnx-path",
         lambda i, t: _quantize(i, t, model=i.dynamic_model), lambda i, t: _quantized(t)),
    Case("quantize: --output-path is a folder, with --overwrite", QUANTIZE, "--output-path",
         lambda i, t: [*_quantize(i, t, "--overwrite")[:4], "--output-path",
                       str((t / "q.onnx").mkdir(parents=True) or t / "q.onnx"), "--overwrite"]),
    Case("quantize: --output-path below a file", QUANTIZE, "--output-path",
         lambda i, t: [*_quantize(i, t)[:4], "--output-path", str(_a_file(t) / "m.onnx")]),
    Case("quantize: malformed --exclude-json", QUANTIZE, "--exclude-json",
         lambda i, t: _quantize(i, t, "--exclude-json", str(_write(t / "s.json", '{"layers": []}'))),
         lambda i, t: _quantized(t)),
    Case("quantize: --max-calib-images 0", QUANTIZE, "--max-calib-images",
         lambda i, t: _quantize(i, t, "--max-calib-images", "0"), lambda i, t: _quantized(t)),
    # calibration tensor from an image list
    Case("calib npy: binary --list", CALIB_NPY, "--list",
         lambda i, t: _calib_npy(i, t, _write(t / "list.txt", b"\x89PNG\r\n\x1a\n\x00\x00")),
         lambda i, t: [t / "calib.npy"]),
    Case("calib npy: list entry that is a folder", CALIB_NPY, "--list",
         lambda i, t: _calib_npy(i, t, _list(t, [str(i.images[0]), str(i.images[0].parent)])),
         lambda i, t: [t / "calib.npy"], in_error=lambda i, t: ["line 2"]),
    Case("calib npy: relative list entry not found", CALIB_NPY, "--list",
         lambda i, t: _calib_npy(i, t, _list(t, ["missing/img.jpg"])), lambda i, t: [t / "calib.npy"],
         in_error=lambda i, t: [str(REPO / "missing/img.jpg"), str(t / "missing/img.jpg")]),
    Case("calib npy: duplicate list entries", CALIB_NPY, "--list",
         lambda i, t: _calib_npy(i, t, _list(t, [str(i.images[0]), str(i.images[1]), str(i.images[0])])),
         lambda i, t: [t / "calib.npy"]),
    Case("calib npy: --out is a folder, with --overwrite", CALIB_NPY, "--out",
         lambda i, t: [*_calib_npy(i, t, i.image_list, "--overwrite")[:2], "--out",
                       str((t / "c.npy").mkdir(parents=True) or t / "c.npy"), "--overwrite"]),
    Case("calib npy: '#' in a file name is a file name", CALIB_NPY, "--list",
         lambda i, t: _calib_npy(i, t, _list(t, [str(_copy(i.images[0], t / "img#1.jpg")), "# a comment"])),
         lambda i, t: [t / "calib.npy"], rc=0),
    # calibration list from COCO annotations
    Case("calib list: image entry without file_name", CALIB_LIST, "--ann-file",
         lambda i, t: ["--data-root", str(_annotations(t, i, _drop_file_name)), "--eval-max-images", "1", "--num", "1",
                       "--out", str(t / "list.txt")], lambda i, t: [t / "list.txt"]),
    Case("calib list: --num 0", CALIB_LIST, "--num",
         lambda i, t: ["--data-root", str(i.data), "--num", "0", "--out", str(t / "list.txt")],
         lambda i, t: [t / "list.txt"]),
    Case("calib list: --out below a file", CALIB_LIST, "--out",
         lambda i, t: ["--data-root", str(i.data), "--eval-max-images", "1", "--num", "1",
                       "--out", str(_a_file(t) / "list.txt")]),
    # random-input smoke test
    Case("smoke: zero-byte .onnx", SMOKE, "--model", lambda i, t: _smoke(i, t, model=_write(t / "e.onnx", b"")),
         lambda i, t: _run_dirs(t)),
    Case("smoke: --runs 0", SMOKE, "--runs", lambda i, t: _smoke(i, t, "--runs", "0"), lambda i, t: _run_dirs(t)),
    Case("smoke: unknown provider", SMOKE, "--providers",
         lambda i, t: _smoke(i, t, "--providers", "NoSuchExecutionProvider"), lambda i, t: _run_dirs(t)),
    # export
    Case("export: missing --weights", EXPORT, "--weights",
         lambda i, t: ["--weights", str(t / "absent.pt"), "--out", str(t / "m.onnx")],
         lambda i, t: [t / "m.onnx", t / "m.manifest.json"]),
    Case("export: --out is a folder, with --overwrite", EXPORT, "--out",
         lambda i, t: ["--weights", "yolov10n.yaml", "--out", str((t / "m.onnx").mkdir(parents=True) or t / "m.onnx"),
                       "--overwrite"], lambda i, t: [t / "m.manifest.json"]),
    Case("export: --out without .onnx", EXPORT, "--out",
         lambda i, t: ["--weights", "yolov10n.yaml", "--out", str(t / "m.pt")], lambda i, t: [t / "m.pt"]),
    Case("export: --opset 9", EXPORT, "--opset",
         lambda i, t: ["--weights", "yolov10n.yaml", "--opset", "9", "--out", str(t / "m.onnx")],
         lambda i, t: [t / "m.onnx"]),
    # model statistics
    Case("stats: zero-byte .onnx", STATS, "--model", lambda i, t: ["--model", str(_write(t / "e.onnx", b""))]),
    Case("stats: --json-out below a file", STATS, "--json-out",
         lambda i, t: ["--model", str(i.model), "--json-out", str(_a_file(t) / "s.json")]),
    # Q/DQ inspection
    Case("inspect: zero-byte calibration .npy", INSPECT, "--calib-path",
         lambda i, t: ["--onnx-path", str(i.model), "--source-onnx", str(i.model),
                       "--calib-path", str(_write(t / "e.npy", b"")), "--json-out", str(t / "r.json")],
         lambda i, t: [t / "r.json", t / "r.inspect.manifest.json"]),
    Case("inspect: --json-out not .json", INSPECT, "--json-out",
         lambda i, t: ["--onnx-path", str(i.model), "--json-out", str(t / "r.txt")], lambda i, t: [t / "r.txt"]),
    # torch sensitivity sweep
    Case("torch sweep: --num-images 0", TORCH_SWEEP, "--num-images", lambda i, t: _sweep(i, t, "--num-images", "0"),
         lambda i, t: _run_dirs(t)),
    Case("torch sweep: .npz --calib-npy", TORCH_SWEEP, "--calib-npy",
         lambda i, t: [*_sweep(i, t)[:2], "--calib-npy", str(_npz(t)), *_sweep(i, t)[4:]], lambda i, t: _run_dirs(t)),
    Case("torch sweep: --run-id with a slash", TORCH_SWEEP, "--run-id", lambda i, t: _sweep(i, t, "--run-id", "a/b"),
         lambda i, t: _run_dirs(t)),
    Case("torch sweep: missing --weights", TORCH_SWEEP, "--weights", lambda i, t: _sweep(i, t, weights=False),
         lambda i, t: _run_dirs(t)),
    # rankings and schemes
    Case("compare: --k 0", COMPARE, "--k",
         lambda i, t: ["--report-a", str(t / "a.json"), "--report-b", str(t / "b.json"), "--out", str(t / "c.json"),
                       "--k", "0"], lambda i, t: [t / "c.json"]),
    Case("schemes: missing --report-json", SCHEMES, "--report-json",
         lambda i, t: ["--report-json", str(t / "absent.json"), "--out-dir", str(t / "schemes"),
                       "--onnx-path", str(i.model)], lambda i, t: [t / "schemes"]),
    Case("materialize: malformed scheme", MATERIALIZE, "--schemes-dir",
         lambda i, t: [*_materialize(i, t)] if _scheme_dir(t, '{"k": 2, "nodes_to_exclude": "oops"}') else [],
         lambda i, t: [t / "run" / "onnx"]),
    Case("materialize: scheme that is not JSON", MATERIALIZE, "--schemes-dir",
         lambda i, t: [*_materialize(i, t)] if _scheme_dir(t, "{not json") else [], lambda i, t: [t / "run" / "onnx"]),
    # the workflow
    Case("workflow: --max-images 0", WORKFLOW, "--max-images", lambda i, t: _workflow(i, t, "--max-images", "0"),
         lambda i, t: _run_dirs(t)),
    Case("workflow: --budget-ap -1", WORKFLOW, "--budget-ap", lambda i, t: _workflow(i, t, "--budget-ap", "-1"),
         lambda i, t: _run_dirs(t)),
    Case("workflow: --sensitivity-images 0", WORKFLOW, "--sensitivity-images",
         lambda i, t: _workflow(i, t, "--sensitivity-images", "0"), lambda i, t: _run_dirs(t)),
    # bash wrappers
    Case("sweep wrapper: OVERWRITE=true is accepted", SWEEP_WRAPPER, "OVERWRITE",
         lambda i, t: {"OVERWRITE": "true", "PYTHON": str(_argv_dumper(t))}, rc=0,
         check=lambda out, t: _assert_in("--overwrite", out.splitlines())),
    Case("sweep wrapper: OVERWRITE=maybe", SWEEP_WRAPPER, "OVERWRITE",
         lambda i, t: {"OVERWRITE": "maybe", "PYTHON": str(_argv_dumper(t))}),
]


def _copy(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(source.read_bytes())
    return target


def _assert_in(item: str, items: list[str]) -> None:
    assert item in items, items


# ---------------------------------------------------------------------------------------------------------------------
# running a case


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    root = tmp_path_factory.mktemp("bad_inputs")
    raw = oracle_raw_output()
    dynamic = constant_output_model(root / "dyn.onnx", raw, input_shape=(1, 3, "h", "w"))
    rng = np.random.default_rng(0)
    images = []
    for index, (h, w) in enumerate([(40, 60), (50, 30), (32, 32)]):
        images.append(root / "images" / f"img{index}.jpg")
        images[-1].parent.mkdir(exist_ok=True)
        cv2.imwrite(str(images[-1]), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return Inputs(
        root=root,
        model=constant_output_model(root / "raw.onnx", raw),
        nan_model=constant_output_model(root / "nan.onnx", np.full_like(raw, np.nan)),
        dynamic_model=dynamic,
        data=make_dataset(root / "coco"),
        calib=_npy(root / "calib.npy", rng.random((2, 3, IMGSZ, IMGSZ), dtype=np.float32)),
        images=images,
        image_list=_list(root, [str(p) for p in images], "images.txt"),
    )


def _run(case: Case, argv, load_script, capsys) -> tuple[int, str, str]:
    if case.script.endswith(".sh"):
        env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "LANG")}
        result = subprocess.run(["bash", str(REPO / case.script)], env={**env, **argv}, capture_output=True,
                                text=True, timeout=60, check=False)  # fmt: skip
        return result.returncode, result.stdout, result.stderr
    capsys.readouterr()
    rc = load_script(case.script).main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _problems(case: Case, rc: int, out: str, err: str, inputs: Inputs, case_dir: Path) -> list[str]:
    """What is wrong with how the command handled the case (empty: handled as required)."""
    problems = []
    if rc != case.rc:
        problems.append(f"exit {rc}, expected {case.rc}")
    if "Traceback" in err:
        problems.append("traceback")
    if case.rc == 0:
        missing = [str(p) for p in case.outputs(inputs, case_dir) if not p.exists()]
        if missing:
            problems.append(f"not written: {', '.join(missing)}")
        if case.check is not None:
            try:
                case.check(out, case_dir)
            except AssertionError as exc:
                problems.append(f"check failed: {exc}")
        return problems
    lines = [line for line in err.strip().splitlines() if line.strip()]
    error_lines = [line for line in lines if "error:" in line]
    if len(error_lines) != 1 or error_lines[0] != lines[-1]:
        problems.append(f"{len(error_lines)} error lines, expected one, last")
    elif case.flag not in error_lines[0]:
        problems.append(f"error does not name {case.flag}: {error_lines[0]}")
    else:
        problems += [f"error does not name {text}" for text in case.in_error(inputs, case_dir) if text not in lines[-1]]
    left = [str(p) for p in case.outputs(inputs, case_dir) if p.exists() or p.is_symlink()]
    if left:
        problems.append(f"left behind: {', '.join(left)}")
    return problems


def _deny_writes_to(folder: Path, monkeypatch) -> None:
    """root may write anywhere: make ``os.access`` answer for ``folder`` as it would for any other user."""
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if Path(path) == folder and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(runs.os, "access", access)


def test_every_bad_input_gives_one_clear_error(inputs, tmp_path, load_script, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    table = []
    for index, case in enumerate(CASES):
        case_dir = tmp_path / f"case{index:02d}"
        case_dir.mkdir()
        argv = case.argv(inputs, case_dir)
        note = ""
        if "read-only" in case.setup and os.geteuid() == 0:
            _deny_writes_to(case_dir / "read-only", monkeypatch)
            note = " (root: permission simulated)"
        try:
            rc, out, err = _run(case, argv, load_script, capsys)
        finally:
            monkeypatch.setattr(runs.os, "access", os.access)
        problems = _problems(case, rc, out, err, inputs, case_dir)
        table.append((case.name, case.flag, f"exit {rc}" + note, "; ".join(problems) or "ok"))
        (case_dir / "read-only").exists() and (case_dir / "read-only").chmod(0o755)
    with capsys.disabled():
        width = max(len(row[0]) for row in table)
        print(f"\n{'case':<{width}}  {'flag':<22} {'outcome':<10} verdict")
        for name, flag, outcome, verdict in table:
            print(f"{name:<{width}}  {flag:<22} {outcome:<10} {verdict}")
        bad = sum(row[3] != "ok" for row in table)
        print(f"{len(table)} cases, {len(table) - bad} handled as required, {bad} not")
    assert len(CASES) >= 40
    assert [row for row in table if row[3] != "ok"] == []
