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
    return re.findall(r"```bash\n(.*?)```", markdown, flags=re.S)


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
            [sys.executable, str(path), "--help"], capture_output=True, text=True, cwd=REPO, timeout=120
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


def test_pixi_manifest_matches_pip_path():
    pixi = tomllib.loads((REPO / "pixi.toml").read_text())
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    # Both environments get the Python packages from the editable project, i.e. pyproject.toml's list.
    project_dep = pixi["pypi-dependencies"]["lowbit"]
    assert project_dep["path"] == "." and project_dep["editable"] is True
    assert set(pixi["environments"]) == {"default", "rtx5090"}
    assert pixi["environments"]["rtx5090"]["features"] == ["rtx5090"]
    deps = " ".join(pyproject["project"]["dependencies"])
    assert "onnxruntime-gpu" in deps
    assert not re.search(r"(?<![\w-])onnxruntime(?![\w-])", deps), "plain onnxruntime must never be a dependency"
    extra = pixi["feature"]["rtx5090"]["pypi-dependencies"]
    assert "tensorrt-cu12" in extra
    assert not any(name.startswith("onnxruntime") for name in extra), "rtx5090 must reuse the project's onnxruntime-gpu"
    assert float(pixi["feature"]["rtx5090"]["system-requirements"]["cuda"]) >= 12.8  # Blackwell


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
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    ci = [line for line in (REPO / ".ci/run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == ["make test"]
