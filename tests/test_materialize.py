"""Candidate materializer (card step 4c) on the tiny YOLOv10 fixture."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest

from lowbit.errors import UserError
from lowbit.runs import sha256_file

REPO = Path(__file__).resolve().parent.parent
SCRIPT = "scripts/cv-models/materialize_yolov10m_lowbit_candidates.py"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_yolov10_onnx, tiny_yolov10_spec, load_script):
    root = tmp_path_factory.mktemp("mat")
    size = tiny_yolov10_spec["imgsz"]
    calib = root / "calib.npy"
    np.save(calib, np.random.default_rng(0).random((2, 3, size, size), dtype=np.float32))
    convs = [
        n.name for n in onnx.load(str(tiny_yolov10_onnx), load_external_data=False).graph.node if n.op_type == "Conv"
    ]
    schemes = root / "run" / "schemes"
    schemes.mkdir(parents=True)
    for k, names in ((0, []), (2, convs[3:5])):
        (schemes / f"scheme_k{k}.json").write_text(json.dumps({"k": k, "nodes_to_exclude": names}))
    (schemes / "scheme_k2_random7.json").write_text(json.dumps({"k": 2, "nodes_to_exclude": convs[10:12]}))
    data = root / "data"
    assert (
        load_script("scripts/cv-models/make_demo_dataset.py").main(
            ["--out-root", str(data), "--splits", "val", "--num-val", "3", "--workers", "1"]
        )
        == 0
    )
    return {"root": root, "calib": calib, "onnx": tiny_yolov10_onnx, "data": data, "convs": convs, "size": size}


def _argv(setup, run: Path, *extra: str) -> list[str]:
    return ["--run-root", str(run), "--calib-path", str(setup["calib"]), "--onnx-path", str(setup["onnx"]), *extra]


def _raises(load_script, argv: list[str]) -> UserError:
    """The UserError that ``main(argv)`` exits 2 with (the undecorated main raises it)."""
    with pytest.raises(UserError) as exc:
        load_script(SCRIPT).main.__wrapped__(argv)
    return exc.value


def test_materializes_each_k_with_its_exclusions_and_evaluates(setup, load_script):
    run = setup["root"] / "run"
    argv = _argv(
        setup,
        run,
        "--ks",
        "0",
        "2",
        "--quant-mode",
        "int8",
        "--include-random",
        "--eval",
        "--data-root",
        str(setup["data"]),
        "--max-images",
        "3",
        "--imgsz",
        str(setup["size"]),
        "--warmup-runs",
        "0",
        "--skip-latency",
        "0",
    )
    assert load_script(SCRIPT).main(argv) == 0
    summary = json.loads((run / "candidates-int8" / "summary.json").read_text())
    rows = {r["candidate"]: r for r in summary["candidates"]}
    assert set(rows) == {"int8-k0", "int8-k2", "int8-k2_random7"}
    assert rows["int8-k2"]["excluded_nodes"] == setup["convs"][3:5]
    assert rows["int8-k2_random7"]["random_control"] is True
    assert rows["int8-k0"]["num_quantized_nodes"] > rows["int8-k2"]["num_quantized_nodes"]
    stem = setup["onnx"].stem  # output names follow the model
    for tag in ("k0", "k2"):
        model = run / "onnx" / f"{stem}-int8-{tag}.onnx"
        quantized = set(json.loads(model.with_suffix(".manifest.json").read_text())["extra"]["quantized_nodes"])
        assert not quantized & set(rows[f"int8-{tag}"]["excluded_nodes"])
        metrics = json.loads((run / f"int8-{tag}-coco" / "metrics.json").read_text())
        assert rows[f"int8-{tag}"]["map50_95"] == metrics["metrics"]["map50_95"]
        record = json.loads(model.with_suffix(".inputs.json").read_text())
        assert record["kind"] == "scheme-candidate" and record["schema_version"] == 1
        assert record["build"]["onnx_sha256"] == sha256_file(setup["onnx"])
        assert record["build"]["calib_sha256"] == sha256_file(setup["calib"])
        assert record["model_sha256"] == sha256_file(model)
        assert record["metrics_sha256"] == sha256_file(run / f"int8-{tag}-coco" / "metrics.json")

    # a second run reuses what is complete
    before = (run / "onnx" / f"{stem}-int8-k2.onnx").stat().st_mtime_ns
    assert load_script(SCRIPT).main(argv) == 0
    assert (run / "onnx" / f"{stem}-int8-k2.onnx").stat().st_mtime_ns == before

    # other evaluation settings: the old metrics are not passed off as the new ones
    changed = [a if a != "3" else "2" for a in argv]
    assert _raises(load_script, changed).flag == "--overwrite"


def test_changed_inputs_are_not_kept_silently(setup, load_script, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(setup["root"] / "run" / "schemes", run / "schemes")
    argv = _argv(setup, run, "--ks", "0", "--quant-mode", "int8")
    assert load_script(SCRIPT).main(argv) == 0
    summary = run / "candidates-int8" / "summary.json"
    manifest = run / "candidates-int8" / "manifest.json"
    first = (summary.read_bytes(), manifest.read_bytes())

    other_calib = tmp_path / "other.npy"
    np.save(other_calib, np.random.default_rng(1).random((2, 3, setup["size"], setup["size"]), dtype=np.float32))
    changed = _argv(setup, run, "--ks", "0", "--quant-mode", "int8")
    changed[changed.index("--calib-path") + 1] = str(other_calib)
    assert _raises(load_script, changed).flag == "--overwrite"
    assert (summary.read_bytes(), manifest.read_bytes()) == first  # nothing claims the new inputs

    assert load_script(SCRIPT).main([*changed, "--overwrite"]) == 0
    record_path = run / "onnx" / f"{setup['onnx'].stem}-int8-k0.inputs.json"
    record = json.loads(record_path.read_text())
    assert record["build"]["calib_sha256"] == sha256_file(other_calib)
    assert json.loads(manifest.read_text())["inputs"][str(other_calib)] == sha256_file(other_calib)
    assert json.loads(manifest.read_text())["kind"] == "materialize"

    # a record that names no kind (written before records named their kind) is no record of its inputs
    del record["kind"]
    record_path.write_text(json.dumps(record))
    error = _raises(load_script, changed)
    assert error.flag == "--overwrite" and "no record of its inputs" in str(error) and "names no kind" in str(error)


@pytest.mark.parametrize(
    ("case", "flag"),
    [
        ("missing_scheme", "--schemes-dir"),
        ("malformed_scheme", "--schemes-dir"),
        ("foreign_scheme", "--schemes-dir"),
        ("int4", "--quant-mode"),
        ("negative_k", "--ks"),
        ("eval_max_images", "--max-images"),
        ("eval_imgsz", "--imgsz"),
        ("eval_data_root", "--data-root"),
    ],
)
def test_bad_input_fails_before_anything_is_quantized(case, flag, setup, tmp_path, load_script):
    run = tmp_path / "run"
    shutil.copytree(setup["root"] / "run" / "schemes", run / "schemes")
    extra = {
        "missing_scheme": ["--ks", "0", "5"],
        "malformed_scheme": ["--ks", "0", "2"],
        "foreign_scheme": ["--ks", "0", "2"],
        "int4": ["--quant-mode", "int4"],
        "negative_k": ["--ks", "-1"],
        "eval_max_images": ["--ks", "0", "--eval", "--data-root", str(setup["data"]), "--max-images", "0"],
        "eval_imgsz": ["--ks", "0", "--eval", "--data-root", str(setup["data"]), "--imgsz", "100"],
        "eval_data_root": ["--ks", "0", "--eval", "--data-root", str(tmp_path / "none")],
    }[case]
    if case == "malformed_scheme":
        (run / "schemes" / "scheme_k2.json").write_text('{"k": 2, "nodes_to_exclude": "oops"}')
    if case == "foreign_scheme":
        (run / "schemes" / "scheme_k2.json").write_text(
            json.dumps({"k": 2, "nodes_to_exclude": ["/x/Conv", "/y/Conv"]})
        )
    assert _raises(load_script, _argv(setup, run, *extra)).flag == flag
    assert load_script(SCRIPT).main(_argv(setup, run, *extra)) == 2
    assert not (run / "onnx").exists() and not (run / "candidates-int8").exists()


def test_missing_calibration_names_its_flag(setup, tmp_path, load_script):
    argv = _argv(setup, setup["root"] / "run")
    argv[argv.index("--calib-path") + 1] = str(tmp_path / "none.npy")
    assert _raises(load_script, argv).flag == "--calib-path"
    assert load_script(SCRIPT).main(argv) == 2


def test_wrapper_requires_its_env_vars(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RUN_ROOT", "CALIB_PATH")}
    result = subprocess.run(
        ["bash", str(REPO / "scripts/cv-models/materialize_yolov10m_lowbit_candidates.sh")],
        cwd=REPO,
        env={**env, "PYTHON": "false"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0 and result.stdout == ""


@pytest.fixture(scope="module")
def full_int8(setup):
    from lowbit.quantize import QuantizeSettings, quantize_onnx

    out = setup["root"] / "full" / "full-int8.onnx"
    quantize_onnx(
        QuantizeSettings(onnx_path=setup["onnx"], calib_path=setup["calib"], output_path=out, quantize_mode="int8")
    )
    return out


def _eval_flags(setup) -> list[str]:
    return [
        "--eval",
        "--data-root",
        str(setup["data"]),
        "--max-images",
        "3",
        "--imgsz",
        str(setup["size"]),
        "--warmup-runs",
        "0",
        "--skip-latency",
        "0",
    ]


def test_from_full_model_removes_qdq_pairs_without_recalibrating(setup, full_int8, load_script, tmp_path):
    from lowbit.qdq_graph import qdq_summary

    run = tmp_path / "run"
    shutil.copytree(setup["root"] / "run" / "schemes", run / "schemes")
    argv = _argv(
        setup, run, "--ks", "0", "2", "--quant-mode", "int8", "--from-full-model", str(full_int8), *_eval_flags(setup)
    )
    assert load_script(SCRIPT).main(argv) == 0
    stem = setup["onnx"].stem
    k2 = onnx.load(str(run / "onnx" / f"{stem}-int8-k2.onnx"))
    quantized = set(qdq_summary(k2.graph)["quantized_nodes"])
    assert quantized and not quantized & set(setup["convs"][3:5])
    assert set(qdq_summary(onnx.load(str(full_int8)).graph)["quantized_nodes"]) - quantized == set(setup["convs"][3:5])
    record = json.loads((run / "onnx" / f"{stem}-int8-k2.inputs.json").read_text())
    assert record["build"]["from_full_model_sha256"] == sha256_file(full_int8)
    assert not (run / "onnx" / f"{stem}-int8-k2.manifest.json").exists()  # ModelOpt did not run
    assert (run / "int8-k2-coco" / "metrics.json").is_file()


def test_compare_requantize_prints_the_table_of_both_builds(setup, full_int8, load_script, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(setup["root"] / "run" / "schemes", run / "schemes")
    argv = _argv(
        setup,
        run,
        "--ks",
        "2",
        "--quant-mode",
        "int8",
        "--from-full-model",
        str(full_int8),
        "--compare-requantize",
        *_eval_flags(setup),
    )
    assert load_script(SCRIPT).main(argv) == 0
    out = capsys.readouterr().out
    assert "| K | AP full-model edit | AP ModelOpt re-quantization |" in out and "\n| 2 |" in out
    compare = tmp_path / "run-compare-int8"
    assert (compare / "int8-k2-coco" / "metrics.json").is_file() and (
        compare / "int8-k2-requant-coco" / "metrics.json"
    ).is_file()
    assert not list(run.glob("*-coco"))  # nothing lands where the run's report would read it
    # a rerun reuses both evaluated candidates (their records match)
    before = {p: p.stat().st_mtime_ns for p in compare.rglob("metrics.json")}
    assert load_script(SCRIPT).main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in compare.rglob("metrics.json")} == before
    print(capsys.readouterr().out)
    no_eval = [a for a in argv if a != "--eval"]
    assert _raises(load_script, no_eval).flag == "--compare-requantize"
    no_full = argv[: argv.index("--from-full-model")] + argv[argv.index("--from-full-model") + 2 :]
    assert _raises(load_script, no_full).flag == "--from-full-model"


def test_a_second_writer_of_the_run_folder_is_refused(setup, tmp_path, load_script, folder_held_elsewhere):
    run = tmp_path / "busy"
    with folder_held_elsewhere(run) as holder:
        error = _raises(
            load_script, _argv(setup, run, "--schemes-dir", str(setup["root"] / "run" / "schemes"), "--ks", "0")
        )
    assert error.flag == "--run-root" and f"pid {holder.pid}" in str(error)
    assert not (run / "candidates-fp8").exists() and not list(run.rglob("*.onnx"))


def test_candidate_names_have_one_home(tmp_path):
    from lowbit import schemes
    from lowbit.candidates import candidate_files, candidate_name

    assert schemes.candidate_tag(12, 0) == "k12_random0" and schemes.candidate_tag(5) == "k5"
    assert candidate_name("int8", 12, 0) == "int8-k12_random0" and candidate_name("fp8", 0) == "fp8-k0"
    assert schemes.scheme_path(tmp_path, 12, 0).name == "scheme_k12_random0.json"
    model, metrics = candidate_files(tmp_path, "m", "int8-k12_random0")
    assert model == tmp_path / "onnx" / "m-int8-k12_random0.onnx"
    assert metrics == tmp_path / "int8-k12_random0-coco" / "metrics.json"


def test_the_materializer_library_takes_settings_not_namespaces():
    import dataclasses

    from lowbit import candidates_materialize

    for module in (
        "candidates",
        "candidates_build",
        "candidates_compare",
        "candidates_materialize",
        "candidates_ranking",
    ):
        assert "import argparse" not in (REPO / "lowbit" / f"{module}.py").read_text(), module
    assert dataclasses.fields(candidates_materialize.MaterializeSettings)
    assert candidates_materialize.MaterializeSettings.__dataclass_params__.frozen
