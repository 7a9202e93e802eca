"""The workflow: settings checked up front, each step's argv from its typed settings (the same as the card's bash
wrapper run with the settings' env, and accepted by the script's own parser), and the whole job end to end on the
tiny fixture (every step, the report, and a second run that skips everything)."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lowbit.errors import UserError
from lowbit.pipeline import plan
from lowbit.pipeline_settings import PRESETS, check_settings, resolve_args
from lowbit.pipeline_steps import MaterializeSettings, QuantizeSettings, ScriptSettings
from lowbit.steps import Step, dependencies, run_steps

REPO = Path(__file__).resolve().parent.parent
WORKFLOW = REPO / "scripts/cv-models/run_yolov10m_lowbit_workflow.py"
WRAPPERS = REPO / "scripts/cv-models"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_yolov10_onnx, tiny_yolov10_spec, load_script):
    root = tmp_path_factory.mktemp("wf")
    data = root / "data"
    assert (
        load_script("scripts/cv-models/make_demo_dataset.py").main(
            ["--out-root", str(data), "--splits", "val", "--num-val", "8", "--workers", "1"]
        )
        == 0
    )
    calib_list = root / "calib.txt"
    calib_list.write_text("".join(f"{p}\n" for p in sorted((data / "val2017").glob("*.jpg"))[4:6]))
    argv = [
        "--onnx-path",
        str(tiny_yolov10_onnx),
        "--data-root",
        str(data),
        "--calib-list",
        str(calib_list),
        "--max-images",
        "4",
        "--imgsz",
        str(tiny_yolov10_spec["imgsz"]),
        "--ks",
        "0",
        "2",
        "--sensitivity-images",
        "2",
        "--output-root",
        str(root / "runs"),
        "--run-id",
        "tiny",
    ]
    return root, argv


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(WORKFLOW), *argv], cwd=REPO, capture_output=True, text=True, timeout=900, check=False
    )


def test_workflow_end_to_end_then_resume(tiny_run):
    root, argv = tiny_run
    first = _run(argv)
    assert first.returncode == 0, first.stderr[-3000:]
    run = root / "runs" / "tiny"
    stem = "yolov10n-tiny"  # output names follow the model, not the card's yolov10m
    for path in (
        "baseline-coco/metrics.json",
        f"calib/calib_{stem}_160.npy",
        f"onnx/{stem}-int8-qdq.onnx",
        "int8-coco/metrics.json",
        "schemes/scheme_k0.json",
        "schemes/scheme_k2.json",
        f"onnx/{stem}-fp8-k0.onnx",
        f"onnx/{stem}-fp8-k2.onnx",
        "fp8-k2-coco/metrics.json",
        "schemes-int8/scheme_k2.json",
        f"onnx/{stem}-int8-k2.onnx",
        "int8-k2-coco/metrics.json",
        "report.md",
        "report.json",
        "pareto.png",
    ):
        assert (run / path).exists(), path
    assert not list(run.rglob("yolov10m*")) and not list(run.rglob("*/yolov10m/*"))
    # INT8 with no exclusions is the int8 step; it is not quantized a second time as a K=0 candidate
    assert not (run / "onnx" / f"{stem}-int8-k0.onnx").exists()
    assert list((run / "baseline-onnx").glob("*/smoke.json"))

    # the report's numbers are the per-step metrics files' numbers
    report = json.loads((run / "report.json").read_text())
    by_metrics = {Path(v["metrics_path"]).resolve(): v for v in report["variants"]}
    for metrics_path in run.glob("*-coco/metrics.json"):
        metrics = json.loads(metrics_path.read_text())["metrics"]
        variant = by_metrics[metrics_path.resolve()]
        assert variant["map50_95"] == metrics["map50_95"] and variant["map50"] == metrics["map50"]
    assert len(by_metrics) == 5  # FP32, INT8, FP8 K=0, FP8 K=2, INT8 K=2

    # second run: every step is skipped, nothing is rewritten
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and not _bookkeeping(p)}
    second = _run(argv)
    assert second.returncode == 0, second.stderr[-3000:]
    step_lines = [
        line for line in second.stderr.splitlines() if "] " in line and ("skipped" in line or "running" in line)
    ]
    assert step_lines and all("skipped" in line for line in step_lines), "\n".join(step_lines)
    after = {p: p.stat().st_mtime_ns for p in before}
    assert before == after

    # --force reruns one step (and only what depends on a changed output)
    third = _run([*argv, "--force", "report"])
    assert third.returncode == 0
    assert any("report" in line and "running" in line for line in third.stderr.splitlines())

    # a truncated output is no longer complete: its step reruns, and what reads it when the rebuilt file differs
    int8_model, int8_metrics = run / "onnx" / f"{stem}-int8-qdq.onnx", run / "int8-coco" / "metrics.json"
    digest = _sha256(int8_model)
    int8_model.write_bytes(int8_model.read_bytes()[:1000])
    fourth = _run(argv)
    assert fourth.returncode == 0, fourth.stderr[-3000:]
    ran = _steps_run(fourth.stderr)
    assert "int8" in ran and int8_model.stat().st_size > 1000
    assert ("int8-eval" in ran) == (_sha256(int8_model) != digest) and "baseline" not in ran
    # a deleted metrics file: its evaluation reruns, and the report that reads it
    int8_metrics.unlink()
    fifth = _run(argv)
    assert fifth.returncode == 0, fifth.stderr[-3000:]
    assert {"int8-eval", "report"} <= _steps_run(fifth.stderr) <= {"int8-eval", "report"}
    assert int8_metrics.is_file()


def _bookkeeping(path: Path) -> bool:
    """Files every run rewrites: step records, logs, the run's settings, the run-dir lock."""
    return (
        ".steps" in path.parts or path.name == "workflow.json" or path.suffix == ".log" or path.name.startswith(".lock")
    )


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _steps_run(stderr: str) -> set[str]:
    """Names of the steps a workflow run ran, from its "[i/n] name  running" lines."""
    lines = [line for line in stderr.splitlines() if "] " in line and line.endswith(" running")]
    return {line.split("] ", 1)[1].split()[0] for line in lines}


def test_missing_checkpoint_is_one_clear_error(tmp_path):
    result = _run(["--onnx-path", str(tmp_path / "nope.onnx"), "--output-root", str(tmp_path)])
    assert result.returncode == 2
    assert not any(tmp_path.iterdir())


def test_failed_step_leaves_no_record_and_its_log_says_why(tmp_path, tiny_run):
    root, argv = tiny_run
    not_an_image = tmp_path / "broken.jpg"
    not_an_image.write_text("not a JPEG")
    bad_list = tmp_path / "bad.txt"
    bad_list.write_text(f"{not_an_image}\n")
    args = [a if a != str(root / "calib.txt") else str(bad_list) for a in argv]
    args[args.index("--run-id") + 1] = "broken"
    result = _run(args)
    assert result.returncode == 1
    run = root / "runs" / "broken"
    assert not (run / ".steps" / "calib.json").exists() and not list((run / "calib").glob("*.npy"))
    assert not (run / "report.md").exists()
    error_lines = [line for line in (run / "logs" / "calib.log").read_text().splitlines() if line.startswith("error: ")]
    assert error_lines and "broken.jpg" in error_lines[-1]  # the step's own error line, not only on the console


def test_a_calib_image_that_nothing_makes_is_refused_before_any_step(tmp_path, tiny_run):
    root, argv = tiny_run
    bad_list = tmp_path / "bad.txt"
    bad_list.write_text(str(tmp_path / "missing.jpg") + "\n")
    args = [a if a != str(root / "calib.txt") else str(bad_list) for a in argv]
    args[args.index("--run-id") + 1] = "refused"
    result = _run(args)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --calib-list") and "missing.jpg" in last
    assert not (root / "runs" / "refused").exists()


# ----------------------------------------------------------------------------------------------------------------------
# settings and argv, without running anything


@pytest.fixture(scope="module")
def wf(load_script):
    return load_script("scripts/cv-models/run_yolov10m_lowbit_workflow.py")


def _args(wf, argv: list[str]):
    return resolve_args(wf.build_parser().parse_args(argv))


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        (["--max-images", "0"], "--max-images"),  # 0 is refused, never replaced by the preset's 500
        (["--max-images", "-3"], "--max-images"),
        (["--budget-ap", "-1"], "--budget-ap"),
        (["--budget-ap", "nan"], "--budget-ap"),
        (["--sensitivity-images", "0"], "--sensitivity-images"),
        (["--ks", "0", "-5"], "--ks"),
        (["--imgsz", "100"], "--imgsz"),
        (["--random-control", "-1"], "--random-control"),
        (["--budget-ap", "0"], "--budget-ap"),  # the search needs a positive budget
        (["--random-seeds", "-1"], "--random-seeds"),
        (["--random-control", "3"], "--random-control"),  # search mode: --random-seeds
        (["--max-probes", "0"], "--max-probes"),
        (["--jobs", "0"], "--jobs"),
        (["--parallel-probes", "0"], "--parallel-probes"),
        (["--run-id", "a/b"], "--run-id"),
        (["--providers", "NoSuchExecutionProvider"], "--providers"),
    ],
)
def test_bad_settings_fail_before_any_step_with_the_workflow_flag(wf, extra, flag, tmp_path):
    with pytest.raises(UserError) as exc:
        check_settings(_args(wf, extra))
    assert exc.value.flag == flag
    # and the command itself: exit 2, nothing written
    assert wf.main([*extra, "--output-root", str(tmp_path / "runs")]) == 2
    assert not (tmp_path / "runs").exists()


def test_explicit_values_win_over_the_preset(wf):
    assert _args(wf, ["--max-images", "7"]).max_images == 7
    assert _args(wf, []).max_images == PRESETS["demo"].max_images
    assert _args(wf, ["--preset", "yolov10m"]).max_images == PRESETS["yolov10m"].max_images


def test_output_names_follow_the_model(wf, tmp_path):
    demo = _args(wf, [])
    steps = plan(demo, tmp_path / "demo")
    outputs = [str(p) for s in steps for p in s.outputs if tmp_path in p.parents]
    assert not [p for p in outputs if "yolov10m" in Path(p).relative_to(tmp_path).as_posix()]
    assert str(tmp_path / "demo" / "onnx" / "yolov10n-demo-shapes-int8-qdq.onnx") in outputs
    # the card's preset keeps the card's paths
    card = _args(wf, ["--preset", "yolov10m"])
    outputs = [p for s in plan(card, tmp_path / "card") for p in s.outputs]
    for expected in (
        "onnx/yolov10m-int8-qdq.onnx",
        "calib/calib_yolov10m_640.npy",
        "sensitivity-single-fp8/outputs/yolov10m/onnx-fp8/per_layer/layer-sensitivity-report.json",
        "onnx/yolov10m-fp8-k0.onnx",
        "search-int8/search.json",
    ):
        assert tmp_path / "card" / expected in outputs, expected


def test_default_is_the_search_with_the_single_node_ranking_on_the_full_models(wf, tmp_path):
    args = _args(wf, [])
    assert args.search and args.sensitivity == "single" and args.budget_ap == 0.5 and args.random_seeds == 3
    run = tmp_path / "demo"
    steps = {s.name: s for s in plan(args, run)}
    assert "schemes-int8" not in steps and "candidates-fp8" not in steps
    int8_full, fp8_full = (
        run / "onnx" / "yolov10n-demo-shapes-int8-qdq.onnx",
        run / "onnx" / "yolov10n-demo-shapes-fp8-k0.onnx",
    )
    assert steps["fp8"].outputs == [fp8_full]
    for mode, full in (("int8", int8_full), ("fp8", fp8_full)):
        sens = steps[f"sensitivity-{mode}"].argv
        assert sens[sens.index("--method") + 1] == "single" and sens[sens.index("--qdq-path") + 1] == str(full)
        search = steps[f"search-{mode}"].argv
        assert search[search.index("--full-model") + 1] == str(full)
        assert search[search.index("--budget-ap") + 1] == "0.5" and search[search.index("--build") + 1] == "full"
        assert search[search.index("--ranking") + 1] == str(steps[f"sensitivity-{mode}"].outputs[0])
    # INT8 K=0 is the int8 step's evaluation, never evaluated twice
    search = steps["search-int8"].argv
    assert search[search.index("--k0-metrics") + 1] == str(run / "int8-coco" / "metrics.json")
    assert "--k0-metrics" not in steps["search-fp8"].argv
    assert run / "search-curves.png" in steps["report"].outputs
    # the revert pass: off on the CPU EP (a minute per try), 12 tries with CUDA, or as given
    assert args.revert_probes == 0 and "--revert-probes" not in steps["search-int8"].argv
    cuda = ["--providers", "CUDAExecutionProvider", "CPUExecutionProvider", "--calibration-eps", "cuda:0", "cpu"]
    for extra, tries in (([], "12"), (["--revert-probes", "3"], "3")):
        search = {s.name: s for s in plan(_args(wf, cuda + extra), run)}["search-fp8"].argv
        assert search[search.index("--revert-probes") + 1] == tries
    # --ks gives the fixed-K steps exactly as before
    fixed = {s.name for s in plan(_args(wf, ["--ks", "0", "5"]), run)}
    assert {"schemes-fp8", "candidates-fp8", "candidates-int8"} <= fixed and not any(
        n.startswith("search") for n in fixed
    )


def test_steps_wait_only_for_the_steps_they_read_from(wf, tmp_path):
    run = tmp_path / "demo"
    steps = plan(_args(wf, []), run)
    names = [s.name for s in steps]
    deps = {names[i]: {names[j] for j in d} for i, d in enumerate(dependencies(steps))}
    assert deps["baseline"] == {"dataset"} and deps["int8"] == {"calib"} and deps["int8-eval"] == {"dataset", "int8"}
    assert deps["smoke"] == set() and deps["calib"] == {"dataset"}  # calibration reads the generated images
    # the FP8 branch never waits for INT8's calibration: with --jobs 2 it runs beside it
    assert deps["fp8"] == {"calib"} and deps["sensitivity-fp8"] == {"calib", "fp8"}
    assert deps["search-fp8"] == {"dataset", "baseline", "baseline-confirm", "fp8", "sensitivity-fp8"}
    assert deps["search-int8"] == {"dataset", "baseline", "baseline-confirm", "int8", "int8-eval", "sensitivity-int8"}
    assert deps["report"] == {"baseline", "baseline-confirm", "int8-eval", "search-fp8", "search-int8"}
    cpu, cuda = _args(wf, []), _args(wf, ["--providers", "CUDAExecutionProvider"])
    assert (cpu.jobs, cpu.parallel_probes, cpu.max_probes) == (1, 1, 12)
    assert (cuda.jobs, cuda.parallel_probes, cuda.max_probes) == (3, 3, 36)


def _timed_step(tmp_path: Path, name: str, reads: list[str], fail: bool = False):
    """A step that records when it started and ended in tmp_path/<name>.txt, after reading its inputs."""
    code = (
        f"import sys, time; t0 = time.time(); time.sleep(1.5); sys.exit(1) if {fail} else None; "
        f"open({str(tmp_path / (name + '.txt'))!r}, 'w').write(f'{{t0}} {{time.time()}}')"
    )
    return Step(
        name,
        [sys.executable, "-c", code],
        outputs=[tmp_path / f"{name}.txt"],
        inputs=[tmp_path / f"{r}.txt" for r in reads],
    )


def _span(tmp_path: Path, name: str) -> tuple[float, float]:
    start, end = map(float, (tmp_path / f"{name}.txt").read_text().split())
    return start, end


def test_jobs_run_independent_steps_at_once_and_dependants_after(tmp_path):
    import logging

    steps = [
        _timed_step(tmp_path, "a", []),
        _timed_step(tmp_path, "b", []),
        _timed_step(tmp_path, "c", ["a"]),
        _timed_step(tmp_path, "d", ["b", "c"]),
    ]
    assert run_steps(tmp_path / "run", steps, set(), False, logging.getLogger("t"), jobs=2) == 0
    (a0, a1), (b0, b1), (c0, c1), (d0, _) = (_span(tmp_path, n) for n in "abcd")
    assert a0 < b1 and b0 < a1  # a and b overlapped
    assert c0 >= a1 and d0 >= max(b1, c1)
    # a failed step: what reads from it never runs, nothing failed is recorded, the run ends with 1
    bad = [_timed_step(tmp_path, "e", [], fail=True), _timed_step(tmp_path, "f", ["e"])]
    assert run_steps(tmp_path / "run2", bad, set(), False, logging.getLogger("t"), jobs=2) == 1
    assert not (tmp_path / "f.txt").exists() and not list((tmp_path / "run2" / ".steps").glob("*.json"))


def test_search_end_to_end_on_the_tiny_model(tiny_run):
    root, argv = tiny_run
    i = argv.index("--ks")
    search_argv = [*argv[:i], *argv[i + 3 :]]
    search_argv[search_argv.index("--run-id") + 1] = "tiny-search"
    search_argv[search_argv.index("--sensitivity-images") + 1] = "1"  # leave-one-out: (3 + nodes) runs per image
    search_argv += [
        "--random-seeds",
        "2",
        "--max-probes",
        "4",
        "--budget-ap",
        "0.5",
        "--jobs",
        "2",
        "--parallel-probes",
        "2",
        "--confirm-skip",  # ids 1-4 searched, 5-6 calibration, 7-8 the confirmation slice
        "6",
        "--confirm-images",
        "2",
        "--revert-probes",
        "2",
    ]
    result = _run(search_argv)
    assert result.returncode == 0, result.stderr[-3000:]
    run = root / "runs" / "tiny-search"
    report = json.loads((run / "report.json").read_text())
    assert {s["mode"] for s in report["search"]} == {"int8", "fp8"}
    for s in report["search"]:
        data = json.loads((run / f"search-{s['mode']}" / "search.json").read_text())
        assert data["ranking"]["method"] == "onnx_one_at_a_time_drift"
        probes, curve = data["search"]["probes"], data["search"]["curve"]
        assert len(probes) <= 4 and len({p["k"] for p in curve}) == len(curve) >= 1
        for p in probes:  # every probe is a real evaluation on the slice (INT8 K=0 is the int8-eval step's)
            assert (run / f"{s['mode']}-k{p['k']}-coco" / "metrics.json").is_file()
        assert [c["k"] for c in data["candidates"]] == sorted(p["k"] for p in probes)
        if data["search"]["k"] > 0:
            assert data["random_control"]["seeds"] == [0, 1]
        assert data["parallel"] == 2  # candidates evaluated two at a time in worker processes
        conf = data["confirmation"]
        if data["search"]["found"]:  # the pick, evaluated on the two images the search never saw
            assert conf["images"]["num_images"] == 2 and conf["attempts"]
            first = conf["attempts"][0]
            assert first["k"] == data["search"]["k"] and Path(first["metrics_path"]).parent.name.endswith(
                "-confirm-coco"
            )
            assert data["pick_k"] == (conf["k"] if conf["confirmed"] else data["search"]["k"])
        else:
            assert conf is None
        revert = data["revert"]
        if data["pick_k"] and conf and conf["confirmed"]:  # the revert pass: its tries apart, summed up in the report
            assert revert["start_k"] == data["pick_k"] and 1 <= len(revert["tries"]) <= 2
            for t in revert["tries"]:
                assert (
                    (run / t["metrics_path"])
                    .resolve()
                    .is_relative_to((run / f"search-{s['mode']}" / "revert").resolve())
                )
            assert s["revert"]["k"] == revert["k"] and s["revert"]["tries"] == len(revert["tries"])
        else:
            assert revert is None and s["revert"] is None
    assert (run / "baseline-confirm-coco" / "metrics.json").is_file()
    assert all(v.get("mac_share") is not None for v in report["variants"])
    assert not any("revert" in v["metrics_path"] for v in report["variants"])
    assert not any("revert" in d["path"] for d in report["dropped"]), report["dropped"]
    assert report["recommended"]["cost_source"] in ("mac_share", None)
    for name in ("report.md", "pareto.png", "search-curves.png"):
        assert (run / name).stat().st_size > 0


def _argv_dumper(tmp_path: Path) -> Path:
    """An executable that stands in for PYTHON and prints each argument on its own line."""
    path = tmp_path / "dump-argv"
    path.write_text('#!/bin/sh\nfor a in "$@"; do printf \'%s\\n\' "$a"; done\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _wrapper_argv(wrapper: Path, env: dict[str, str], dumper: Path) -> list[str]:
    base = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "LANG")}
    env = {**base, **env, "PYTHON": str(dumper)}
    result = subprocess.run(["bash", str(wrapper)], env=env, capture_output=True, text=True, timeout=60, check=True)
    return result.stdout.splitlines()


def _plans(wf, tmp_path: Path) -> dict[str, list[Step]]:
    """The plans of fixed K (local and torch rankings) and of the search (full and requantized candidates), with
    every setting off its default where the workflow has a flag for it."""
    onnx_path, data, calib_list, weights = (
        tmp_path / "det.onnx",
        tmp_path / "data",
        tmp_path / "list.txt",
        tmp_path / "det.pt",
    )
    calib_list.write_text("x.jpg\n")
    (tmp_path / "x.jpg").write_bytes(b"")  # the list's images must exist before the plan is made
    common = ["--onnx-path", str(onnx_path), "--data-root", str(data), "--calib-list", str(calib_list)]
    common += ["--max-images", "9", "--imgsz", "320", "--calibration-eps", "cuda:0", "cpu"]
    common += ["--providers", "CUDAExecutionProvider", "CPUExecutionProvider"]
    common += ["--calibration-method", "max", "--high-precision-dtype", "fp16", "--sensitivity-images", "4"]
    fixed = [*common, "--ks", "0", "3", "--random-control", "5"]
    torch = ["--sensitivity", "torch", "--weights", str(weights)]
    variants = {
        "fixed-local": [*fixed, "--sensitivity", "local"],
        "fixed-torch": [*fixed, *torch],
        "search": common,
        "search-torch-requantize": [*common, *torch, "--candidate-build", "requantize", "--random-band"],
    }
    return {name: plan(_args(wf, argv), tmp_path / "run") for name, argv in variants.items()}


def test_each_wrapper_run_with_the_settings_env_runs_the_settings_argv(wf, tmp_path):
    steps = [step for steps in _plans(wf, tmp_path).values() for step in steps]
    assert all(step.settings is not None and step.argv == step.settings.command() for step in steps)
    assert not any("bash" in step.argv[0] for step in steps)  # the workflow calls the scripts themselves
    settings: list[ScriptSettings] = list(dict.fromkeys(s.settings for s in steps if s.settings.wrapper is not None))
    # and the settings the plans leave at one value: each bool the other way, optional flags unset
    for s in list(settings):
        if isinstance(s, QuantizeSettings):
            settings.append(
                dataclasses.replace(s, use_zero_point=True, passes=(), calibration_method=None, overwrite=False)
            )
        if isinstance(s, MaterializeSettings):
            settings.append(dataclasses.replace(s, evaluate=False, include_random=False, overwrite=False))
    assert {type(s).__name__ for s in settings} == {"QuantizeSettings", "TorchSweepSettings", "MaterializeSettings"}
    dumper = _argv_dumper(tmp_path)
    for s in settings:
        wrapper_argv = _wrapper_argv(s.wrapper, s.env(), dumper)
        assert Path(wrapper_argv[0]).resolve() == s.script.resolve()
        assert wrapper_argv[1:] == s.argv(), s


def test_each_steps_argv_parses_with_its_scripts_own_parser(wf, tmp_path, load_script):
    for name, steps in _plans(wf, tmp_path).items():
        for step in steps:
            for path in step.inputs:  # a parser may check that an input file exists
                if path.suffix and not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.touch()
            script = load_script(str(step.settings.script.relative_to(REPO)))
            try:
                script.build_parser().parse_args(step.settings.argv())
            except SystemExit:
                pytest.fail(f"{name}: step {step.name}: {step.settings.script.name} refuses {step.settings.argv()}")


@pytest.mark.parametrize(
    "wrapper", ["materialize_yolov10m_lowbit_candidates.sh", "run_yolov10m_layer_sensitivity_sweep.sh"]
)
def test_wrappers_refuse_an_unknown_boolean(wrapper, tmp_path):
    env = {"RUN_ROOT": str(tmp_path), "CALIB_PATH": str(tmp_path / "c.npy"), "OVERWRITE": "maybe"}
    env |= {"PATH": os.environ["PATH"], "PYTHON": str(_argv_dumper(tmp_path))}
    command = ["bash", str(WRAPPERS / wrapper)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and result.stdout == ""
