"""ONNX export, int8 quantization with onnxruntime, agreement of a quantized model with its source.

Export uses torch's TorchScript-based exporter (``dynamo=False``) on purpose:
it exports in well under a second where the dynamo exporter takes 6–17 s per
model here (the ``--quick`` pipeline and its tests export several), and after
onnxruntime's graph optimizations both graphs score equally fast (measured:
0.217 vs 0.224 ms per event).  Every export is checked against torch on a
batch with padding and a shorter length than the context, so a silent
tracing mistake fails loudly.

Quantization is int8 either way, over the transformer's weight MatMuls:

* dynamic: weights quantized ahead, activations at run time (recommended for
  transformers, no calibration);
* static (QDQ): activations too, with ranges calibrated on real sessions.

Weights are 7-bit (``reduce_range``), per output channel.  Without VNNI,
onnxruntime multiplies uint8 activations by int8 weights with ``vpmaddubsw``,
which adds pairs of products into int16 and saturates (255·127·2 > 2^15): with
full 8-bit per-channel weights the pruned student's validation scores moved
5× more (relative score error 0.013 vs 0.0025, top-10 overlap 0.970 vs 0.996).
Dynamic quantization then leaves in fp32 any MatMul that, quantized alone,
moves the validation scores far more than the others (at most two; with 7-bit
weights no MatMul of the pruned student or the teacher stood out; with 8-bit
ones the first block's value projection did, at 8× the median).
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

from streamrec.model.candidates import CandidateIndex
from streamrec.model.data import left_pad
from streamrec.model.sasrec import SASRec
from streamrec.model.serving import OnnxScorer

OPSET = 17
# 7-bit weights: no int16 saturation in the uint8 × int8 kernels of CPUs without VNNI.
REDUCE_RANGE = True
# A MatMul stays fp32 if, quantized alone, it moves the scores this many times the median.
SENSITIVITY_FACTOR = 3.0
MAX_SENSITIVE = 2  # at most this many MatMuls stay fp32 for sensitivity


def export_onnx(model: SASRec, path: Path, name: str) -> float:
    """Write ``model`` as ONNX (dynamic batch, length and candidates); return the parity error."""
    model.eval()
    cfg = model.cfg
    seq = torch.randint(1, cfg.n_items, (2, cfg.max_len))
    candidates = torch.randint(1, cfg.n_items, (2, 16))
    inputs: tuple[torch.Tensor, ...] = (seq, candidates)
    names = ["items", "candidates"]
    axes = {
        "items": {0: "batch", 1: "length"},
        "candidates": {0: "batch", 1: "n_candidates"},
        "scores": {0: "batch", 1: "n_candidates"},
    }
    if model.hybrid:
        # The candidates' co-visitation sums: serving computes them from its candidate index.
        inputs += (torch.rand(2, 16) * 4,)
        names.append("covisit")
        axes["covisit"] = {0: "batch", 1: "n_candidates"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model,
            inputs,
            str(path),
            input_names=names,
            output_names=["scores"],
            dynamic_axes=axes,
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
    covisit = None
    if model.hybrid:
        # Zero for most candidates, as in serving, large for a few.
        covisit = torch.rand(3, 37, generator=g) * 50 * (torch.rand(3, 37, generator=g) < 0.3)
    expected = model.score(seq, candidates, covisit).numpy()
    got = OnnxScorer(path).score(
        seq.numpy(), candidates.numpy(), None if covisit is None else covisit.numpy()
    )
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


def weight_matmuls(path: Path) -> list[str]:
    """The MatMuls with a weight matrix (an initializer): the ones int8 can cover."""
    graph = onnx.load(str(path)).graph
    weights = {init.name for init in graph.initializer}
    return [
        node.name
        for node in graph.node
        if node.op_type == "MatMul" and any(name in weights for name in node.input)
    ]


def quantize_dynamic_int8(
    source: Path, target: Path, feeds: Sequence[dict[str, np.ndarray]] = ()
) -> list[str]:
    """int8 weights (per output channel) of the transformer's MatMuls, activations on the fly.

    With validation ``feeds``, the MatMuls that ``sensitive_matmuls`` picks stay fp32;
    returns them (the scoring product, always fp32, is not listed).
    """
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        kept = sensitive_matmuls(matmul_sensitivity(prepared, feeds)) if feeds else []
        _quantize_dynamic(prepared, target, exclude=scoring_nodes(prepared) + kept)
    _copy_metadata(source, target)
    return kept


def _quantize_dynamic(
    prepared: Path, target: Path, exclude: list[str], only: list[str] | None = None
) -> None:
    quantize_dynamic(
        str(prepared),
        str(target),
        op_types_to_quantize=["MatMul"],
        nodes_to_quantize=only,
        nodes_to_exclude=exclude,
        per_channel=True,
        reduce_range=REDUCE_RANGE,
        weight_type=QuantType.QInt8,
    )


def matmul_sensitivity(prepared: Path, feeds: Sequence[dict[str, np.ndarray]]) -> dict[str, float]:
    """Per weight MatMul: how far quantizing it alone moves the scores of ``feeds``.

    The score error is relative to the spread of the fp32 scores (see ``agreement``).
    NDCG is not used: on a few hundred validation points it moves in steps of one
    user, while the score error orders the MatMuls the same way from run to run.
    """
    reference = _score_feeds(prepared, feeds)
    spread = float(np.std(reference)) or 1.0
    sensitivity = {}
    with tempfile.TemporaryDirectory() as tmp:
        single = Path(tmp) / "single.onnx"
        for name in weight_matmuls(prepared):
            _quantize_dynamic(prepared, single, exclude=scoring_nodes(prepared), only=[name])
            scores = _score_feeds(single, feeds)
            sensitivity[name] = float(np.mean(np.abs(scores - reference))) / spread
    return sensitivity


def sensitive_matmuls(
    sensitivity: dict[str, float],
    factor: float = SENSITIVITY_FACTOR,
    limit: int = MAX_SENSITIVE,
) -> list[str]:
    """The MatMuls (at most ``limit``, worst first) ``factor`` times more sensitive than the median.

    Only outliers are kept in fp32: each one costs an fp32 MatMul and a bias Add at
    run time, and when every MatMul moves the scores alike no single one is to blame.

    >>> sensitive_matmuls({"a": 1.0, "b": 1.1, "c": 0.9, "d": 1.0, "e": 9.0, "f": 4.0, "g": 5.0})
    ['e', 'g']
    >>> sensitive_matmuls({"a": 1.0, "b": 1.2, "c": 0.9})
    []
    """
    if not sensitivity:
        return []
    median = float(np.median(list(sensitivity.values())))
    worst = sorted(sensitivity, key=lambda name: -sensitivity[name])
    return [name for name in worst if sensitivity[name] > factor * median][:limit]


def _score_feeds(path: Path, feeds: Sequence[dict[str, np.ndarray]]) -> np.ndarray:
    scorer = OnnxScorer(path)
    return np.concatenate(
        [
            scorer.score(feed["items"], feed["candidates"], feed.get("covisit")).ravel()
            for feed in feeds
        ]
    )


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
    covisit: CandidateIndex | None = None,
    covisit_recent: int = 0,
) -> list[dict[str, np.ndarray]]:
    """Model inputs in batches; with ``covisit_recent`` (a hybrid) the sums from ``covisit``."""
    feeds = []
    for lo in range(0, len(histories), batch_size):
        width = min(len(c) for c in candidates[lo : lo + batch_size])
        feed = {
            "items": left_pad(histories[lo : lo + batch_size], max_len),
            "candidates": np.stack([c[:width] for c in candidates[lo : lo + batch_size]]),
        }
        if covisit_recent:
            if covisit is None:
                raise ValueError("a hybrid's calibration feeds need the candidate index")
            feed["covisit"] = covisit.covisit_sums(
                feed["items"], feed["candidates"], covisit_recent
            )
        feeds.append(feed)
    return feeds


def quantize_static_int8(
    source: Path, target: Path, feeds: Sequence[dict[str, np.ndarray]]
) -> None:
    """int8 weights and MatMul inputs (QDQ), activation ranges calibrated on ``feeds``.

    MatMul outputs stay fp32: onnxruntime then fuses each quantized MatMul into one
    MatMulIntegerToFloat instead of QLinearMatMul plus a DequantizeLinear (measured:
    7% less time per event at batch 1, and relative score error 0.0037 instead of 0.0059).
    """
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
            reduce_range=REDUCE_RANGE,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={
                "WeightSymmetric": True,
                "ActivationSymmetric": False,
                "OpTypesToExcludeOutputQuantization": ["MatMul"],
            },
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
