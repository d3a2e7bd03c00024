"""ONNX export, int8 quantization with onnxruntime, agreement of a quantized model with its source.

Export uses torch's TorchScript-based exporter (``dynamo=False``) on purpose:
it exports in well under a second where the dynamo exporter takes 6–17 s per
model here (the ``--quick`` pipeline and its tests export several), and after
onnxruntime's graph optimizations both graphs score equally fast (measured:
0.217 vs 0.224 ms per event).  Every export is checked against torch on a
batch with padding and a shorter length than the context, so a silent
tracing mistake fails loudly.

Quantization is int8 either way:

* dynamic: weights quantized ahead, activations at run time (recommended for
  transformers, no calibration);
* static (QDQ): activations too, with ranges calibrated on real sessions.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from model.data import left_pad
from model.sasrec import SASRec
from model.serving import OnnxScorer

OPSET = 17


def export_onnx(model: SASRec, path: Path, name: str) -> float:
    """Write ``model`` as ONNX (dynamic batch, length and candidates); return the parity error."""
    model.eval()
    cfg = model.cfg
    seq = torch.randint(1, cfg.n_items, (2, cfg.max_len))
    candidates = torch.randint(1, cfg.n_items, (2, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model,
            (seq, candidates),
            str(path),
            input_names=["items", "candidates"],
            output_names=["scores"],
            dynamic_axes={
                "items": {0: "batch", 1: "length"},
                "candidates": {0: "batch", 1: "n_candidates"},
                "scores": {0: "batch", 1: "n_candidates"},
            },
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    proto = onnx.load(str(path))
    _set_metadata(proto, {"variant": name, "max_len": str(cfg.max_len), **_config_meta(model)})
    onnx.save(proto, str(path))
    return parity_error(model, path)


def _config_meta(model: SASRec) -> dict[str, str]:
    return {f"config.{k}": str(v) for k, v in model.cfg.to_dict().items()}


def _set_metadata(proto: onnx.ModelProto, meta: dict[str, str]) -> None:
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)


@torch.no_grad()
def parity_error(model: SASRec, path: Path) -> float:
    """Largest |torch − onnxruntime| score on a padded batch shorter than the context."""
    g = torch.Generator().manual_seed(0)
    length = max(1, model.cfg.max_len // 2 + 1)
    seq = torch.randint(1, model.cfg.n_items, (3, length), generator=g)
    seq[0, : length // 2] = 0
    candidates = torch.randint(1, model.cfg.n_items, (3, 37), generator=g)
    expected = model.score(seq, candidates).numpy()
    got = OnnxScorer(path).score(seq.numpy(), candidates.numpy())
    return float(np.abs(expected - got).max())


def scoring_nodes(path: Path) -> list[str]:
    """The MatMul that turns the hidden state and candidate embeddings into scores.

    It is left in fp32, as are the embedding lookups (Gather is not quantized): one
    int8 scale for a whole embedding table blurs rows of small norm, and full-catalogue
    rankings are decided by exactly these dot products.  Both cost little compute.
    """
    graph = onnx.load(str(path)).graph
    producer = {out: node for node in graph.node for out in node.output}
    node = producer.get(graph.output[0].name)
    while node is not None and node.op_type != "MatMul":
        node = producer.get(node.input[0])
    return [node.name] if node is not None else []


def quantize_dynamic_int8(source: Path, target: Path) -> None:
    """int8 weights (per output channel) of the transformer's MatMuls, activations on the fly."""
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_dynamic(
            str(prepared),
            str(target),
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=scoring_nodes(prepared),
            per_channel=True,
            weight_type=QuantType.QInt8,
        )
    _copy_metadata(source, target)


class SessionReader(CalibrationDataReader):
    """Feeds real (session, candidates) batches to the calibrator."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._feeds: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def calibration_feeds(
    histories: Sequence[np.ndarray],
    candidates: Sequence[np.ndarray],
    max_len: int,
    batch_size: int = 32,
) -> list[dict[str, np.ndarray]]:
    feeds = []
    for lo in range(0, len(histories), batch_size):
        width = min(len(c) for c in candidates[lo : lo + batch_size])
        feeds.append(
            {
                "items": left_pad(histories[lo : lo + batch_size], max_len),
                "candidates": np.stack([c[:width] for c in candidates[lo : lo + batch_size]]),
            }
        )
    return feeds


def quantize_static_int8(
    source: Path, target: Path, feeds: Sequence[dict[str, np.ndarray]]
) -> None:
    """int8 weights and activations (QDQ), activation ranges calibrated on ``feeds``."""
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(target),
            SessionReader(feeds),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=scoring_nodes(prepared),
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
        )
    _copy_metadata(source, target)


def _copy_metadata(source: Path, target: Path) -> None:
    meta = {p.key: p.value for p in onnx.load(str(source)).metadata_props}
    proto = onnx.load(str(target))
    _set_metadata(proto, meta)
    onnx.save(proto, str(target))


def agreement(reference: np.ndarray, other: np.ndarray, k: int = 10) -> dict[str, float]:
    """How closely ``other`` scores [N, C] follow ``reference``: top-k overlap and score error.

    Both score the same candidates; excluded entries are ``-inf`` in both.
    """
    finite = np.isfinite(reference)
    top_ref = np.argpartition(-reference, k - 1, axis=1)[:, :k]
    top_other = np.argpartition(-other, k - 1, axis=1)[:, :k]
    overlap = [len(np.intersect1d(a, b)) / k for a, b in zip(top_ref, top_other, strict=True)]
    diff = np.where(
        finite, np.abs(np.where(finite, reference, 0.0) - np.where(finite, other, 0.0)), 0.0
    )
    spread = float(np.std(reference[finite]))
    return {
        f"top{k}_overlap": float(np.mean(overlap)),
        "score_mae": float(diff.sum() / finite.sum()),
        "score_max_error": float(diff.max()),
        "score_mae_relative": float(diff.sum() / finite.sum() / spread) if spread else 0.0,
    }
