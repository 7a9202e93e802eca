"""The budget search refuses inputs that do not belong together, before it writes or builds anything,
and its candidate cache is keyed by content (search_yolov10m_lowbit_budget.py, lowbit.search_checks.check_inputs,
lowbit.candidates.CandidateStore).

The world: a tiny float detector (three Conv nodes feeding an output that is the ground truth, see
test_evaluate.py's oracle), an INT8 and an FP8 Q/DQ model of it with a quantizer manifest beside the INT8
one, an ONNX ranking of its three Convs, and real evaluator metrics of the float and INT8 models.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_evaluate import IMGSZ, make_dataset, oracle_raw_output

from lowbit import records, search_checks, sensitivity_report
from lowbit.errors import UserError
from lowbit.evaluate import EvalSettings, evaluate
from lowbit.runs import sha256_file

SCRIPT = "scripts/cv-models/search_yolov10m_lowbit_budget.py"
CONVS = ["conv1", "conv2", "conv3"]
MAX_IMAGES = 2  # of the dataset's 3: a baseline scored on all 3 is on other images


# ---------------------------------------------------------------------------------------------------------------------
# the world


def float_model(path: Path, seed: int = 0) -> Path:
    """images [1,3,64,64] -> 3 x (Conv, Relu) -> mean x 0 + the oracle raw output [1, 66, 84]."""
    rng = np.random.default_rng(seed)
    nodes, inits, x, channels = [], [], "images", [3, 4, 4, 4]
    for i, name in enumerate(CONVS, 1):
        weight = rng.normal(0, 0.3, (channels[i], channels[i - 1], 3, 3)).astype(np.float32)
        inits += [
            numpy_helper.from_array(weight, f"w{i}"),
            numpy_helper.from_array(np.zeros(channels[i], np.float32), f"b{i}"),
        ]
        nodes += [
            helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], name=name, pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"),
        ]
        x = f"r{i}"
    output = oracle_raw_output()
    nodes += [
        helper.make_node("ReduceMean", [x, "axes"], ["mean4"], name="mean", keepdims=1),
        helper.make_node("Reshape", ["mean4", "shape3"], ["mean3"], name="reshape"),
        helper.make_node("Mul", ["mean3", "zero"], ["zeroed"], name="mul"),
        helper.make_node("Add", ["zeroed", "const"], ["output0"], name="add"),
    ]
    inits += [
        numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes"),
        numpy_helper.from_array(np.array([1, 1, 1], np.int64), "shape3"),
        numpy_helper.from_array(np.zeros((1, 1, 1), np.float32), "zero"),
        numpy_helper.from_array(output, "const"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, IMGSZ, IMGSZ])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, list(output.shape))],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def qdq_model(fp32: Path, path: Path, dtype: int) -> Path:
    """``fp32`` with a per-tensor Q/DQ pair (zero-points of ``dtype``) on every Conv's activation and weight."""
    model = onnx.load(fp32)
    graph = model.graph
    weights = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    qmax = 448.0 if dtype == TensorProto.FLOAT8E4M3FN else 127.0
    nodes = []
    for node in graph.node:
        if node.op_type == "Conv":
            for position in (0, 1):
                tensor = node.input[position]
                scale = float(np.abs(weights[tensor]).max()) / qmax if tensor in weights else 0.05
                graph.initializer.extend(
                    [
                        numpy_helper.from_array(np.array(scale, np.float32), f"{tensor}_scale"),
                        helper.make_tensor(f"{tensor}_zp", dtype, [], [0]),
                    ]
                )
                args = [f"{tensor}_scale", f"{tensor}_zp"]
                nodes += [
                    helper.make_node("QuantizeLinear", [tensor, *args], [f"{tensor}_q"], name=f"{tensor}_Q"),
                    helper.make_node("DequantizeLinear", [f"{tensor}_q", *args], [f"{tensor}_dq"], name=f"{tensor}_DQ"),
                ]
                node.input[position] = f"{tensor}_dq"
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, path)
    return path


def quantizer_manifest(model: Path, fp32: Path, mode: str) -> Path:
    """What lowbit.quantize writes beside its output (the keys the search reads)."""
    path = model.with_suffix(".manifest.json")
    path.write_text(
        json.dumps(
            {
                "kind": "quantize",
                "script": "quantize_yolov10m_onnx.py",
                "status": "ok",
                "args": {"onnx_path": str(fp32)},
                "inputs": {str(fp32): sha256_file(fp32)},
                "extra": {"output_sha256": sha256_file(model), "settings": {"quantize_mode": mode}},
            }
        )
    )
    return path


def ranking(
    out_dir: Path,
    fp32: Path,
    precision: str = "int8",
    nodes=tuple(CONVS),
    source: str = "onnx",
    model_sha256: str | None = None,
) -> Path:
    layers = [
        {"name": n, "op_type": "Conv", "weight": None, "onnx_node": n, "score": float(10 - i)}
        for i, n in enumerate(nodes)
    ]
    report = sensitivity_report.make_report(
        source=source,
        model=fp32,
        model_sha256=model_sha256 or sha256_file(fp32),
        precision=precision,
        method={"name": "loo", "description": "test", "score": "drift", "higher_is_more_sensitive": True},
        data={"images": 2, "source": "test", "imgsz": IMGSZ},
        device="cpu",
        wall_s=0.0,
        layers=sensitivity_report.rank_layers(layers),
    )
    return sensitivity_report.write_report(out_dir, report)["json"]


def scored(model: Path, data_root: Path, out: Path, max_images: int | None = MAX_IMAGES) -> Path:
    """A real evaluator metrics.json of ``model`` (an earlier one at ``out`` is replaced)."""
    settings = EvalSettings(model, data_root, max_images=max_images, imgsz=IMGSZ, out=out, overwrite=True)
    evaluate(dataclasses.replace(settings, warmup_runs=0, skip_latency=0, workers=0))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("search_trust")
    w = {"data": make_dataset(root / "coco")}
    w["fp32"] = float_model(root / "tiny.onnx")
    (root / "other").mkdir()
    w["other_fp32"] = float_model(root / "other" / "tiny.onnx", seed=1)  # same graph, other weights
    w["int8"] = qdq_model(w["fp32"], root / "tiny-int8-qdq.onnx", TensorProto.INT8)
    w["fp8"] = qdq_model(w["fp32"], root / "tiny-fp8-qdq.onnx", TensorProto.FLOAT8E4M3FN)
    quantizer_manifest(w["int8"], w["fp32"], "int8")
    w["ranking"] = ranking(root / "rank-int8", w["fp32"])
    w["baseline"] = scored(w["fp32"], w["data"], root / "baseline-coco" / "metrics.json")
    w["k0"] = scored(w["int8"], w["data"], root / "int8-coco" / "metrics.json")
    w["root"] = root
    return w


def argv(world, run_root: Path, **changes) -> list[str]:
    """The search's command line on ``world``; ``changes``: flag (underscores for dashes) -> value, None drops it."""
    flags = {
        "--mode": "int8",
        "--run-root": run_root,
        "--ranking": world["ranking"],
        "--onnx-path": world["fp32"],
        "--full-model": world["int8"],
        "--baseline-metrics": world["baseline"],
        "--k0-metrics": world["k0"],
        "--data-root": world["data"],
        "--max-images": MAX_IMAGES,
        "--imgsz": IMGSZ,
        "--warmup-runs": 0,
        "--skip-latency": 0,
        "--random-seeds": 0,
    }
    for key, value in changes.items():
        flags["--" + key.replace("_", "-")] = value
    out = []
    for flag, value in flags.items():
        if value is not None:
            out += [flag, *(str(v) for v in value)] if isinstance(value, list) else [flag, str(value)]
    return out


def expect_refusal(load_script, capsys, args: list[str], run_root: Path, flag: str, *named: str) -> UserError:
    """``check_inputs`` raises a UserError about ``flag``; the script exits 2 with one ``error:`` line naming
    ``flag`` and ``named``; nothing exists under ``run_root`` (no search-<mode>/, no candidate model)."""
    script = load_script(SCRIPT)
    with pytest.raises(UserError) as info:
        search_checks.check_inputs(script.config(script.build_parser().parse_args(args)))
    assert info.value.flag == flag, info.value
    capsys.readouterr()
    assert script.main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and flag in errors[0], errors
    assert all(str(name) in errors[0] for name in named), errors[0]
    assert not (run_root / "search-int8" / "search.json").exists()
    assert not list(run_root.rglob("*.onnx")) if run_root.exists() else True
    assert not run_root.exists(), f"{run_root} was created by a refused search"
    return info.value


def metrics_copy(src: Path, dst: Path, edit) -> Path:
    data = json.loads(src.read_text())
    edit(data)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(data))  # json.dumps writes NaN as the token NaN, as the evaluator would
    return dst


# ---------------------------------------------------------------------------------------------------------------------
# 1-2: the full model against --mode and --onnx-path


def test_fp8_full_model_searched_as_int8(world, tmp_path, load_script, capsys):
    run = tmp_path / "run"
    expect_refusal(
        load_script,
        capsys,
        argv(world, run, full_model=world["fp8"], k0_metrics=None),
        run,
        "--full-model",
        world["fp8"],
        "float8e4m3fn",
        "--mode is int8",
    )


def test_full_model_without_qdq(world, tmp_path, load_script, capsys):
    run = tmp_path / "run"
    expect_refusal(
        load_script,
        capsys,
        argv(world, run, full_model=world["fp32"], k0_metrics=None),
        run,
        "--full-model",
        world["fp32"],
        "no Q/DQ",
    )


def test_quantizer_manifest_of_another_mode(world, tmp_path, load_script, capsys):
    full = Path(shutil.copy(world["int8"], tmp_path / "tiny-int8-qdq.onnx"))
    manifest = quantizer_manifest(full, world["fp32"], "fp8")
    run = tmp_path / "run"
    expect_refusal(
        load_script, capsys, argv(world, run, full_model=full, k0_metrics=None), run, "--full-model", manifest, "'fp8'"
    )


def test_onnx_path_is_not_the_model_the_full_model_came_from(world, tmp_path, load_script, capsys):
    run = tmp_path / "run"
    error = expect_refusal(
        load_script,
        capsys,
        argv(world, run, onnx_path=world["other_fp32"]),
        run,
        "--onnx-path",
        world["other_fp32"],
        world["int8"].with_suffix(".manifest.json"),
    )
    assert "quantized from" in str(error)


def test_truncated_models_name_their_flag(world, tmp_path, load_script, capsys):
    for flag, key in (("--full-model", "int8"), ("--onnx-path", "fp32")):
        cut = tmp_path / f"cut-{key}.onnx"
        cut.write_bytes(world[key].read_bytes()[:300])
        run = tmp_path / f"run-{key}"
        expect_refusal(load_script, capsys, argv(world, run, **{flag[2:]: cut}), run, flag, cut, "not an ONNX model")


# ---------------------------------------------------------------------------------------------------------------------
# 3-4: the metrics against the models and the evaluation slice


def test_fp32_metrics_passed_as_k0(world, tmp_path, load_script, capsys):
    run = tmp_path / "run"
    expect_refusal(
        load_script,
        capsys,
        argv(world, run, k0_metrics=world["baseline"]),
        run,
        "--k0-metrics",
        world["baseline"],
        "model.sha256",
        world["int8"],
    )


def test_baseline_of_another_model(world, tmp_path, load_script, capsys):
    run = tmp_path / "run"
    expect_refusal(
        load_script,
        capsys,
        argv(world, run, baseline_metrics=world["k0"]),
        run,
        "--baseline-metrics",
        world["k0"],
        "model.sha256",
        world["fp32"],
    )


@pytest.mark.parametrize("value", [float("nan"), None, "high"])
def test_non_finite_baseline(world, tmp_path, load_script, capsys, value):
    def edit(data):
        data["metrics"]["map50_95"] = value

    bad = metrics_copy(world["baseline"], tmp_path / "nan" / "metrics.json", edit)
    run = tmp_path / "run"
    expect_refusal(load_script, capsys, argv(world, run, baseline_metrics=bad), run, "--baseline-metrics", bad)


def test_baseline_scored_on_other_images(world, tmp_path, load_script, capsys):
    every = scored(world["fp32"], world["data"], tmp_path / "all-coco" / "metrics.json", max_images=None)
    run = tmp_path / "run"
    expect_refusal(
        load_script,
        capsys,
        argv(world, run, baseline_metrics=every),
        run,
        "--baseline-metrics",
        every,
        "other images",
        f"--max-images {MAX_IMAGES}",
    )


def test_k0_scored_on_other_images(world, tmp_path, load_script, capsys):
    def edit(data):
        data["dataset"]["image_ids"] = data["dataset"]["image_ids"][:1]

    bad = metrics_copy(world["k0"], tmp_path / "k0" / "metrics.json", edit)
    run = tmp_path / "run"
    expect_refusal(load_script, capsys, argv(world, run, k0_metrics=bad), run, "--k0-metrics", bad, "other images")


def test_baseline_scored_at_another_size(world, tmp_path, load_script, capsys):
    def edit(data):
        data["postprocess"]["imgsz"] = 2 * IMGSZ

    bad = metrics_copy(world["baseline"], tmp_path / "big" / "metrics.json", edit)
    run = tmp_path / "run"
    expect_refusal(load_script, capsys, argv(world, run, baseline_metrics=bad), run, "--baseline-metrics", bad, "imgsz")


def test_baseline_scored_on_other_annotations(world, tmp_path, load_script, capsys):
    data = Path(shutil.copytree(world["data"], tmp_path / "coco"))
    ann = data / "annotations" / "instances_val2017.json"
    gt = json.loads(ann.read_text())
    gt["annotations"][0]["bbox"][2] += 5.0
    ann.write_text(json.dumps(gt))
    run = tmp_path / "run"
    expect_refusal(
        load_script,
        capsys,
        argv(world, run, data_root=data),
        run,
        "--baseline-metrics",
        world["baseline"],
        "ann_sha256",
        ann,
    )


# ---------------------------------------------------------------------------------------------------------------------
# 5-6: the ranking and the seed Ks


def test_ranking_of_another_mode(world, tmp_path, load_script, capsys):
    report = ranking(tmp_path / "rank-fp8", world["fp32"], precision="fp8")
    run = tmp_path / "run"
    expect_refusal(load_script, capsys, argv(world, run, ranking=report), run, "--ranking", report, "'fp8'")


def test_ranking_of_another_model(world, tmp_path, load_script, capsys):
    report = ranking(tmp_path / "rank-other", world["other_fp32"])
    run = tmp_path / "run"
    expect_refusal(
        load_script, capsys, argv(world, run, ranking=report), run, "--ranking", report, "model_sha256", world["fp32"]
    )


def test_torch_ranking_of_another_checkpoint(world, tmp_path, load_script, capsys):
    fp32 = Path(shutil.copy(world["fp32"], tmp_path / "tiny.onnx"))
    fp32.with_suffix(".manifest.json").write_text(
        json.dumps(
            {
                "kind": "export",
                "script": "scripts/cv-models/export_yolov10_raw_onnx.py",
                "status": "ok",
                "inputs": {"tiny.pt": "1" * 64},
                "extra": {"onnx_sha256": sha256_file(fp32)},
            }
        )
    )
    report = ranking(tmp_path / "rank-torch", fp32, source="torch", model_sha256="2" * 64)
    run = tmp_path / "run"
    # --onnx-path is byte-identical to the one --full-model's manifest names, so only the ranking is refused
    expect_refusal(
        load_script, capsys, argv(world, run, ranking=report, onnx_path=fp32), run, "--ranking", report, "checkpoint"
    )


def test_ranking_that_matches_no_quantized_node(world, tmp_path, load_script, capsys):
    report = ranking(tmp_path / "rank-none", world["fp32"], nodes=("relu1", "mean", "ghost"))
    run = tmp_path / "run"
    expect_refusal(load_script, capsys, argv(world, run, ranking=report), run, "--ranking", report, "no layer")


def test_ranked_layers_without_a_quantized_node_are_listed(world, tmp_path, load_script):
    report = ranking(tmp_path / "rank-some", world["fp32"], nodes=("conv2", "ghost", "conv1", "relu1", "conv3"))
    script = load_script(SCRIPT)
    inputs = search_checks.check_inputs(
        script.config(script.build_parser().parse_args(argv(world, tmp_path, ranking=report)))
    )
    assert inputs.nodes == ["conv2", "conv1", "conv3"]
    assert [u["name"] for u in inputs.unmatched] == ["ghost", "relu1"]
    warning = next(note for note in inputs.notes if "match no quantized node" in note)
    assert "#2 ghost" in warning and "#4 relu1" in warning and "2 of 5" in warning


@pytest.mark.parametrize("seed_ks", [["4"], ["-1"]])
def test_seed_ks_outside_the_ranked_nodes(world, tmp_path, load_script, capsys, seed_ks):
    run = tmp_path / "run"
    expect_refusal(load_script, capsys, argv(world, run, seed_ks=seed_ks), run, "--seed-ks", seed_ks[0])


# ---------------------------------------------------------------------------------------------------------------------
# 7: the evaluation settings, before any candidate exists


@pytest.mark.parametrize(
    ("change", "flag", "named"),
    [
        ({"data_root": "missing"}, "--data-root", "missing"),
        ({"imgsz": 96}, "--imgsz", "--imgsz 96"),
        ({"imgsz": 50}, "--imgsz", "50"),
        ({"providers": ["NoSuchExecutionProvider"]}, "--providers", "NoSuchExecutionProvider"),
    ],
)
def test_bad_evaluation_settings(world, tmp_path, load_script, capsys, change, flag, named):
    if change.get("data_root") == "missing":
        change = {"data_root": tmp_path / "missing"}
    run = tmp_path / "run"
    expect_refusal(load_script, capsys, argv(world, run, **change), run, flag, named)


def test_data_root_without_images(world, tmp_path, load_script, capsys):
    data = tmp_path / "coco"
    (data / "annotations").mkdir(parents=True)
    shutil.copy(world["data"] / "annotations" / "instances_val2017.json", data / "annotations")
    run = tmp_path / "run"
    expect_refusal(load_script, capsys, argv(world, run, data_root=data), run, "--data-root", data / "val2017")


# ---------------------------------------------------------------------------------------------------------------------
# 8-9: the cache is keyed by content; search.json says what it was computed from


def _search(load_script, world, run: Path, data: Path, baseline: Path) -> dict:
    # no --k0-metrics: K=0 (the full model itself) is a candidate the store evaluates and caches
    assert load_script(SCRIPT).main(argv(world, run, data_root=data, baseline_metrics=baseline, k0_metrics=None)) == 0
    return json.loads((run / "search-int8" / "search.json").read_text())


def test_an_annotation_file_changed_in_place_is_evaluated_again(world, tmp_path, load_script):
    data = Path(shutil.copytree(world["data"], tmp_path / "coco"))
    ann = data / "annotations" / "instances_val2017.json"
    run = tmp_path / "run"
    baseline = scored(world["fp32"], data, tmp_path / "baseline-coco" / "metrics.json")
    first = _search(load_script, world, run, data, baseline)
    assert [(c["k"], c["reused"]) for c in first["candidates"]] == [(0, False)]
    assert _search(load_script, world, run, data, baseline)["candidates"][0]["reused"]

    gt = json.loads(ann.read_text())
    gt["annotations"] = gt["annotations"][1:]  # same path, other content
    ann.write_text(json.dumps(gt))
    baseline = scored(world["fp32"], data, tmp_path / "baseline-coco" / "metrics.json")  # replaced, same path
    third = _search(load_script, world, run, data, baseline)
    assert [(c["k"], c["reused"]) for c in third["candidates"]] == [(0, False)]
    assert (
        "int8-k0: the annotation file changed; building and evaluating it"
        in (run / "search-int8" / "search.log").read_text()
    )
    record = json.loads((run / "onnx" / "tiny-int8-k0.inputs.json").read_text())
    assert record["evaluation"]["ann_sha256"] == sha256_file(ann) and "data_root" not in record["evaluation"]
    scored_on = json.loads((run / "int8-k0-coco" / "metrics.json").read_text())["dataset"]["ann_sha256"]
    assert scored_on == sha256_file(ann) == third["provenance"]["ann_sha256"] != first["provenance"]["ann_sha256"]


def test_candidates_cached_before_records_named_their_kind_are_evaluated_again(world, tmp_path, load_script):
    run = tmp_path / "run"
    assert not _search(load_script, world, run, world["data"], world["baseline"])["candidates"][0]["reused"]
    record_path = run / "onnx" / "tiny-int8-k0.inputs.json"
    log = run / "search-int8" / "search.log"
    for path in (record_path, run / "int8-k0-coco" / "metrics.json"):  # the record, then its metrics
        doc = json.loads(path.read_text())
        del doc["kind"]
        path.write_text(json.dumps(doc))
        if path != record_path:  # the record still names these metrics by content
            record = json.loads(record_path.read_text())
            record_path.write_text(json.dumps({**record, "metrics_sha256": sha256_file(path)}))
        again = _search(load_script, world, run, world["data"], world["baseline"])
        assert not again["candidates"][0]["reused"]
        lines = [line for line in log.read_text().splitlines() if "int8-k0:" in line and "building and" in line]
        assert str(path) in lines[-1] and "names no kind" in lines[-1], lines
    assert _search(load_script, world, run, world["data"], world["baseline"])["candidates"][0]["reused"]


def test_search_json_records_its_provenance(world, tmp_path, load_script):
    search = _search(load_script, world, tmp_path / "run", world["data"], world["baseline"])
    ann = world["data"] / "annotations" / "instances_val2017.json"
    assert search["schema_version"] == records.SCHEMA_VERSIONS["search"] == 1 and search["kind"] == "search"
    p = search["provenance"]
    assert p["full_model_sha256"] == sha256_file(world["int8"]) and p["onnx_sha256"] == sha256_file(world["fp32"])
    assert p["ranking_sha256"] == sha256_file(world["ranking"])
    assert p["baseline_metrics_sha256"] == sha256_file(world["baseline"]) and p["k0_metrics_sha256"] is None
    assert p["ann_sha256"] == sha256_file(ann) and p["num_images"] == MAX_IMAGES
    baseline_ids = json.loads(world["baseline"].read_text())["dataset"]["image_ids"]
    assert p["image_ids_sha256"] == records.image_ids_sha256(baseline_ids)
    assert p["settings_sha256"] == records.settings_sha256(search["settings"])
    assert p["quantizer_manifest"] == str(world["int8"].with_suffix(".manifest.json"))
    row = search["candidates"][0]
    assert row["model_sha256"] == sha256_file(row["model_path"]) == p["full_model_sha256"]
    assert row["metrics_sha256"] == sha256_file(row["metrics_path"])
    assert "data_root" not in search["settings"]["evaluation"]

    moved = Path(shutil.copytree(world["data"], tmp_path / "moved"))  # same content, another path: reused
    again = _search(load_script, world, tmp_path / "run", moved, world["baseline"])
    assert again["candidates"][0]["reused"] and again["provenance"] == p


def test_a_second_writer_of_the_run_folder_is_refused(world, tmp_path, load_script, capsys, folder_held_elsewhere):
    run_root = tmp_path / "busy"
    with folder_held_elsewhere(run_root) as holder:
        assert load_script(SCRIPT).main(argv(world, run_root)) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and errors[0].startswith("error: --run-root") and f"pid {holder.pid}" in errors[0]
    assert not (run_root / "search-int8").exists() and not list(run_root.rglob("*.onnx"))


@pytest.mark.parametrize(
    "key, value",
    [("dataset", []), ("postprocess", "topk"), ("model", None)],
)
def test_baseline_of_the_wrong_shape_names_its_file(world, tmp_path, load_script, capsys, key, value):
    baseline = metrics_copy(world["baseline"], tmp_path / "b" / "metrics.json", lambda d: d.__setitem__(key, value))
    run = tmp_path / "run"
    expect_refusal(
        load_script, capsys, argv(world, run, baseline_metrics=baseline), run, "--baseline-metrics", baseline
    )


def test_ranking_of_the_wrong_shape_names_its_file(world, tmp_path, load_script, capsys):
    report = tmp_path / "rank-bad" / "layer-sensitivity-report.json"
    report.parent.mkdir(parents=True)
    data = json.loads(Path(world["ranking"]).read_text())
    data["method"] = "single"
    report.write_text(json.dumps(data))
    run = tmp_path / "run"
    expect_refusal(load_script, capsys, argv(world, run, ranking=report), run, "--ranking", report)
