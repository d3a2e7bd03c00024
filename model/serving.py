"""Scoring at run time: sessions in, top-K items out, with numpy and onnxruntime alone (no torch).

The flow holds one ``Recommender`` per worker (its buffers are reused between
calls, so it is not shared between threads) and calls it once per micro-batch:

>>> from streamrec.settings import Settings
>>> rec = Recommender.load(Settings().model_dir)
>>> [top] = rec.recommend([["1", "50", "260"]], k=3)
>>> len(top), all(item not in {"1", "50", "260"} for item, _ in top)
(3, True)
>>> rec.observe("260", "1196")  # online co-visitation and popularity update
>>> rec.learn(["1", "50", "260", "1196"], user="u1")  # the same, as the flow does it (quota.py)
>>> from streamrec.item_hashes import item_hashes
>>> consumed = item_hashes([item for item, _ in top])  # e.g. rated long ago
>>> [again] = rec.recommend([["1", "50", "260"]], k=3, exclude=[consumed])
>>> any(item in {i for i, _ in top} for item, _ in again)
False

A session's answer does not depend on the sessions batched with it, except
under dynamic int8 quantization, whose activation scales come from the whole
batch: there, scores move slightly with the batch (static int8 and fp32 do not).

For each session: the item ids known to the vocabulary are the model's input
(unknown ones are cold: invisible to the model but still seen); the candidate
index proposes unseen items; the ONNX model scores them (a hybrid model with
their co-visitation sums from the same index); the best ``k`` are
returned best first.  A session with no known item gets the popular items.
Items whose hash is in the session's ``exclude`` (what the user consumed
beyond the window, ``streamrec.state.consumed``) are never candidates, as if seen: the
candidate sources fill their places with the next items they would propose.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnxruntime as ort
import orjson

from streamrec.item_hashes import EMPTY, HASH_DTYPE, isin_sorted, item_hashes
from streamrec.model.candidates import CandidateIndex, Excluded, Reads
from streamrec.model.data import PAD, Vocab
from streamrec.model.exclusions import DEFAULT_MAX_BYTES, ExclusionCodes
from streamrec.model.manifest import CARD_FILE, INDEX_FILE, VOCAB_FILE, Manifest
from streamrec.model.quota import UserQuota, is_repeat

# Sessions per call; larger batches are split.  Candidate generation takes a few arrays of
# batch × catalogue: past 32 sessions they outgrow the caches and cost more per event.
MAX_BATCH = 32


@dataclass(frozen=True, slots=True)
class Prepared:
    """One session made ready to answer (``Recommender.prepare``): its known items, the
    vocabulary codes it must not be proposed, and the online counts as of its event, or,
    for a session with no known item, its answer already."""

    known: np.ndarray
    excluded: np.ndarray | None
    reads: Reads | None
    cold: list[tuple[str, float]] | None


class ArtifactError(RuntimeError):
    """The artifact directory lacks a file or names a variant it does not hold."""


def session_options(threads: int = 1) -> ort.SessionOptions:
    """One intra-op thread per session by default, no spinning (the dataflow shares the cores)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # A spinning idle thread burns a core the dataflow needs between micro-batches.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


class OnnxScorer:
    """An exported model: item sequences [B, L] and candidates [B, C] → scores [B, C].

    A hybrid model also takes the candidates' co-visitation sums; the
    scorer computes them from ``covisit``, the candidate index, unless they are given.
    """

    def __init__(
        self,
        path: Path,
        threads: int = 1,
        covisit: CandidateIndex | None = None,
        content: bytes | None = None,
    ) -> None:
        self.path = Path(path)
        # ``content``: the file's bytes, already read and checked (``Recommender.load``).
        self.session = ort.InferenceSession(
            content if content is not None else str(self.path),
            session_options(threads),
            providers=["CPUExecutionProvider"],
        )
        meta = self.session.get_modelmeta().custom_metadata_map
        self.max_len = int(meta.get("max_len", "50"))
        self.covisit = covisit
        # The newest items whose co-visitation a hybrid takes as input (0: a plain model).
        self.covisit_recent = int(meta.get("config.covisit_recent", "0"))
        names = {i.name for i in self.session.get_inputs()}
        if "covisit" in names and not self.covisit_recent:
            raise ArtifactError(f"{self.path} takes co-visitation but names no covisit_recent")

    def score(
        self, items: np.ndarray, candidates: np.ndarray, covisit: np.ndarray | None = None
    ) -> np.ndarray:
        feeds = {"items": items, "candidates": candidates}
        if self.covisit_recent:
            if covisit is None:
                if self.covisit is None:
                    raise ArtifactError(
                        f"{self.path.name} is a hybrid: give OnnxScorer the candidate index "
                        "(covisit=CandidateIndex.load(...)) or score(..., covisit=sums)"
                    )
                covisit = self.covisit.covisit_sums(items, candidates, self.covisit_recent)
            feeds["covisit"] = covisit
        out: np.ndarray = self.session.run(None, feeds)[0]
        return out


class Recommender:
    """Top-K unseen items for a micro-batch of sessions, scored by one ONNX model."""

    def __init__(
        self,
        scorer: OnnxScorer,
        vocab: Vocab,
        index: CandidateIndex,
        version: str,
        candidates: int = 200,
        user_cap: int = 0,
        exclusion_cache_bytes: int = DEFAULT_MAX_BYTES,
        quota_period: int = 0,
    ) -> None:
        """``user_cap``: events of one user ``learn`` counts per ``quota_period`` (the index's
        half-life; 0: no cap); ``exclusion_cache_bytes``: the bound of the consumed codes."""
        self.scorer, self.vocab, self.index, self.version = scorer, vocab, index, version
        self.n_candidates = min(candidates, vocab.size - 1)
        self.max_len = scorer.max_len
        # Reused input buffers: a call slices contiguous views instead of allocating.
        self._items = np.zeros(MAX_BATCH * self.max_len, dtype=np.int64)
        self._candidates = np.zeros(MAX_BATCH * self.n_candidates, dtype=np.int64)
        # The hash of every item by its code (PAD's is 0), to match exclusions without decoding.
        self._hashes = np.zeros(vocab.size, dtype=HASH_DTYPE)
        self._hashes[1:] = item_hashes(vocab.items)
        self._exclusions = ExclusionCodes(self._hashes, exclusion_cache_bytes)
        self._quota = UserQuota(user_cap, quota_period)

    @classmethod
    def load(
        cls,
        artifact_dir: Path,
        variant: str | None = None,
        threads: int = 1,
        candidates: int = 200,
        half_life: int = 0,
        user_cap: int = 0,
        exclusion_cache_bytes: int = DEFAULT_MAX_BYTES,
    ) -> Recommender:
        """The card's chosen variant (or ``variant``), its vocabulary and candidate index.

        The directory is checked against its manifest (``streamrec.model.manifest``) and
        each file used is read through it: what is served is what was sealed, or the
        load raises a ``ManifestError`` naming the file.  ``half_life``: events over which
        the online counts halve (0: never); ``user_cap``: events of one user counted per
        half-life (0: no cap).
        """
        artifact_dir = Path(artifact_dir)
        if not (artifact_dir / CARD_FILE).exists():
            raise ArtifactError(
                f"no {CARD_FILE} in {artifact_dir}: train first (`streamrec train --out "
                f"{artifact_dir}`) or point STREAMREC_MODEL_DIR at trained artifacts"
            )
        manifest = Manifest.load(artifact_dir)
        card = orjson.loads(manifest.read(CARD_FILE))
        name = variant or card["chosen"]
        files = {v["name"]: v.get("onnx") for v in card["variants"]}
        onnx_file = files.get(name)
        if onnx_file is None or not manifest.exists(onnx_file):
            servable = sorted(n for n, f in files.items() if f and manifest.exists(f))
            raise ArtifactError(
                f"variant {name!r} has no ONNX file in {artifact_dir} "
                f"(servable here: {', '.join(servable) or 'none'})"
            )
        manifest.check(card)
        content = manifest.read(onnx_file)
        # One index: a hybrid scores with the co-visitation that ``observe`` keeps current.
        index = CandidateIndex.load(io.BytesIO(manifest.read(INDEX_FILE)), half_life)
        return cls(
            OnnxScorer(manifest.path(onnx_file), threads, covisit=index, content=content),
            Vocab.from_json(manifest.read(VOCAB_FILE)),
            index,
            version=f"{name}@{manifest.digests[onnx_file][:8]}",
            candidates=candidates,
            user_cap=user_cap,
            exclusion_cache_bytes=exclusion_cache_bytes,
            quota_period=half_life,
        )

    def recommend(
        self,
        histories: Sequence[Sequence[str]],
        k: int,
        exclude: Sequence[np.ndarray] | None = None,
        users: Sequence[str] | None = None,
    ) -> list[list[tuple[str, float]]]:
        """Top ``k`` (item id, score) per session, best first, none already in the session.

        ``exclude``: per session, hashes (``streamrec.item_hashes.item_hash``) of items never
        to recommend either; ``users``: whose sessions they are, so that each user's
        exclusions are looked up anew only for what they consumed since
        (``streamrec.model.exclusions``).
        Every session is answered from the online counts as they are now.
        """
        if k <= 0:
            return [[] for _ in histories]
        prepared = [
            self.prepare(
                history,
                k,
                EMPTY if exclude is None else exclude[row],
                None if users is None else users[row],
            )
            for row, history in enumerate(histories)
        ]
        return self.answer(prepared, k)

    def prepare(
        self, history: Sequence[str], k: int, exclude: np.ndarray = EMPTY, user: str | None = None
    ) -> Prepared:
        """What one session's answer reads of the online counts, taken now.

        The flow prepares each event right after observing it and before observing
        the next, then answers the whole micro-batch in one call (``answer``): each
        answer is the one its event would get alone, however the events were batched.
        """
        known = self._known(history)
        if not len(known):
            # Cold start: the popular items, answered at once (the counts are its scores).
            return Prepared(known, None, None, self._popular(known, k, exclude))
        codes = None
        if len(exclude):
            codes = self._exclusions.of(user, exclude)
            codes = codes[codes != PAD]
        excluded = 0 if codes is None else len(codes)
        reads = self.index.reads(known, self.n_candidates, excluded, self.scorer.covisit_recent)
        return Prepared(known, codes, reads, None)

    def answer(self, prepared: Sequence[Prepared], k: int) -> list[list[tuple[str, float]]]:
        """The answers of sessions ``prepare`` took, in order, scored ``MAX_BATCH`` at a time."""
        out: list[list[tuple[str, float]]] = []
        for lo in range(0, len(prepared), MAX_BATCH):
            out += self._answer_batch(prepared[lo : lo + MAX_BATCH], k)
        return out

    def observe(self, prev_item: str | None, item: str) -> None:
        """Count an interaction with ``item`` right after ``prev_item`` in the candidate index."""
        prev = self.vocab.encode(prev_item) if prev_item is not None else PAD
        self.index.observe(prev, self.vocab.encode(item))

    def learn(self, history: Sequence[str], user: str | None = None) -> None:
        """Count the newest interaction of a session's window ``history`` (oldest first), as
        ``observe`` does, unless its item is a repeat within the window or ``user`` has spent
        their quota (``streamrec.model.quota``): what one key can add is bounded."""
        if is_repeat(history):
            return
        if user is not None and not self._quota.admit(user):
            return
        self.observe(history[-2] if len(history) > 1 else None, history[-1])

    def _answer_batch(self, prepared: Sequence[Prepared], k: int) -> list[list[tuple[str, float]]]:
        out = [p.cold or [] for p in prepared]
        rows = [r for r, p in enumerate(prepared) if p.reads is not None]
        if not rows or k <= 0:
            return out
        sessions = [prepared[r].known for r in rows]
        reads = [cast(Reads, prepared[r].reads) for r in rows]
        batch = self.index.candidate_batch(
            sessions,
            self.n_candidates,
            _excluded([prepared[r].excluded for r in rows]),
            self.scorer.covisit_recent,
            reads,
        )
        width = min(self.max_len, max(len(h) for h in sessions))
        items = self._items[: len(rows) * width].reshape(len(rows), width)
        n_rows, n_cands = batch.items.shape
        cands = self._candidates[: n_rows * n_cands].reshape(n_rows, n_cands)
        items.fill(PAD)
        for i, h in enumerate(sessions):
            tail = h[-width:]
            items[i, width - len(tail) :] = tail
        cands[...] = batch.items
        scores = self.scorer.score(items, cands, batch.covisit)
        scores[cands == PAD] = -np.inf  # padding after a short candidate list
        n = min(k, n_cands)
        if n < n_cands:
            top = np.argpartition(-scores, n - 1, axis=1)[:, :n]
        else:
            top = np.tile(np.arange(n), (n_rows, 1))
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        best_items = np.take_along_axis(cands, np.take_along_axis(top, order, axis=1), axis=1)
        best_scores = np.take_along_axis(top_scores, order, axis=1).tolist()
        decode = self.vocab.items.__getitem__
        codes = (best_items - 1).tolist()  # item code c is vocab.items[c - 1]
        counts = batch.counts.tolist()
        for i, r in enumerate(rows):
            m = min(n, counts[i])
            out[r] = list(zip(map(decode, codes[i][:m]), best_scores[i][:m], strict=True))
        return out

    def _known(self, history: Sequence[str]) -> np.ndarray:
        encoded = self.vocab.encode_many(history)
        return encoded[encoded != PAD]

    def _popular(self, seen: np.ndarray, k: int, exclude: np.ndarray) -> list[tuple[str, float]]:
        """Cold start: the most popular unseen items, scored by their interaction counts."""
        top = self.index.popular(k + len(seen) + len(exclude))
        top = top[~np.isin(top, seen) & ~isin_sorted(self._hashes[top], np.sort(exclude))][:k]
        counts = self.index.counts(top).tolist()
        return [(self.vocab.decode(int(i)), c) for i, c in zip(top.tolist(), counts, strict=True)]


def _excluded(codes: Sequence[np.ndarray | None]) -> Excluded | None:
    """The excluded vocabulary codes of a batch's rows, as (row, item) pairs; None: none."""
    if not any(c is not None and len(c) for c in codes):
        return None
    items = np.concatenate([c for c in codes if c is not None])
    rows = np.repeat(np.arange(len(codes)), [0 if c is None else len(c) for c in codes])
    return Excluded(rows, items)


def read_card(artifact_dir: Path) -> dict[str, Any]:
    card: dict[str, Any] = orjson.loads((Path(artifact_dir) / CARD_FILE).read_bytes())
    return card
