"""Static checks: the model card's commands, pixi.toml, the Makefile and the README agree with the code.

pixi cannot be installed on every machine, so its manifest is checked here by parsing it.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CARD = REPO / "models/cv-models/yolov10m/README.md"


def _bash_blocks(markdown: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", markdown, flags=re.DOTALL)


def _commands(block: str) -> list[list[str]]:
    """Join backslash continuations, drop comments, split each command into tokens."""
    joined = re.sub(r"\\\n\s*", " ", block)
    commands = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        commands.append(shlex.split(line, posix=True))
    return commands


def _card_invocations() -> list[tuple[dict[str, str], str, str, list[str]]]:
    """(env vars, interpreter, script path, args) for every python/bash call in the card."""
    calls = []
    for block in _bash_blocks(CARD.read_text()):
        for tokens in _commands(block):
            env = {}
            while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0]):
                key, value = tokens.pop(0).split("=", 1)
                env[key] = value
            if tokens[:4] == ["pixi", "run", "-e", "rtx5090"]:
                tokens = tokens[4:]
            if tokens and tokens[0] in ("python", "bash"):
                calls.append((env, tokens[0], tokens[1], tokens[2:]))
    return calls


def test_card_lists_the_workflow():
    scripts = {script for _, _, script, _ in _card_invocations()}
    assert "models/cv-models/helpers/run_random_onnx_inference.py" in scripts
    assert "scripts/cv-models/eval_yolov10m_onnx_coco.py" in scripts
    assert len(scripts) >= 7


@pytest.mark.parametrize("call", _card_invocations(), ids=lambda c: f"{Path(c[2]).name}")
def test_card_command_exists_with_its_flags_and_env_vars(call):
    env, interpreter, script, args = call
    path = REPO / script
    assert path.is_file(), f"the card calls {script}, which does not exist"
    if interpreter == "python":
        help_text = subprocess.run(
            [sys.executable, str(path), "--help"], check=False, capture_output=True, text=True, cwd=REPO, timeout=120
        )
        assert help_text.returncode == 0, help_text.stderr
        for flag in (a for a in args if a.startswith("--")):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text.stdout), (
                f"{script} --help does not list {flag}"
            )
    else:
        text = path.read_text()
        assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
        for var in env:
            assert re.search(rf"\b{var}\b", text), f"{script} does not read the card's env var {var}"


def _pins(requirements: list[str], name: str) -> list[str]:
    return [r for r in requirements if re.match(rf"{re.escape(name)}(\[[^]]*\])?\s*[~=<>!]", r)]


def test_pyproject_extras_pick_one_onnxruntime_build_per_cuda_major():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base, extras = project["dependencies"], project["optional-dependencies"]
    assert not _pins(base, "onnxruntime-gpu"), "the ORT build must come from the cu12/cu13 extra"
    for requirements in [base, *extras.values()]:
        assert not _pins(requirements, "onnxruntime"), "plain onnxruntime must never be a dependency"
    assert _pins(extras["cu12"], "onnxruntime-gpu") == ["onnxruntime-gpu~=1.24.2"]  # ModelOpt 0.47's own pin
    (cu13,) = _pins(extras["cu13"], "onnxruntime-gpu")
    assert cu13.startswith("onnxruntime-gpu[cuda,cudnn]~=1.31")


def _name(requirement: str) -> str:
    from packaging.requirements import Requirement

    return Requirement(requirement).name.lower().replace("_", "-")


def test_pyproject_lists_modelopt_onnx_extra_except_onnxruntime():
    """The [onnx] extra is spelled out (so the ORT pin can differ): it must match the installed ModelOpt."""
    from importlib import metadata

    from packaging.requirements import Requirement

    wanted = {}
    for text in metadata.requires("nvidia-modelopt") or []:
        req = Requirement(text)
        if req.marker is not None and req.marker.evaluate({"extra": "onnx"}) and not req.marker.evaluate({"extra": ""}):
            wanted[_name(text)] = req.specifier
    assert "onnx-graphsurgeon" in wanted  # the marker logic found the extra
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    listed = {_name(r) for r in project["dependencies"]}
    specifiers = {_name(r): Requirement(r).specifier for r in project["dependencies"]}
    for name, spec in wanted.items():  # the same versions as ModelOpt's extra (e.g. onnx~=1.21.0, not ~=1.21)
        if name in specifiers:
            assert specifiers[name] == spec, f"{name}: pyproject says {specifiers[name]}, ModelOpt's [onnx] says {spec}"
    for extra in ("cu12", "cu13"):
        extra_names = {_name(r) for r in project["optional-dependencies"][extra]}
        # the extra's cupy-cuda12x / onnxruntime-gpu pins are replaced per CUDA major
        missing = set(wanted) - listed - extra_names - {"cupy-cuda12x", "onnxruntime-gpu"}
        assert not missing, f"nvidia-modelopt[onnx] needs {sorted(missing)}, not listed for {extra}"
        assert {"onnxruntime-gpu"} <= extra_names and any(n.startswith("cupy-cuda") for n in extra_names)


def test_pixi_environments_install_the_project_with_one_cuda_extra():
    pixi = tomllib.loads((REPO / "pixi.toml").read_text())
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(pixi["environments"]) == {"default", "rtx5090", "cuda13"}
    assert "pypi-dependencies" not in pixi, "lowbit comes from exactly one cu12/cu13 feature per environment"
    majors = {}
    for env, spec in pixi["environments"].items():
        cuda_features = [f for f in spec["features"] if f in ("cu12", "cu13")]
        assert len(cuda_features) == 1, f"pixi env {env}: {spec['features']}"
        dep = pixi["feature"][cuda_features[0]]["pypi-dependencies"]["lowbit"]
        assert dep["path"] == "." and dep["editable"] is True
        assert set(dep["extras"]) <= set(extras) and cuda_features[0] in dep["extras"]
        majors[env] = cuda_features[0]
    assert majors == {"default": "cu12", "rtx5090": "cu12", "cuda13": "cu13"}
    trt = pixi["feature"]["rtx5090"]["pypi-dependencies"]
    assert "tensorrt-cu12" in trt, "ORT 1.24's TensorRT EP is built against TensorRT 10 for CUDA 12"
    assert not any(name.startswith("onnxruntime") for name in trt), "rtx5090 must reuse the project's onnxruntime-gpu"
    assert float(pixi["feature"]["rtx5090"]["system-requirements"]["cuda"]) >= 12.8  # Blackwell
    assert float(pixi["feature"]["cu13"]["system-requirements"]["cuda"]) >= 13.0


@pytest.mark.parametrize("cuda, venv", [("12", ".venv"), ("13", ".venv-cu13")])
def test_make_env_cuda_selects_venv_and_lock(cuda, venv):
    """The venv gets the CUDA major's lock (extras dev + cuXX, see tests/test_lock.py), then lowbit itself."""
    out = subprocess.run(
        ["make", "-n", "-B", "env", f"CUDA={cuda}"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert f"{venv}/bin/python -m pip install --require-hashes --no-deps -r requirements/cu{cuda}.lock.txt" in out
    assert f"{venv}/bin/python -m pip install --no-deps --no-build-isolation -e ." in out
    assert f"--extra cu{cuda} " in (REPO / f"requirements/cu{cuda}.lock.txt").read_text().splitlines()[1]


def test_make_env_rejects_unknown_cuda():
    proc = subprocess.run(["make", "-n", "env", "CUDA=11"], check=False, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "CUDA" in proc.stderr


def test_pixi_tasks_refer_to_existing_scripts():
    pixi = tomllib.loads((REPO / "pixi.toml").read_text())
    assert {"demo", "test"} <= set(pixi["tasks"])
    for name, task in pixi["tasks"].items():
        tokens = shlex.split(task if isinstance(task, str) else task["cmd"])
        for token in tokens:
            if token.endswith((".py", ".sh")):
                assert (REPO / token).is_file(), f"pixi task {name} refers to missing {token}"


def test_readme_starts_with_the_two_make_commands_and_ci_runs_the_test_one():
    readme = (REPO / "README.md").read_text()
    first_block = _bash_blocks(readme)[0]
    commands = [" ".join(c) for c in _commands(first_block)]
    assert commands == ["make demo", "make test"]
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.MULTILINE) and re.search(r"^test:", makefile, re.MULTILINE)
    ci = [
        line
        for line in (REPO / ".ci/run").read_text().splitlines()
        if line and not line.startswith(("#", "set ", "cd "))
    ]
    assert ci == ["make test"]
