"""Shared fixtures: tiny YOLOv10 models (random weights, no network) and a loader for the CLI scripts."""

from __future__ import annotations

import contextlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# Small enough to export in ~2 s on 2 CPU cores: anchors (160/8)^2 + (160/16)^2 + (160/32)^2 = 525.
TINY_IMGSZ = 160
TINY_NC = 80
TINY_ANCHORS = 525


def _load_script(relative_path: str):
    """Import a CLI script by path (its directory may contain hyphens, so it is no package)."""
    path = REPO_ROOT / relative_path
    name = "script_" + path.stem
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def load_script():
    """``load_script("scripts/cv-models/x.py")`` returns the imported module; call its ``main([...])``."""
    return _load_script


_HOLD = (
    "import sys, time\nfrom lowbit.run_lock import hold_run_folder\n"
    "with hold_run_folder(sys.argv[1], '--run-root'):\n    print('held', flush=True)\n    time.sleep(120)\n"
)


@contextlib.contextmanager
def _folder_held_elsewhere(folder: Path):
    """Another process holds ``folder``'s run lock for the block; yields that process (its ``pid`` is the holder)."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.terminate()
        holder.wait(timeout=30)


@pytest.fixture(scope="session")
def folder_held_elsewhere():
    """``with folder_held_elsewhere(path) as holder:`` another process writes ``path`` (holds its run lock)."""
    return _folder_held_elsewhere


def _redraw_weights(model, seed: int = 0, gain: float = 1.5) -> None:
    """Give every conv and BatchNorm fresh random values that keep the signal alive.

    PyTorch's default conv init shrinks activations layer after layer, so an untrained YOLOv10's
    head outputs are just its biases, whatever the image: a torch/ONNX comparison on such a model
    would prove nothing about the backbone. Weights ~ N(0, gain^2 / fan_in) with gain 1.5 keep the
    outputs image-dependent (max |out| ~ 1e2 at 160 px); random BatchNorm statistics make Conv+BN
    folding do real work; the one-to-one and one-to-many heads stop being copies of each other.
    The DFL conv (fixed bin values, requires_grad False) is left alone.
    """
    import math

    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d) and module.weight.requires_grad:
                std = gain / math.sqrt(module.weight[0].numel())
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
            elif isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)


@pytest.fixture(scope="session")
def tiny_yolov10_pt(tmp_path_factory) -> Path:
    """A YOLOv10n checkpoint (nc=80, seeded random weights, see ``_redraw_weights``) in ultralytics' ``.pt`` layout."""
    import torch
    from ultralytics.nn.tasks import DetectionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DetectionModel("yolov10n.yaml", nc=TINY_NC, verbose=False)
    _redraw_weights(model.eval())
    path = tmp_path_factory.mktemp("tiny_pt") / "yolov10n-tiny.pt"
    torch.save({"model": model, "train_args": {}}, path)
    return path


@pytest.fixture(scope="session")
def tiny_yolov10_onnx(tiny_yolov10_pt, tmp_path_factory) -> Path:
    """``tiny_yolov10_pt`` exported by the raw-head exporter at ``TINY_IMGSZ``: output [1, 144, 525]."""
    out = tmp_path_factory.mktemp("tiny_onnx") / "yolov10n-tiny.onnx"
    exporter = _load_script("scripts/cv-models/export_yolov10_raw_onnx.py")
    rc = exporter.main(["--weights", str(tiny_yolov10_pt), "--imgsz", str(TINY_IMGSZ), "--out", str(out)])
    assert rc == 0 and out.is_file()
    return out


@pytest.fixture(scope="session")
def tiny_yolov10_spec() -> dict[str, int]:
    """Input size, classes and anchor count of the tiny YOLOv10 fixtures."""
    return {"imgsz": TINY_IMGSZ, "nc": TINY_NC, "anchors": TINY_ANCHORS, "channels": 4 * 16 + TINY_NC}


@pytest.fixture(scope="session")
def demo_val_slice(tmp_path_factory):
    """``demo_val_slice(n)``: a dataset root with the first ``n`` images of the demo val split, made once per ``n``.

    The generator is deterministic per image, so these are byte-identical to the full split's first ``n``.
    """
    made: dict[int, Path] = {}

    def make(num_val: int) -> Path:
        if num_val not in made:
            root = tmp_path_factory.mktemp("demo") / "demo-shapes"
            argv = ["--out-root", str(root), "--splits", "val", "--num-val", str(num_val), "--workers", "2"]
            assert _load_script("scripts/cv-models/make_demo_dataset.py").main(argv) == 0
            made[num_val] = root
        return made[num_val]

    return make


def _qdq_add_model(dtype: int):
    """images -> (Q/DQ) x2 -> Add -> Q/DQ -> Relu: the DQ-Add-Q pattern ORT fuses into QLinearAdd."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    for name, src in (("a", "images"), ("b", "images"), ("c", "sum")):
        inits += [
            numpy_helper.from_array(np.array(0.05, np.float32), f"{name}_scale"),
            helper.make_tensor(f"{name}_zp", dtype, [], [0]),
        ]
        nodes += [
            helper.make_node("QuantizeLinear", [src, f"{name}_scale", f"{name}_zp"], [f"{name}_q"], name=f"{name}_q"),
            helper.make_node(
                "DequantizeLinear", [f"{name}_q", f"{name}_scale", f"{name}_zp"], [f"{name}_dq"], name=f"{name}_dq"
            ),
        ]
        if name == "b":
            nodes.append(helper.make_node("Add", ["a_dq", "b_dq"], ["sum"], name="add"))
    nodes.append(helper.make_node("Relu", ["c_dq"], ["out"], name="relu"))
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 8, 8])
    graph = helper.make_graph(nodes, "qdq_add", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


@pytest.fixture(scope="session")
def qdq_add_model():
    """``qdq_add_model(dtype)``: a tiny Q/DQ graph (images -> Q/DQ x2 -> Add -> Q/DQ -> Relu) in the given Q dtype."""
    return _qdq_add_model
