"""The pip locks (requirements/cuXX.lock.txt) agree with pyproject.toml, the Makefile and pixi.toml.

Static and offline: each check is a function returning a list of problems, run on the real files and
on mutated copies (so that every check is shown to be able to fail).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
CUDA_MAJORS = ("12", "13")


def _lock_path(cuda: str) -> Path:
    return REPO / "requirements" / f"cu{cuda}.lock.txt"


def _inputs_digest_module():
    spec = importlib.util.spec_from_file_location("inputs_digest", REPO / "requirements" / "inputs_digest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DIGEST = _inputs_digest_module()


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _pixi() -> dict:
    return tomllib.loads((REPO / "pixi.toml").read_text())


# --- parsing the lock ---------------------------------------------------------------------------


def parse_lock(text: str) -> list[tuple[Requirement, list[str]]]:
    """(requirement, sha256 hashes) for every requirement line, backslash continuations joined."""
    joined = re.sub(r"\\\n", " ", text)
    entries = []
    for line in joined.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("-"), f"unexpected option line in the lock: {line}"
        hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", line)
        requirement = Requirement(re.split(r"\s--hash=", line, maxsplit=1)[0].strip())
        entries.append((requirement, hashes))
    return entries


def target_python(text: str) -> str:
    match = re.search(r"--python-version\s+(\S+)", text)
    assert match, "the lock's header does not record --python-version"
    return match.group(1)


def marker_environment(python: str) -> dict[str, str]:
    """Linux x86-64, CPython `python` (e.g. 3.11): the platform the locks are generated for."""
    major_minor = ".".join(python.split(".")[:2])
    full = python if python.count(".") >= 2 else f"{python}.0"
    return {
        "python_version": major_minor,
        "python_full_version": full,
        "implementation_name": "cpython",
        "implementation_version": full,
        "platform_python_implementation": "CPython",
        "os_name": "posix",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "extra": "",
    }


def pins(text: str) -> dict[str, list[Version]]:
    """Name -> the versions the lock pins with ==, for the lock's own target platform."""
    environment = marker_environment(target_python(text))
    found: dict[str, list[Version]] = {}
    for requirement, _ in parse_lock(text):
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        specs = list(requirement.specifier)
        version = Version(specs[0].version) if len(specs) == 1 and specs[0].operator == "==" else None
        found.setdefault(canonicalize_name(requirement.name), []).append(version)
    return found


# --- the checks -----------------------------------------------------------------------------------


def requirements_problems(lock_text: str, pyproject: dict, cuda: str) -> list[str]:
    """(a) each pyproject requirement (base + dev + cuXX, and the build backend) is met by one == pin."""
    project = pyproject["project"]
    wanted = [
        *project["dependencies"],
        *project["optional-dependencies"]["dev"],
        *project["optional-dependencies"][f"cu{cuda}"],
        # `make env` builds lowbit with --no-build-isolation, from the lock's setuptools
        *pyproject["build-system"]["requires"],
    ]
    environment = marker_environment(target_python(lock_text))
    pinned = pins(lock_text)
    problems = []
    if canonicalize_name(project["name"]) in pinned:
        problems.append(f"the lock pins {project['name']} itself (it is installed editable after the lock)")
    for name, versions in pinned.items():
        if len(versions) != 1 or versions[0] is None:
            problems.append(f"{name}: not exactly one == pin in the lock ({versions})")
    for text in wanted:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        versions = pinned.get(canonicalize_name(requirement.name))
        if not versions:
            problems.append(f"{text}: not in the lock")
        elif len(versions) == 1 and versions[0] is not None and not requirement.specifier.contains(versions[0], True):
            problems.append(f"{text}: the lock pins {versions[0]}")
    return problems


def digest_problems(lock_text: str, pyproject_path: Path) -> list[str]:
    """(b) the lock records the digest of the pyproject inputs it was generated from."""
    recorded = DIGEST.recorded_digest(lock_text)
    current = DIGEST.inputs_digest(pyproject_path)
    if recorded != current:
        return [
            f"the lock was generated from other pyproject.toml dependencies ({recorded} != {current}): run make lock"
        ]
    return []


def hash_problems(lock_text: str) -> list[str]:
    """(c) every pin carries at least one sha256 (pip's --require-hashes mode)."""
    return [f"{requirement}: no --hash=sha256:" for requirement, hashes in parse_lock(lock_text) if not hashes]


def onnxruntime_problems(lock_text: str) -> list[str]:
    """(d) onnxruntime-gpu only: plain onnxruntime ships the same module and would shadow it."""
    pinned = pins(lock_text)
    problems = ["the lock pins plain onnxruntime"] if "onnxruntime" in pinned else []
    if "onnxruntime-gpu" not in pinned:
        problems.append("the lock does not pin onnxruntime-gpu")
    return problems


def _conda_spec(spec: str) -> SpecifierSet:
    """A conda version spec as pixi.toml writes it ('3.11.*', '>=3.11,<3.12', '3.11') as a SpecifierSet."""
    spec = spec.strip()
    if spec in ("", "*"):
        return SpecifierSet()
    return SpecifierSet(",".join(part if part[0] in "<>=!~" else f"=={part}" for part in spec.split(",")))


def _pypi_spec(spec) -> SpecifierSet | None:
    """A pixi pypi-dependencies value; None where it is not a version range (a path, a git URL)."""
    if isinstance(spec, dict):
        if "version" not in spec:
            return None
        spec = spec["version"]
    return SpecifierSet() if spec.strip() == "*" else SpecifierSet(spec)


def pixi_problems(pixi: dict, locks: dict[str, str]) -> list[str]:
    """(e) each pixi environment agrees with its CUDA major's lock: Python and pypi-dependencies pins."""
    problems = []
    for env, spec in pixi["environments"].items():
        features = spec["features"] if isinstance(spec, dict) else spec
        (cuda,) = [f.removeprefix("cu") for f in features if f in ("cu12", "cu13")]
        lock_text = locks[cuda]
        python = Version(target_python(lock_text))
        tables = [pixi, *(pixi.get("feature", {}).get(f, {}) for f in features)]
        for table in tables:
            conda_python = table.get("dependencies", {}).get("python")
            if conda_python is not None and python not in _conda_spec(conda_python):
                problems.append(f"pixi env {env}: python {conda_python!r}, the cu{cuda} lock is for Python {python}")
        pinned = pins(lock_text)
        for table in tables:
            for name, value in table.get("pypi-dependencies", {}).items():
                wanted = _pypi_spec(value)
                versions = pinned.get(canonicalize_name(name))
                if wanted is None or not versions or versions[0] is None:
                    continue
                if not wanted.contains(versions[0], prereleases=True):
                    problems.append(f"pixi env {env}: {name} {value!r}, the cu{cuda} lock pins {versions[0]}")
        if set(pixi["workspace"]["platforms"]) != {"linux-64"}:
            problems.append(f"pixi platforms {pixi['workspace']['platforms']}; the locks are for linux-64 only")
    return problems


# --- on the real files ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def locks() -> dict[str, str]:
    return {cuda: _lock_path(cuda).read_text() for cuda in CUDA_MAJORS}


@pytest.mark.parametrize("cuda", CUDA_MAJORS)
def test_lock_pins_every_requirement_once(locks, cuda):
    assert requirements_problems(locks[cuda], _pyproject(), cuda) == []


@pytest.mark.parametrize("cuda", CUDA_MAJORS)
def test_lock_is_generated_from_the_current_pyproject(locks, cuda):
    assert digest_problems(locks[cuda], REPO / "pyproject.toml") == []


@pytest.mark.parametrize("cuda", CUDA_MAJORS)
def test_lock_has_hashes_and_no_plain_onnxruntime(locks, cuda):
    assert hash_problems(locks[cuda]) == []
    assert onnxruntime_problems(locks[cuda]) == []


def test_pixi_agrees_with_the_locks(locks):
    assert pixi_problems(_pixi(), locks) == []


@pytest.mark.parametrize("cuda", CUDA_MAJORS)
def test_lock_header_records_the_make_lock_command(locks, cuda):
    """The header's command is the one `make lock` runs now (same flags, same target Python)."""
    header = locks[cuda].splitlines()[1].removeprefix("#").strip()
    assert header.startswith("uv pip compile pyproject.toml ") and f"--extra cu{cuda}" in header
    planned = subprocess.run(["make", "-n", "lock"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert f'--custom-compile-command "{header}"' in planned, "run make lock: the Makefile's uv command changed"


@pytest.mark.parametrize("cuda", CUDA_MAJORS)
def test_make_env_installs_the_lock_with_hashes(cuda):
    planned = subprocess.run(
        ["make", "-n", "-B", "env", f"CUDA={cuda}"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert f"requirements/inputs_digest.py check requirements/cu{cuda}.lock.txt" in planned
    assert f"pip install --require-hashes --no-deps -r requirements/cu{cuda}.lock.txt" in planned
    assert "pip install --no-deps --no-build-isolation -e ." in planned
    assert "pip check" in planned


# --- each check can fail --------------------------------------------------------------------------


def _drop(lock_text: str, name: str) -> str:
    """The lock without `name`'s entry (its pin line, hash lines and via comments)."""
    return re.sub(rf"^{re.escape(name)}==.*?(?=^\S)", "", lock_text, flags=re.MULTILINE | re.DOTALL)


def test_requirements_check_catches_a_missing_wrong_or_duplicate_pin(locks):
    pyproject, lock = _pyproject(), locks["12"]
    assert "torch" in pins(lock) and _drop(lock, "torch") != lock
    assert any(
        "torch" in p and "not in the lock" in p for p in requirements_problems(_drop(lock, "torch"), pyproject, "12")
    )
    wrong = re.sub(r"^torch==\S+", "torch==2.13.0", lock, flags=re.MULTILINE)
    assert any("the lock pins 2.13.0" in p for p in requirements_problems(wrong, pyproject, "12"))
    twice = lock + "torch==2.13.0 \\\n    --hash=sha256:" + "0" * 64 + "\n"
    assert any("not exactly one" in p for p in requirements_problems(twice, pyproject, "12"))
    itself = lock + "lowbit==0.1.0 \\\n    --hash=sha256:" + "0" * 64 + "\n"
    assert any("itself" in p for p in requirements_problems(itself, pyproject, "12"))
    assert any("cupy-cuda13x" in p for p in requirements_problems(lock, pyproject, "13")), "cu12 lock for cu13"
    unpinned = re.sub(r"^tqdm==\S+", "tqdm>=4.66", lock, flags=re.MULTILINE)
    assert any("tqdm" in p and "not exactly one" in p for p in requirements_problems(unpinned, pyproject, "12"))


def test_digest_check_catches_a_stale_lock(locks, tmp_path):
    changed = (REPO / "pyproject.toml").read_text().replace('"tqdm>=4.66",', '"tqdm>=4.66",\n    "rich>=13",', 1)
    assert changed != (REPO / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(changed)
    (problem,) = digest_problems(locks["12"], tmp_path / "pyproject.toml")
    assert "make lock" in problem
    no_line = re.sub(r"^# pyproject-inputs-sha256: .*\n", "", locks["12"], flags=re.MULTILINE)
    assert digest_problems(no_line, REPO / "pyproject.toml")
    # comments and formatting of pyproject.toml do not count, its requirements do
    (tmp_path / "pyproject.toml").write_text("# a comment\n" + (REPO / "pyproject.toml").read_text())
    assert digest_problems(locks["12"], tmp_path / "pyproject.toml") == []


def test_inputs_digest_write_and_check_round_trip(locks, tmp_path):
    lock = tmp_path / "cu12.lock.txt"
    stale = re.sub(r"^(# pyproject-inputs-sha256: ).*$", r"\g<1>" + "0" * 64, locks["12"], flags=re.MULTILINE)
    lock.write_text(stale)
    assert DIGEST.main(["check", str(lock)]) == 1
    DIGEST.main(["write", str(lock)])
    assert DIGEST.main(["check", str(lock)]) == 0
    assert lock.read_text() == locks["12"]


def test_hash_check_catches_an_unhashed_pin(locks):
    unhashed = re.sub(r"^(tqdm==\S+) \\\n(?:\s+--hash=\S+(?: \\)?\n)+", r"\1\n", locks["12"], flags=re.MULTILINE)
    assert unhashed != locks["12"]
    assert hash_problems(unhashed) == ["tqdm==" + str(pins(locks["12"])["tqdm"][0]) + ": no --hash=sha256:"]


def test_onnxruntime_check_catches_plain_onnxruntime(locks):
    plain = locks["12"] + "onnxruntime==1.24.4 \\\n    --hash=sha256:" + "0" * 64 + "\n"
    assert onnxruntime_problems(plain) == ["the lock pins plain onnxruntime"]
    assert onnxruntime_problems(_drop(locks["12"], "onnxruntime-gpu")) == ["the lock does not pin onnxruntime-gpu"]


def test_pixi_check_catches_a_contradicting_pin_or_python(locks):
    pixi = _pixi()
    pixi["dependencies"]["python"] = "3.12.*"
    assert any("python" in p for p in pixi_problems(pixi, locks))
    pixi = _pixi()
    torch = pins(locks["12"])["torch"][0]
    pixi["feature"]["rtx5090"]["pypi-dependencies"]["torch"] = f"<{torch}"
    (problem,) = pixi_problems(pixi, locks)
    assert "rtx5090" in problem and "torch" in problem
    pixi = _pixi()
    pixi["feature"]["cu13"]["pypi-dependencies"]["onnxruntime-gpu"] = {"version": "~=1.24.2"}
    assert any("cuda13" in p and "onnxruntime-gpu" in p for p in pixi_problems(pixi, locks))
    pixi = _pixi()
    pixi["workspace"]["platforms"] = ["linux-64", "osx-arm64"]
    assert pixi_problems(pixi, locks)
