"""The workflow can be trusted with a fresh checkout, a failure, a second writer, a stop and a damaged output.

* the first run on data that does not exist yet waits for the dataset step before calibrating;
* a failed step's log holds its ``error:`` line;
* one workflow per run dir, and SIGTERM ends the steps' whole process trees, keeps no record for them and
  lets the next run start clean;
* "complete" means the outputs still hash to what was recorded (a folder by its files' content), so a
  truncated or deleted output reruns its step and what reads it;
* ``--candidate-build requantize`` runs the search end to end;
* bad inputs fail before any step, naming the flag, with nothing written in the run dir.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lowbit.run_lock import HELD_ENV
from lowbit.steps import Step, path_digest, run_steps

REPO = Path(__file__).resolve().parent.parent
WORKFLOW = REPO / "scripts/cv-models/run_yolov10m_lowbit_workflow.py"
MAKE_DATASET = REPO / "scripts/cv-models/make_demo_dataset.py"

# Runs the workflow with the demo preset's generated data moved to a test folder and the dataset step's
# command replaced (a slow or stoppable stand-in, or the real generator with tiny settings).
DRIVER = """
import dataclasses, importlib.util, json, sys
from pathlib import Path

import lowbit.pipeline
from lowbit.pipeline_settings import PRESETS
from lowbit.pipeline_steps import dataset_files
from lowbit.steps import Step

cfg = json.loads(sys.argv[1])
spec = importlib.util.spec_from_file_location("workflow_under_test", cfg["workflow"])
wf = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = wf
spec.loader.exec_module(wf)
PRESETS["demo"] = dataclasses.replace(PRESETS["demo"], data_root=Path(cfg["data_root"]))


def dataset_step(args):
    ann, images = dataset_files(args.data_root)
    return Step("dataset", cfg["dataset_argv"], outputs=[images, ann], reuse_existing=cfg["reuse_existing"])


lowbit.pipeline.dataset_step = dataset_step
sys.exit(wf.main(cfg["argv"]))
"""


@pytest.fixture(scope="module")
def wf(load_script):
    return load_script("scripts/cv-models/run_yolov10m_lowbit_workflow.py")


@pytest.fixture(autouse=True)
def _no_inherited_hold(monkeypatch):
    monkeypatch.delenv(HELD_ENV, raising=False)


def _start_driver(tmp_path: Path, data_root: Path, dataset_argv: list[str], argv: list[str], reuse_existing: bool):
    cfg = {
        "workflow": str(WORKFLOW),
        "data_root": str(data_root),
        "dataset_argv": dataset_argv,
        "argv": argv,
        "reuse_existing": reuse_existing,
    }
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    return subprocess.Popen(
        [sys.executable, str(driver), json.dumps(cfg)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its reaper counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "\nState:\tZ" in status


def _wait_for(path: Path, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(
                f"the workflow ended (exit {proc.returncode}) before {path} appeared: {proc.stderr.read()[-3000:]}"
            )
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def _last_run_lines(run: Path) -> list[str]:
    """workflow.log lines of the latest run (the log is appended to)."""
    lines = (run / "workflow.log").read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if " run dir " in line]
    return lines[starts[-1] :]


def _index(lines: list[str], *words: str) -> int:
    return next(i for i, line in enumerate(lines) if all(w in line for w in words))


# ----------------------------------------------------------------------------------------------------------------------
# a fresh checkout: SIGTERM during the dataset step, then a run where calibration waits for the data


def test_stop_ends_the_step_tree_then_the_first_run_waits_for_the_dataset(
    tmp_path, tiny_yolov10_onnx, tiny_yolov10_spec
):
    data = tmp_path / "fresh" / "demo-shapes"  # does not exist: the dataset step makes it
    calib_list = tmp_path / "calib.txt"  # names images relative to the list, not there yet
    calib_list.write_text(
        "# the last two images of the split\n"
        "fresh/demo-shapes/val2017/000000000005.jpg\nfresh/demo-shapes/val2017/000000000006.jpg\n"
    )
    run = tmp_path / "runs" / "fresh"
    argv = ["--onnx-path", str(tiny_yolov10_onnx), "--calib-list", str(calib_list), "--max-images", "4"]
    argv += ["--imgsz", str(tiny_yolov10_spec["imgsz"]), "--candidate-modes"]
    argv += ["--output-root", str(tmp_path / "runs"), "--run-id", "fresh"]

    # 1. a dataset step that never ends on its own and has a child of its own; SIGTERM the workflow
    pids = tmp_path / "pids.txt"
    stuck = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
        "time.sleep(300)\n"
    )
    proc = _start_driver(tmp_path, data, [sys.executable, "-c", stuck], [*argv, "--jobs", "1"], reuse_existing=False)
    _wait_for(pids, proc, 120)
    step_pid, child_pid = map(int, pids.read_text().split())
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert "stopped by SIGTERM" in last and "dataset" in last, stderr[-2000:]
    assert "Traceback" not in stderr
    deadline = time.monotonic() + 10
    while not (_gone(step_pid) and _gone(child_pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(step_pid) and _gone(child_pid), "the stopped step's process tree outlived the workflow"
    assert not (run / ".steps" / "dataset.json").exists()
    assert not (run / ".lock.owner.json").exists()  # the run dir is released

    # 2. the next run starts clean; with --jobs 3 calibration still waits for the (slow) dataset step
    slow_dataset = [
        "sh",
        "-c",
        f'sleep 3 && exec "{sys.executable}" "{MAKE_DATASET}" --out-root "{data}" --splits val --num-val 6 --workers 1',
    ]
    proc = _start_driver(tmp_path, data, slow_dataset, [*argv, "--jobs", "3"], reuse_existing=True)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    lines = _last_run_lines(run)
    dataset_done = _index(lines, "dataset", "done in")
    assert _index(lines, "smoke", "running") < dataset_done  # steps did run side by side
    assert dataset_done < _index(lines, "calib ", "running")
    assert dataset_done < _index(lines, "baseline", "running")
    assert (run / "report.md").is_file() and (run / ".steps" / "calib.json").is_file()
    calib_record = json.loads((run / ".steps" / "calib.json").read_text())
    assert any(k.endswith("000000000006.jpg") for k in calib_record["fingerprint"]["inputs"])


def test_a_calib_image_no_step_makes_fails_before_any_step(wf, tiny_inputs, tmp_path, capsys):
    base, _, _ = tiny_inputs
    listed = tmp_path / "list.txt"
    listed.write_text(f"{base['images'][0]}\n{tmp_path / 'nowhere' / 'missing.jpg'}\n")
    rc = wf.main([*base["argv"], "--calib-list", str(listed), "--output-root", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: --calib-list") and "missing.jpg" in err[-1]
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------------------------------------
# step logs, the run-dir lock


def _step(tmp_path: Path, name: str, code: str, reads=(), writes=None):
    """A step running ``code``; it appends its name to ran.txt first. ``reads``/``writes``: paths under tmp_path."""
    ran = tmp_path / "ran.txt"
    prefix = f"open({str(ran)!r}, 'a').write({name!r} + '\\n')\n"
    outputs = [tmp_path / p for p in (writes or [f"{name}.txt"])]
    return Step(name, [sys.executable, "-c", prefix + code], outputs=outputs, inputs=[tmp_path / r for r in reads])


def _ran(tmp_path: Path) -> list[str]:
    ran = tmp_path / "ran.txt"
    names = ran.read_text().split() if ran.exists() else []
    ran.unlink(missing_ok=True)
    return names


def test_a_failed_steps_log_holds_its_error_line(tmp_path, capfd):
    code = (
        "import sys\nprint('summary on stdout')\nprint('error: --thing: this went wrong', file=sys.stderr)\nsys.exit(2)"
    )
    step = _step(tmp_path, "broken", code)
    assert run_steps(tmp_path / "run", [step], set(), False, logging.getLogger("t")) == 1
    log = (tmp_path / "run" / "logs" / "broken.log").read_text()
    assert "error: --thing: this went wrong" in log and "summary on stdout" in log
    assert "error: --thing: this went wrong" in capfd.readouterr().err  # and on the console
    assert not (tmp_path / "run" / ".steps" / "broken.json").exists()


def test_a_second_workflow_on_the_same_run_id_is_refused(wf, tiny_inputs, tmp_path, capsys, folder_held_elsewhere):
    base, _, _ = tiny_inputs
    run = tmp_path / "runs" / "busy"
    with folder_held_elsewhere(run) as holder:
        rc = wf.main([*base["argv"], "--output-root", str(tmp_path / "runs"), "--run-id", "busy"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and err[-1].startswith("error: --run-id") and f"pid {holder.pid}" in err[-1]
        assert not (run / "workflow.json").exists() and not (run / "logs").exists()
        # a dry run reads only, so it needs no hold
        assert wf.main([*base["argv"], "--output-root", str(tmp_path / "runs"), "--run-id", "busy", "--dry-run"]) == 0


# ----------------------------------------------------------------------------------------------------------------------
# complete = outputs re-verified


def test_a_truncated_or_deleted_output_reruns_its_step_and_dependants(tmp_path):
    stamp = "import time\n"
    steps = [
        _step(tmp_path, "a", stamp + f"open({str(tmp_path / 'a.txt')!r}, 'w').write(str(time.time()))"),
        _step(
            tmp_path,
            "b",
            stamp + f"import os\nos.makedirs({str(tmp_path / 'b')!r}, exist_ok=True)\n"
            f"open({str(tmp_path / 'b' / 'x.txt')!r}, 'w').write(str(time.time()))",
            writes=["b"],
        ),
        _step(
            tmp_path,
            "c",
            stamp + f"open({str(tmp_path / 'c.txt')!r}, 'w').write(str(time.time()))",
            reads=["a.txt", "b"],
        ),
        _step(
            tmp_path,
            "d",
            stamp + f"open({str(tmp_path / 'd.txt')!r}, 'w').write(str(time.time()))",
            reads=["c.txt"],
        ),
    ]
    run, log = tmp_path / "run", logging.getLogger("t")
    assert run_steps(run, steps, set(), False, log) == 0 and _ran(tmp_path) == ["a", "b", "c", "d"]
    record = json.loads((run / ".steps" / "b.json").read_text())
    assert record["outputs"] == {str(tmp_path / "b"): path_digest(tmp_path / "b")}  # a folder by its content
    assert run_steps(run, steps, set(), False, log) == 0 and _ran(tmp_path) == []

    (tmp_path / "a.txt").write_text("")  # truncated: a reruns, and c (reads a) and d (reads c)
    assert run_steps(run, steps, set(), False, log) == 0 and _ran(tmp_path) == ["a", "c", "d"]
    (tmp_path / "b" / "x.txt").write_text("changed")  # a folder output changed in place
    assert run_steps(run, steps, set(), False, log) == 0 and _ran(tmp_path) == ["b", "c", "d"]
    (tmp_path / "d.txt").unlink()  # deleted: only d reruns
    assert run_steps(run, steps, set(), False, log) == 0 and _ran(tmp_path) == ["d"]


def test_a_search_is_complete_only_while_the_candidates_it_names_are_intact(tmp_path):
    run = tmp_path / "run"
    metrics, model = run / "int8-k2-coco" / "metrics.json", run / "onnx" / "m-int8-k2.onnx"
    search_json = run / "search-int8" / "search.json"
    rows = {"candidates": [{"k": 2, "metrics_path": str(metrics), "model_path": str(model)}]}
    code = (
        f"import json, os, time\nfor p in ({str(metrics)!r}, {str(model)!r}, {str(search_json)!r}):\n"
        "    os.makedirs(os.path.dirname(p), exist_ok=True)\n"
        f"open({str(metrics)!r}, 'w').write('{{}}')\nopen({str(model)!r}, 'w').write(str(time.time()))\n"
        f"open({str(search_json)!r}, 'w').write({json.dumps(rows)!r})\n"
    )
    search = _step(tmp_path, "search-int8", code, writes=[search_json])
    search.cites = [search_json]
    report_code = f"open({str(tmp_path / 'report.txt')!r}, 'w').write('r')"
    report = _step(tmp_path, "report", report_code, reads=[search_json], writes=["report.txt"])
    report.cites = [search_json]
    assert report.reads() == [search_json]  # nothing cited before the search ran
    steps, log = [search, report], logging.getLogger("t")
    assert run_steps(run, steps, set(), False, log) == 0 and _ran(tmp_path) == ["search-int8", "report"]
    assert report.reads() == [search_json, metrics, model] and search.writes() == [search_json, metrics, model]
    model.write_text("")  # a candidate the search names is truncated: the search rebuilds it, the report reads it
    assert run_steps(run, steps, set(), False, log) == 0 and _ran(tmp_path) == ["search-int8", "report"]
    metrics.unlink()  # deleted: the same
    assert run_steps(run, steps, set(), False, log) == 0 and _ran(tmp_path) == ["search-int8", "report"]
    assert run_steps(run, steps, set(), False, log) == 0 and _ran(tmp_path) == []


# ----------------------------------------------------------------------------------------------------------------------
# requantized candidates


def test_requantize_search_end_to_end(tiny_inputs, tmp_path):
    base, _, _ = tiny_inputs
    # FP8: no K=0 evaluation is given to the search, so it builds (requantizes) at least one candidate
    argv = [*base["argv"], "--output-root", str(tmp_path / "runs"), "--run-id", "rq", "--candidate-modes", "fp8"]
    argv += ["--candidate-build", "requantize", "--sensitivity", "local", "--sensitivity-images", "1"]
    argv += ["--max-probes", "2", "--random-seeds", "0"]
    command = [sys.executable, str(WORKFLOW), *argv]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "rq"
    search = json.loads((run / "search-fp8" / "search.json").read_text())
    assert search["build"] == "requantize" and search["candidates"]
    step = json.loads((run / ".steps" / "search-fp8.json").read_text())["fingerprint"]["argv"]
    dtype = step[step.index("--high-precision-dtype") + 1]
    assert dtype in ("fp32", "fp16")  # "auto" resolved, as the quantize step resolves it
    for candidate in search["candidates"]:
        record = json.loads(Path(candidate["model_path"]).with_suffix(".inputs.json").read_text())
        assert (
            record["build"]["method"] == "requantize" and record["build"]["quantize"]["high_precision_dtype"] == dtype
        )
    # the candidates it wrote leave every other step's outputs as recorded: a rerun skips everything
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0 and " running" not in again.stderr, again.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------------------------
# bad inputs: one error naming the flag, before any step, nothing in the run dir


@pytest.fixture(scope="module")
def tiny_inputs(tiny_yolov10_onnx, tiny_yolov10_spec, demo_val_slice, tmp_path_factory):
    """A valid tiny run's flags (4 evaluated images, 2 calibration images, 2 confirmation images) that each case
    breaks once."""
    data = demo_val_slice(8)
    images = sorted((data / "val2017").glob("*.jpg"))
    calib_list = tmp_path_factory.mktemp("lists") / "calib.txt"
    calib_list.write_text("".join(f"{p}\n" for p in images[4:6]))
    argv = ["--onnx-path", str(tiny_yolov10_onnx), "--data-root", str(data), "--calib-list", str(calib_list)]
    argv += ["--max-images", "4", "--imgsz", str(tiny_yolov10_spec["imgsz"])]
    argv += ["--confirm-skip", "6", "--confirm-images", "2"]  # search plans only (--ks refuses them): drop for --ks
    return {"argv": argv, "images": images}, data, tiny_yolov10_onnx


def _replace(argv: list[str], flag: str, value: str) -> list[str]:
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


def _truncated_model(t: Path, model: Path) -> list[str]:
    path = t / "truncated.onnx"
    path.write_bytes(model.read_bytes()[:4000])
    return ["--onnx-path", str(path)]


def _data_without_images(t: Path, data: Path) -> list[str]:
    root = t / "no-images"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_val2017.json").write_bytes(
        (data / "annotations" / "instances_val2017.json").read_bytes()
    )
    return ["--data-root", str(root)]


BAD_INPUTS = {
    # case: (flag the error names, extra argv (t, data, model) -> argv, text the error must also contain)
    "a mode twice": ("--candidate-modes", lambda t, d, m: ["--candidate-modes", "int8", "int8"], "int8 int8"),
    "--budget-ap 0 with --ks": ("--budget-ap", lambda t, d, m: ["--ks", "0", "2", "--budget-ap", "0"], "> 0"),
    "--random-seeds with --ks": ("--random-seeds", lambda t, d, m: ["--ks", "0", "2", "--random-seeds", "2"], "--ks"),
    "--random-band with --ks": ("--random-band", lambda t, d, m: ["--ks", "0", "2", "--random-band"], "--ks"),
    "--max-probes with --ks": ("--max-probes", lambda t, d, m: ["--ks", "0", "2", "--max-probes", "3"], "--ks"),
    "--parallel-probes with --ks": (
        "--parallel-probes",
        lambda t, d, m: ["--ks", "0", "2", "--parallel-probes", "2"],
        "--ks",
    ),
    "--candidate-build with --ks": (
        "--candidate-build",
        lambda t, d, m: ["--ks", "0", "2", "--candidate-build", "full"],
        "--ks",
    ),
    "--random-control with the search": (
        "--random-control",
        lambda t, d, m: ["--random-control", "1"],
        "--random-seeds",
    ),
    "--weights without the torch ranking": ("--weights", lambda t, d, m: ["--weights", str(t / "det.pt")], "torch"),
    "--sensitivity-images with no mode": (
        "--sensitivity-images",
        lambda t, d, m: ["--candidate-modes", "--sensitivity-images", "2"],
        "--candidate-modes",
    ),
    "truncated --onnx-path": ("--onnx-path", lambda t, d, m: _truncated_model(t, m), "truncated.onnx"),
    "--imgsz against the model's static input": ("--imgsz", lambda t, d, m: ["--imgsz", "192"], "160"),
    "missing --data-root": ("--data-root", lambda t, d, m: ["--data-root", str(t / "nowhere")], "nowhere"),
    "--data-root without val2017/": ("--data-root", lambda t, d, m: _data_without_images(t, d), "val2017"),
    "--confidence below 0.5": ("--confidence", lambda t, d, m: ["--confidence", "0.3"], "[0.5, 1)"),
    "a confirmation slice inside the search slice": (
        "--confirm-skip",
        lambda t, d, m: ["--confirm-skip", "2"],
        ">= --max-images 4",
    ),
    "a confirmation slice of calibration images": (
        "--confirm-skip",
        lambda t, d, m: ["--confirm-skip", "4"],
        "calibration images",
    ),
    "a confirmation slice past the last image": ("--confirm-skip", lambda t, d, m: ["--confirm-skip", "8"], "8 images"),
    "--confirm-images with --ks": (
        "--confirm-images",
        lambda t, d, m: ["--ks", "0", "2", "--confirm-images", "3"],
        "--ks",
    ),
}


def _without_confirmation(argv: list[str]) -> list[str]:
    """``argv`` less the tiny run's confirmation flags (a fixed-K plan refuses them)."""
    i = argv.index("--confirm-skip")
    return argv[:i] + argv[i + 4 :]


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_before_any_step_naming_the_flag(wf, tiny_inputs, case, tmp_path, capsys):
    base, data, model = tiny_inputs
    flag, extra, named = BAD_INPUTS[case]
    extra = extra(tmp_path, data, model)
    no_search = "--ks" in extra or ("--candidate-modes" in extra and "int8" not in extra)  # no pick to confirm
    common = _without_confirmation(base["argv"]) if no_search else base["argv"]
    argv = [*common, *extra, "--output-root", str(tmp_path / "runs"), "--run-id", "bad"]
    rc = wf.main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err[-2000:]
    assert "Traceback" not in err and lines[-1].startswith("error: ") and flag in lines[-1] and named in lines[-1]
    assert not (tmp_path / "runs").exists()


def test_budget_ap_is_the_reports_budget_with_fixed_k(wf, tiny_inputs, tmp_path):
    base, _, _ = tiny_inputs
    argv = [
        *_without_confirmation(base["argv"]),
        "--ks",
        "0",
        "2",
        "--budget-ap",
        "1.0",
        "--output-root",
        str(tmp_path / "runs"),
        "--dry-run",
    ]
    assert wf.main(argv) == 0
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing
