"""Execution providers (lowbit.ort_providers): provider checks, library probes, install hints, calibration EPs."""

from __future__ import annotations

import pytest

from lowbit import ort_providers
from lowbit.errors import UserError

TRT, CUDA, CPU = ort_providers.TRT, ort_providers.CUDA, ort_providers.CPU


def loads(provider: str) -> ort_providers.ProviderProbe:
    """A probe that says every provider library loads (for tests of what happens after the probe)."""
    return ort_providers.ProviderProbe(provider, None)


def fails(**missing: str):
    """A probe where the named providers (TRT=..., CUDA=...) miss that library and the others load."""
    names = {"TRT": TRT, "CUDA": CUDA}
    table = {names[key]: lib for key, lib in missing.items()}

    def probe(provider: str) -> ort_providers.ProviderProbe:
        if provider not in table:
            return ort_providers.ProviderProbe(provider, None)
        error = f"{table[provider]}: cannot open shared object file: No such file or directory"
        return ort_providers.ProviderProbe(
            provider, f"/x/{ort_providers.PROVIDER_LIBRARIES[provider]}", error, (table[provider],)
        )

    return probe


# ---------------------------------------------------------------------------------------------------------------------
# provider libraries


def probe_or_skip(provider: str) -> ort_providers.ProviderProbe:
    probe = ort_providers.probe_provider_library(provider)
    if probe.ok:
        pytest.skip(f"{provider}'s library loads on this machine")
    return probe


def test_probe_names_the_library_the_loader_reports():
    probe = probe_or_skip(CUDA)
    assert probe.missing[0] in probe.error and probe.library.endswith(ort_providers.PROVIDER_LIBRARIES[CUDA])
    assert ort_providers.probe_provider_library(CPU).ok


def test_one_error_for_every_failing_provider():
    probe = fails(TRT="libnvinfer.so.10", CUDA="libcublasLt.so.12")
    with pytest.raises(UserError) as exc:
        ort_providers.check_providers([TRT, CUDA], True, "PROVIDERS", probe=probe)
    assert exc.value.flag == "PROVIDERS"
    assert "libnvinfer.so.10" in str(exc.value) and "libcublasLt.so.12" in str(exc.value)
    assert f'PROVIDERS="{CPU}"' in str(exc.value)


@pytest.mark.parametrize(
    "providers, failing, disable, expected",
    [
        ([TRT, CUDA], [TRT], True, f"--providers {CUDA} --disable-cpu-fallback"),
        ([TRT, CUDA, CPU], [TRT], False, f"--providers {CUDA} {CPU}"),
        ([CUDA], [CUDA], True, f"--providers {CPU} and without --disable-cpu-fallback"),
        ([CUDA, CPU], [CUDA], False, f"--providers {CPU}"),
    ],
)
def test_suggested_providers(providers, failing, disable, expected):
    assert ort_providers.suggested_providers(providers, failing, disable, "--providers").startswith(expected)


def test_install_hint_follows_the_cuda_build():
    cuda12 = {"onnxruntime": "1.24.4", "cuda": "12.8"}
    assert "CUDA=13" in ort_providers.install_hint(("libcublasLt.so.12",), cuda12)
    assert "rtx5090" in ort_providers.install_hint(("libnvinfer.so.10",), cuda12)
    assert "CUDA=13" not in ort_providers.install_hint(
        ("libcublasLt.so.13",), {"onnxruntime": "1.31.1", "cuda": "13.0"}
    )


# ---------------------------------------------------------------------------------------------------------------------
# calibration EPs


@pytest.mark.parametrize("eps", [[], ["gpu"], ["cuda:x"], ["cpu:0"], ["cpu", "cpu"], ["trt:1"]])
def test_calibration_eps_spelling(eps):
    with pytest.raises(UserError) as exc:
        ort_providers.check_calibration_eps(eps, probe=loads)
    assert exc.value.flag == "CALIBRATION_EPS"


def test_calibration_eps_accepts_modelopt_spellings():
    ort_providers.check_calibration_eps(["cpu"])
    ort_providers.check_calibration_eps(["cuda:1", "trt", "cpu"], flag="--calibration-eps", probe=loads)


def test_calibration_ep_whose_library_is_missing():
    probe = probe_or_skip(CUDA)
    with pytest.raises(UserError) as exc:
        ort_providers.check_calibration_eps(["cuda:0", "cpu"])
    assert exc.value.flag == "CALIBRATION_EPS" and probe.missing[0] in str(exc.value)
    with pytest.raises(UserError) as exc:
        ort_providers.check_calibration_eps(
            ["trt", "cpu"], flag="--calibration-eps", probe=fails(TRT="libnvinfer.so.10")
        )
    assert exc.value.flag == "--calibration-eps" and "libnvinfer.so.10" in str(exc.value)
