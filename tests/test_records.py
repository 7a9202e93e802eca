"""The records contract (lowbit/records.py): every reader refuses a foreign, damaged or mismatched file by name."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lowbit import records
from lowbit.errors import UserError
from lowbit.runs import REPO_ROOT, Manifest, manifest_run


def _write(path: Path, value) -> Path:
    path.write_text(value if isinstance(value, str) else json.dumps(value))
    return path


def _refused(path: Path, kind: str, flag: str | None = None) -> UserError:
    """``read_record`` raises one UserError that names ``path`` in its message and as its ``flag`` (or ``flag``)."""
    with pytest.raises(UserError) as info:
        records.read_record(path, kind, flag=flag)
    assert str(path) in str(info.value)
    assert info.value.flag == (flag or str(path))
    return info.value


# ----------------------------------------------------------------------------------------------------------------------
# read_record


def test_a_record_of_its_kind_and_version_is_read(tmp_path):
    doc = {**records.header("metrics"), "metrics": {"map50_95": 0.5}}
    assert doc["kind"] == "metrics" and doc["schema_version"] == records.SCHEMA_VERSIONS["metrics"]
    assert records.read_record(_write(tmp_path / "m.json", doc), "metrics") == doc


def test_wrong_kind_is_refused(tmp_path):
    path = _write(tmp_path / "s.json", {**records.header("search"), "mode": "int8"})
    assert "is a 'search' record, not a 'metrics' record" in str(_refused(path, "metrics"))


def test_no_kind_is_refused(tmp_path):
    """A record written before records named their kind is foreign to every reader."""
    path = _write(tmp_path / "m.json", {"schema_version": 1, "script": "eval_yolov10m_onnx_coco.py"})
    assert "names no kind" in str(_refused(path, "metrics"))


def test_wrong_schema_version_is_refused(tmp_path):
    path = _write(tmp_path / "c.json", {"schema_version": 1, "kind": "candidate"})
    error = _refused(path, "candidate")
    assert "schema_version 1" in str(error) and "version 2" in str(error)


def test_truncated_file_is_refused(tmp_path):
    text = json.dumps({**records.header("report"), "variants": [1, 2, 3]})
    path = _write(tmp_path / "report.json", text[: len(text) // 2])
    assert "truncated" in str(_refused(path, "report"))


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_nan_token_is_refused(tmp_path, token):
    path = _write(tmp_path / "m.json", '{"schema_version": 1, "kind": "metrics", "map50_95": ' + token + "}")
    assert token in str(_refused(path, "metrics"))


@pytest.mark.parametrize("value", [[1, 2], "metrics", 3, None])
def test_non_object_is_refused(tmp_path, value):
    path = _write(tmp_path / "m.json", json.dumps(value))
    assert "not a metrics record (a JSON object)" in str(_refused(path, "metrics"))


def test_missing_file_is_refused_naming_the_flag(tmp_path):
    path = tmp_path / "absent.json"
    error = _refused(path, "metrics", flag="--baseline-metrics")
    assert str(error).startswith(f"--baseline-metrics: {path}") and "does not exist" in str(error)


def test_unknown_kinds_are_a_writers_mistake(tmp_path):
    path = _write(tmp_path / "m.json", {"schema_version": 1, "kind": "metric"})
    with pytest.raises(ValueError):
        records.read_record(path, "metric")
    with pytest.raises(ValueError):
        records.header("metric")
    with pytest.raises(ValueError):
        records.manifest_for(path, "quantizer", "output_sha256", "0" * 64)


def test_every_kind_is_named_once():
    assert set(records.KINDS) == set(records.SCHEMA_VERSIONS) | set(records.MANIFEST_KINDS)
    assert len(records.KINDS) == len(set(records.KINDS))


# ----------------------------------------------------------------------------------------------------------------------
# provenance helpers


def test_require_equal_names_the_file_and_the_field(tmp_path):
    path = tmp_path / "metrics.json"
    records.require_equal(path, "model.sha256", "a" * 64, "a" * 64, "--onnx-path m.onnx")
    with pytest.raises(UserError) as info:
        records.require_equal(path, "model.sha256", "a" * 64, "b" * 64, "--onnx-path m.onnx", flag="--k0-metrics")
    assert (
        str(path) in str(info.value) and "model.sha256" in str(info.value) and "--onnx-path m.onnx" in str(info.value)
    )
    assert info.value.flag == "--k0-metrics"
    with pytest.raises(UserError) as info:
        records.require_equal(path, "dataset.ann_sha256", None, "c" * 64, "the annotation file")
    assert info.value.flag == str(path)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), None, "0.5x", [0.5]])
def test_require_finite_names_the_file_and_the_field(tmp_path, value):
    path = tmp_path / "metrics.json"
    with pytest.raises(UserError) as info:
        records.require_finite(path, "metrics.map50_95", value)
    assert str(path) in str(info.value) and "metrics.map50_95" in str(info.value) and info.value.flag == str(path)


def test_require_finite_returns_the_number(tmp_path):
    assert records.require_finite(tmp_path / "m.json", "metrics.map50_95", "0.25") == 0.25
    assert records.require_finite(tmp_path / "m.json", "metrics.map50_95", 1) == 1.0


def test_image_ids_sha256_ignores_the_order():
    assert (
        records.image_ids_sha256([9, 1, 5])
        == records.image_ids_sha256([1, 5, 9])
        == records.image_ids_sha256((5, 9, 1))
    )
    assert records.image_ids_sha256([1, 5, 9]) != records.image_ids_sha256([1, 5])
    assert records.image_ids_sha256([1, 5, 9]) != records.image_ids_sha256([15, 9])  # no concatenation collisions


def test_settings_sha256_ignores_the_key_order():
    a = {"mode": "int8", "budget_ap": 0.5, "evaluation": {"imgsz": 640, "max_images": 500}}
    b = {"evaluation": {"max_images": 500, "imgsz": 640}, "budget_ap": 0.5, "mode": "int8"}
    assert records.settings_sha256(a) == records.settings_sha256(b)
    assert records.settings_sha256(a) != records.settings_sha256({**a, "budget_ap": 1.0})


def test_dataset_provenance_is_the_slice_by_content():
    metrics = {"dataset": {"ann_sha256": "a" * 64, "image_ids": [3, 1, 2]}}
    assert records.dataset_provenance(metrics) == {
        "ann_sha256": "a" * 64,
        "image_ids_sha256": records.image_ids_sha256([1, 2, 3]),
        "num_images": 3,
    }


# ----------------------------------------------------------------------------------------------------------------------
# manifests


def test_manifest_names_its_kind_and_refuses_unknown_ones(tmp_path):
    with manifest_run(tmp_path / "manifest.json", "some_script.py", {"x": 1}, [], kind="evaluate") as manifest:
        manifest.update(done=True)
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["kind"] == "evaluate" and data["script"] == "some_script.py" and data["status"] == "ok"
    with pytest.raises(ValueError):
        Manifest(tmp_path / "other.json", "some_script.py", {}, [], kind="evaluation")
    assert not (tmp_path / "other.json").exists()


def _model_with_manifest(tmp_path: Path, **manifest) -> tuple[Path, str]:
    model = tmp_path / "m-int8.onnx"
    model.write_bytes(b"model")
    sha = "5" * 64
    doc = {
        "status": "ok",
        "args": {"onnx_path": "fp32.onnx"},
        "inputs": {"fp32.onnx": "f" * 64},
        "extra": {"output_sha256": sha, "settings": {"quantize_mode": "int8"}},
        **manifest,
    }
    _write(model.with_suffix(".manifest.json"), doc)
    return model, sha


def test_manifest_for_matches_on_kind_and_content(tmp_path):
    model, sha = _model_with_manifest(tmp_path, kind="quantize", script="renamed_quantizer.py")
    found, why = records.quantizer_manifest_for(model, sha)
    assert why is None
    assert found == {
        "path": str(model.with_suffix(".manifest.json")),
        "quantize_mode": "int8",
        "onnx_path": "fp32.onnx",
        "onnx_sha256": "f" * 64,
    }
    found, why = records.quantizer_manifest_for(model, "6" * 64)
    assert found is None and "describes another file" in why


@pytest.mark.parametrize(
    ("manifest", "why"),
    [
        ({"script": "quantize_yolov10m_onnx.py"}, "names no kind"),  # written before manifests named their kind
        ({"kind": "export"}, "is a 'export' manifest, not a 'quantize' manifest"),
        ({"kind": "quantize", "status": "failed"}, "has status 'failed'"),
    ],
)
def test_manifest_for_refuses_foreign_manifests(tmp_path, manifest, why):
    model, sha = _model_with_manifest(tmp_path, **manifest)
    found, reason = records.quantizer_manifest_for(model, sha)
    assert found is None and why in reason and str(model.with_suffix(".manifest.json")) in reason


def test_manifest_for_without_a_manifest(tmp_path):
    found, why = records.manifest_for(tmp_path / "m.onnx", "export", "onnx_sha256", "0" * 64)
    assert found is None and why.startswith("no manifest")


def test_every_writer_names_a_known_manifest_kind():
    """Each ``manifest_run(...)`` call of the package, the scripts and the model helpers passes a known ``kind=``
    (a constant such as ``kind=MANIFEST_KIND`` is checked when its writer runs)."""
    calls = 0
    for path in [*REPO_ROOT.glob("lowbit/*.py"), *REPO_ROOT.glob("scripts/**/*.py"), *REPO_ROOT.glob("models/**/*.py")]:
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"(?<!def )\bmanifest_run\(", text):
            call = text[match.end() : match.end() + 300]
            kind = re.search(r'kind=(?:"([\w-]+)"|[A-Z_]+)', call)
            assert kind, f"{path}: manifest_run({call[:100]!r} names no kind"
            assert kind.group(1) is None or kind.group(1) in records.MANIFEST_KINDS, f"{path}: {kind.group(0)}"
            calls += 1
    assert calls >= 15
