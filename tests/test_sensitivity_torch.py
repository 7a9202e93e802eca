"""Torch per-layer sensitivity sweep: report layout and contents, the score (numpy and torch alike), the wrapper,
input errors."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lowbit import drift
from lowbit import sensitivity_torch as sens
from lowbit import sensitivity_torch_inputs as sweep_inputs
from lowbit.errors import UserError

REPO = Path(__file__).resolve().parent.parent
SCRIPT = "scripts/cv-models/yolov10m_layer_sensitivity.py"
WRAPPER = REPO / "scripts/cv-models/run_yolov10m_layer_sensitivity_sweep.sh"
REPORT = "layer-sensitivity-report"
IMGSZ = 64  # anchors 8^2 + 4^2 + 2^2 = 84: ~85 forward passes of yolov10n stay within seconds
SCHEMA_KEYS = {
    "schema_version",
    "kind",
    "source",
    "model",
    "model_sha256",
    "precision",
    "quant_format",
    "method",
    "data",
    "device",
    "wall_s",
    "layers",
}
ROW_KEYS = {"rank", "name", "op_type", "weight", "onnx_node", "score"}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: tiny convolutions gain nothing from two, and a busy 2-core runner loses a lot."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def image_list(tmp_path_factory) -> Path:
    """Three JPEGs of different sizes and aspect ratios (letterboxing does real work) and their list."""
    import cv2

    folder = tmp_path_factory.mktemp("sens_images")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(48, 80), (90, 60), (64, 64)]):
        img = (rng.random((h, w, 3)) * 80).astype(np.uint8)
        cv2.rectangle(img, (w // 4, h // 4), (w // 2 + i * 5, h // 2 + i * 5), (40 * i, 200, 255 - 60 * i), -1)
        cv2.circle(img, (3 * w // 4, 3 * h // 4), min(h, w) // 6, (255, 120, 30 * i), -1)
        path = folder / f"img{i}.jpg"
        cv2.imwrite(str(path), img)
        paths.append(path)
    list_path = folder / "images.txt"
    list_path.write_text("# sample images\n" + "\n".join(str(p) for p in paths) + "\n")
    return list_path


@pytest.fixture(scope="module")
def fp8_run(load_script, tiny_yolov10_pt, image_list, tmp_path_factory) -> dict:
    """One in-process FP8 sweep on the tiny model; its run dir, report and printed summary."""
    root = tmp_path_factory.mktemp("sens_runs")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = load_script(SCRIPT).main(
            [
                "--weights",
                str(tiny_yolov10_pt),
                "--images",
                str(image_list),
                "--num-images",
                "3",
                "--imgsz",
                str(IMGSZ),
                "--batch-size",
                "2",
                "--device",
                "cpu",
                "--output-root",
                str(root),
                "--run-id",
                "fp8",
            ]
        )
    run_dir = root / "fp8"
    per_layer = run_dir / "outputs" / tiny_yolov10_pt.stem / "fp8-fp8" / "per_layer"
    report = json.loads((per_layer / f"{REPORT}.json").read_text()) if rc == 0 else None
    return {"rc": rc, "run_dir": run_dir, "per_layer": per_layer, "report": report, "stdout": stdout.getvalue()}


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _check_scores(report: dict) -> None:
    scores = [row["score"] for row in report["layers"]]
    assert all(math.isfinite(s) and s >= 0 for s in scores), scores
    assert any(s > 0 for s in scores), "every score is 0"
    assert len(set(scores)) > len(scores) // 2, "scores are (mostly) equal"
    assert [row["rank"] for row in report["layers"]] == list(range(1, len(scores) + 1))
    assert scores == sorted(scores, reverse=True)
    assert report["reference"]["no_layer_quantized"] == 0.0
    assert report["reference"]["all_layers_quantized"] > 0


def test_writes_the_report_in_the_card_layout(fp8_run, tiny_yolov10_pt, image_list):
    assert fp8_run["rc"] == 0
    run_dir, per_layer, report = fp8_run["run_dir"], fp8_run["per_layer"], fp8_run["report"]
    assert sorted(p.name for p in per_layer.iterdir()) == [f"{REPORT}.csv", f"{REPORT}.json", f"{REPORT}.md"]
    assert (run_dir / "layer_sensitivity.log").stat().st_size > 0
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "ok"
    assert manifest["outputs"]["fp8-fp8.json"] == str(per_layer / f"{REPORT}.json")
    assert manifest["extra"]["formats"]["fp8-fp8"]["not_run"] == ["model.23.dfl.conv"]

    assert SCHEMA_KEYS <= set(report) and set(report) - SCHEMA_KEYS == {"reference"}
    assert report["schema_version"] == 1 and report["source"] == "torch"
    assert report["model"] == str(tiny_yolov10_pt)
    assert report["model_sha256"] == manifest["inputs"][str(tiny_yolov10_pt)]
    assert (report["precision"], report["quant_format"]) == ("fp8", "fp8-fp8")
    assert report["method"]["name"] == "one_layer_at_a_time"
    assert report["method"]["score"] == "output_drift_det_kl" and report["method"]["higher_is_more_sensitive"] is True
    assert "one layer at a time" in report["method"]["description"]
    assert report["data"] == {"images": 3, "source": str(image_list), "imgsz": IMGSZ}
    assert report["device"] == "cpu" and report["wall_s"] > 0
    assert all(set(row) == ROW_KEYS and row["onnx_node"] is None for row in report["layers"])

    with open(per_layer / f"{REPORT}.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["rank"]), r["name"], r["weight"] or None, float(r["score"])) for r in rows] == [
        (r["rank"], r["name"], r["weight"], r["score"]) for r in report["layers"]
    ]
    markdown = (per_layer / f"{REPORT}.md").read_text()
    assert f"| 1 | `{report['layers'][0]['name']}` |" in markdown
    assert f"SENS_RUN={run_dir}" in fp8_run["stdout"]


def test_scores_are_non_degenerate_and_ranked(fp8_run):
    _check_scores(fp8_run["report"])


def test_layers_are_the_quantized_modules_of_the_fused_model(fp8_run, tiny_yolov10_pt):
    """Every Conv of the fused raw-head model is scored once under its own name, plus SPPF's MaxPool."""
    import torch

    fused, _ = sweep_inputs.prepare_model(tiny_yolov10_pt, IMGSZ)
    params = dict(fused.named_parameters())
    rows = fp8_run["report"]["layers"]
    for row in rows:
        module = fused.get_submodule(row["name"])
        if row["op_type"] == "Conv":
            assert isinstance(module, torch.nn.Conv2d)
            assert row["weight"] == row["name"] + ".weight" and row["weight"] in params
        else:
            assert row["op_type"] == "MaxPool" and isinstance(module, torch.nn.MaxPool2d) and row["weight"] is None
    convs = {n for n, m in fused.named_modules() if isinstance(m, torch.nn.Conv2d) and not n.endswith(".dfl.conv")}
    scored = [row["name"] for row in rows if row["op_type"] == "Conv"]
    assert len(scored) == len(set(scored)) and set(scored) == convs
    assert [row["name"] for row in rows if row["op_type"] == "MaxPool"] == ["model.9.m"]


def test_weight_names_are_the_exported_conv_initializers(fp8_run, tiny_yolov10_onnx):
    """The link the scheme maker uses: each scored weight feeds exactly one Conv of the raw-head ONNX export."""
    import onnx

    graph = onnx.load(str(tiny_yolov10_onnx)).graph
    conv_weights = [node.input[1] for node in graph.node if node.op_type == "Conv"]
    scored = [row["weight"] for row in fp8_run["report"]["layers"] if row["weight"]]
    assert sorted(scored) == sorted(conv_weights)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_det_kl_weighs_what_detection_uses(backend):
    """A logit shift of the same size costs far more on a confident class than on background (both drift twins)."""
    import torch

    reg_max, nc, anchors = 16, 2, 3
    ref = torch.full((1, 4 * reg_max + nc, anchors), -10.0)
    ref[:, : 4 * reg_max] = torch.linspace(-1, 1, 4 * reg_max * anchors).reshape(1, 4 * reg_max, anchors)
    ref[0, 4 * reg_max, 0] = 3.0  # anchor 0 detects class 0 with p = 0.95; anchors 1, 2 are background

    def scores(changed):
        if backend == "numpy":
            return drift.finish_scores(drift.drift_sums(ref.numpy(), changed.numpy(), reg_max))
        return drift.finish_scores(drift.drift_sums_torch(ref, changed, reg_max))

    assert scores(ref.clone()) == {"output_drift_det_kl": 0.0, "output_drift_rel_mse": 0.0}
    background, confident = ref.clone(), ref.clone()
    background[0, 4 * reg_max, 2] += 2.0
    confident[0, 4 * reg_max, 0] -= 2.0
    assert scores(background)["output_drift_rel_mse"] == pytest.approx(scores(confident)["output_drift_rel_mse"])
    assert scores(confident)["output_drift_det_kl"] > 100 * scores(background)["output_drift_det_kl"] > 0
    box_background, box_confident = ref.clone(), ref.clone()
    box_background[0, :reg_max, 2] += torch.linspace(0, 2, reg_max)
    box_confident[0, :reg_max, 0] += torch.linspace(0, 2, reg_max)
    assert scores(box_confident)["output_drift_det_kl"] > 100 * scores(box_background)["output_drift_det_kl"] > 0


def test_numpy_drift_equals_the_torch_twin():
    """The ONNX rankings' numpy drift and the torch sweep's agree to float64 rounding on realistic raw outputs."""
    import torch

    rng = np.random.default_rng(0)
    reg_max, nc, anchors = 16, 80, 525
    reference = rng.normal(0, 3, (2, 4 * reg_max + nc, anchors)).astype(np.float32)
    reference[:, 4 * reg_max :] -= 8  # mostly background, as a detector's class logits are
    quantized = (reference + rng.normal(0, 0.05, reference.shape)).astype(np.float32)
    sums = drift.drift_sums(reference, quantized, reg_max)
    twin = drift.drift_sums_torch(torch.from_numpy(reference), torch.from_numpy(quantized), reg_max)
    assert sums.keys() == twin.keys() and sums["images"] == twin["images"] == 2
    assert all(sums[key] == pytest.approx(twin[key], rel=1e-12, abs=0) for key in sums), (sums, twin)
    assert drift.finish_scores(sums) == pytest.approx(drift.finish_scores(twin), rel=1e-12, abs=0)
    assert drift.finish_scores(drift.add_sums(sums, sums)) == pytest.approx(drift.finish_scores(sums), rel=1e-15)


def test_wrapper_maps_env_vars(tiny_yolov10_pt, image_list, tmp_path):
    """INT8 with the relative-MSE score, from a calibration .npy, through the bash wrapper."""
    from lowbit.preprocess import preprocess

    lines = [line for line in image_list.read_text().splitlines() if line and not line.startswith("#")]
    npy = tmp_path / "calib.npy"
    np.save(npy, np.stack([preprocess(p, IMGSZ)[0] for p in lines]))
    env = {k: v for k, v in os.environ.items() if k not in ("WEIGHTS", "IMAGES", "RUN_ID", "OUTPUT_ROOT")}
    env.update(
        PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
        WEIGHTS=str(tiny_yolov10_pt),
        CALIB_NPY=str(npy),
        NUM_IMAGES="2",
        IMGSZ=str(IMGSZ),
        BATCH_SIZE="2",
        DEVICE="cpu",
        FORMATS="int8-int8",
        METRIC="rel_mse",
        OUTPUT_ROOT=str(tmp_path / "runs"),
        RUN_ID="wrapped",
    )
    result = subprocess.run(
        ["bash", str(WRAPPER)], check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    echoed = result.stderr.splitlines()[0]
    assert echoed.startswith("+ ") and "--formats int8-int8" in echoed and "--batch-size 2" in echoed

    run_dir = tmp_path / "runs" / "wrapped"
    report = json.loads((sens.report_dir(run_dir, "int8-int8", tiny_yolov10_pt) / f"{REPORT}.json").read_text())
    assert (report["precision"], report["quant_format"]) == ("int8", "int8-int8")
    assert report["method"]["score"] == "output_drift_rel_mse"
    assert report["data"] == {"images": 2, "source": str(npy), "imgsz": IMGSZ}
    _check_scores(report)
    args = json.loads((run_dir / "manifest.json").read_text())["args"]
    assert (args["batch_size"], args["device"], args["num_images"]) == (2, "cpu", 2)


@pytest.mark.parametrize(
    "case, flag",
    [
        ("no_default_weights", "--weights"),
        ("missing_weights", "--weights"),
        ("missing_list", "--images"),
        ("zero_images", "--num-images"),
        ("npy_size", "--calib-npy"),
        ("existing_run", "--overwrite"),
        pytest.param("no_cuda", "--device", marks=pytest.mark.skipif(_has_cuda(), reason="CUDA present")),
    ],
)
def test_bad_inputs_exit_2_with_one_line(
    case, flag, load_script, tiny_yolov10_pt, image_list, tmp_path, capsys, monkeypatch
):
    root = tmp_path / "runs"
    argv = ["--weights", str(tiny_yolov10_pt), "--images", str(image_list), "--imgsz", str(IMGSZ), "--num-images", "3"]
    if case == "no_default_weights":
        monkeypatch.setattr(sweep_inputs, "REPO_ROOT", tmp_path)  # the default paths resolve to nothing
        argv = argv[2:]
    elif case == "missing_weights":
        argv[1] = str(tmp_path / "absent.pt")
    elif case == "missing_list":
        argv[3] = str(tmp_path / "absent.txt")
    elif case == "zero_images":
        argv += ["--num-images", "0"]
    elif case == "npy_size":
        np.save(tmp_path / "calib.npy", np.zeros((1, 3, 32, 32), np.float32))
        argv = argv[:2] + ["--calib-npy", str(tmp_path / "calib.npy"), "--imgsz", str(IMGSZ), "--num-images", "1"]
    elif case == "existing_run":
        (root / "taken").mkdir(parents=True)
        argv += ["--run-id", "taken"]
    elif case == "no_cuda":
        argv += ["--device", "cuda"]
    script = load_script(SCRIPT)
    argv += ["--output-root", str(root)]
    rc = script.main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith(("error: ", "usage: ")) and "Traceback" not in err and flag in err.splitlines()[-1], err
    if case != "zero_images":  # argparse's usage errors exit before main's body
        with pytest.raises(UserError) as raised:
            script.main.__wrapped__(argv)
        assert raised.value.flag == flag
    if case == "no_default_weights":
        assert str(sweep_inputs.DEMO_WEIGHTS) in err and str(sweep_inputs.YOLOV10M_WEIGHTS) in err
    if root.exists():  # nothing was created: no run dir for bad input
        assert [p.name for p in root.iterdir()] == (["taken"] if case == "existing_run" else [])


def test_help_is_fast_and_imports_no_torch():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(REPO / SCRIPT), "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "--weights" in result.stdout and "--calib-npy" in result.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    heavy = imported & {"torch", "modelopt", "ultralytics", "cv2"}
    assert not heavy, heavy


def test_starting_at_the_layers_block_changes_no_score(tiny_yolov10_pt):
    """Skipping the blocks before a quantized layer (cached FP32 outputs) gives the full pass's scores."""
    import torch

    model, _ = sweep_inputs.prepare_model(tiny_yolov10_pt, IMGSZ)
    images = torch.rand(2, 3, IMGSZ, IMGSZ, generator=torch.Generator().manual_seed(0))
    cache = sens.fp32_cache(model, images, batch_size=2)
    with torch.inference_mode():
        assert torch.equal(cache[0][1][-1], model(images))
    model, calls = sens.quantize_model(model, "fp8-fp8", images, batch_size=2)
    layers, _ = sens.quant_layers(model, calls)
    maxpool = next(layer for layer in layers if layer.op_type == "MaxPool")
    picked = [layers[0], maxpool, layers[len(layers) // 2], layers[-1]]
    assert len({layer.block for layer in picked}) == 4 and picked[0].block == 0 and picked[-1].block == 23
    fast = sens.sweep_layers(model, picked, cache, reg_max=16)
    full = sens.sweep_layers(model, picked, cache, reg_max=16, skip_unchanged_blocks=False)
    for layer in picked:
        assert fast["per_layer"][layer.name] == pytest.approx(full["per_layer"][layer.name], rel=1e-6, abs=0)
        assert fast["per_layer"][layer.name]["output_drift_det_kl"] > 0
    assert fast["no_layer_quantized"] == {"output_drift_det_kl": 0.0, "output_drift_rel_mse": 0.0}
