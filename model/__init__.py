"""Training, compression, scoring and candidates: everything between the data and the served model.

Run time (numpy + onnxruntime only, what the flow imports):
  serving.py     ``Recommender``: sessions in, top-K items out; ``OnnxScorer``
  manifest.py    the sha256 of every served file: sealed by training, checked at load
  candidates.py  ``CandidateIndex``: co-visitation, embedding neighbours, popular; online counts

Training (torch, ``streamrec train``):
  data.py        sequences, vocabulary, leave-one-out and streaming splits
  baselines.py   most-popular and co-visitation
  sasrec.py      the transformer (teacher and student share it), plain or hybrid
  hybrid.py      a hybrid's co-visitation input in torch (the sums serving computes)
  train.py       full-softmax training, distillation targets, early stopping
  prune.py       structured pruning of FFN units, heads and dimensions
  export.py      ONNX export, int8 quantization, agreement with fp32
  metrics.py     full-ranking NDCG/HR, bootstrap intervals
  bench.py       scoring latency
  evaluation.py  every variant scored as served; its card row, the targets
  card.py        the card's typed rows; card.json, card.md, the plots, the choice by f
  pipeline.py    the stages in order;  cli.py  the ``train`` command
"""
