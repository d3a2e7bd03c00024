"""int8 quantization: 7-bit weights, and the MatMuls the sensitivity check keeps in fp32."""

from __future__ import annotations

import doctest
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.train
torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from onnx import numpy_helper  # noqa: E402

from streamrec.model import export  # noqa: E402
from streamrec.model.sasrec import SASRec, SASRecConfig  # noqa: E402


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    cfg = SASRecConfig(n_items=60, max_len=8, d_model=16, n_heads=2, head_dim=8, d_ff=32)
    path = tmp_path_factory.mktemp("export") / "tiny.onnx"
    assert export.export_onnx(SASRec(cfg), path, "tiny") < 1e-4
    return path


@pytest.fixture(scope="module")
def feeds() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    histories = [rng.integers(1, 60, size=rng.integers(1, 12)) for _ in range(48)]
    candidates = [rng.choice(np.arange(1, 60), size=20, replace=False) for _ in histories]
    return export.calibration_feeds(histories, candidates, max_len=8, batch_size=16)


def int8_weights(path: Path) -> list[np.ndarray]:
    graph = onnx.load(str(path)).graph
    weights = (numpy_helper.to_array(init) for init in graph.initializer)
    return [w for w in weights if w.dtype == np.int8 and w.size > 1]


def test_the_docstring_examples_hold() -> None:
    result = doctest.testmod(export)
    assert result.failed == 0 and result.attempted > 0


def test_dynamic_int8_weights_are_seven_bit(fp32_model: Path, tmp_path: Path) -> None:
    target = tmp_path / "dynamic.onnx"
    export.quantize_dynamic_int8(fp32_model, target)
    weights = int8_weights(target)
    assert weights and all(np.abs(w).max() <= 64 for w in weights)


def test_static_int8_weights_are_seven_bit(
    fp32_model: Path, feeds: list[dict[str, np.ndarray]], tmp_path: Path
) -> None:
    target = tmp_path / "static.onnx"
    export.quantize_static_int8(fp32_model, target, feeds)
    weights = int8_weights(target)
    assert weights and all(np.abs(w).max() <= 64 for w in weights)


def test_sensitivity_is_measured_for_every_weight_matmul(
    fp32_model: Path, feeds: list[dict[str, np.ndarray]]
) -> None:
    sensitivity = export.matmul_sensitivity(fp32_model, feeds)
    assert set(sensitivity) == set(export.weight_matmuls(fp32_model))
    assert all(np.isfinite(s) and s >= 0.0 for s in sensitivity.values())


def test_matmuls_kept_by_sensitivity_stay_fp32(
    fp32_model: Path,
    feeds: list[dict[str, np.ndarray]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(export, "sensitive_matmuls", lambda s: [max(s, key=s.__getitem__)])
    target = tmp_path / "dynamic.onnx"
    kept = export.quantize_dynamic_int8(fp32_model, target, feeds)
    assert len(kept) == 1
    graph = onnx.load(str(target)).graph
    matmuls = {node.name for node in graph.node if node.op_type == "MatMul"}
    quantized = [node for node in graph.node if node.op_type == "MatMulInteger"]
    assert kept[0] in matmuls
    assert len(quantized) == len(export.weight_matmuls(fp32_model)) - 1
