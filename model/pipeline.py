"""`streamrec train`: from interaction data to the served model, its alternatives and the card.

Stages, in order (one progress bar over them):

1. load the events and split them (``streamrec.model.data``: leave-one-out and streaming);
2. baselines: most-popular and co-visitation;
3. teacher: a wide, deep, long-context SASRec that also takes the
   co-visitation sums of its candidates as an input (a hybrid, ``streamrec.model.hybrid``),
   chosen by a small search on validation (``streamrec.model.search``), one block deeper per
   doubling of the training windows beyond ``teacher_windows_per_block``;
4. the teacher's top items at every training position (distillation targets);
5. two students of one size and initialisation, hybrids too: one on the data alone,
   one distilled from the teacher as well, so the card shows what distillation buys;
6. structured pruning of the distilled student, then fine-tuning;
7. ONNX export of every model, int8 quantization (dynamic and static) of the
   students, and the candidate index;
8. evaluation of every variant through onnxruntime, as served: both protocols,
   intervals, agreement of int8 with fp32, candidate recall, latency;
9. the card, the choice by ``f``, and the artifacts the flow and benchmark need, sealed
   with their sha256 digests (``streamrec.model.manifest``).

With a time budget (``streamrec.model.budget``) each stage gets a share of the time left;
training stages stop at their deadline, the others are not cut.  The loss follows
the catalogue: a full softmax up to ``softmax_max_items`` items, a softmax over
sampled negatives above (gBCE, also there, learnt too slowly on a short budget:
validation fell below the warm start's in its first epoch); batch sizes follow the
number of training windows.

``run`` reads as the stages in order: each is one function below it, and what a stage
hands to the next is a typed record (``Points``, ``Training``, ``Trained``, ``Exported``,
``Choice``); the card is a ``streamrec.model.card.Card``.
"""

from __future__ import annotations

import platform
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from tqdm import tqdm

from streamrec.cpu import describe_int8_support
from streamrec.datasets import load_events
from streamrec.model import card as model_card
from streamrec.model.baselines import Covisit, Popular
from streamrec.model.bench import median_ms_per_event
from streamrec.model.budget import Budget, clock_text
from streamrec.model.candidates import CandidateIndex
from streamrec.model.card import (
    BudgetUse,
    Candidates,
    Card,
    Dataset,
    EndMetric,
    Environment,
    K,
    Protocol,
    Target,
    VariantRow,
)
from streamrec.model.data import EvalSet, Split, split_events
from streamrec.model.evaluation import (
    Variant,
    candidate_recall,
    check_targets,
    int8_student,
    onnx_score_all,
    onnx_score_candidates,
    rank_targets,
    scoring_latency,
    variant_rows,
)
from streamrec.model.export import (
    calibration_feeds,
    export_onnx,
    quantize_dynamic_int8,
    quantize_static_int8,
)
from streamrec.model.hybrid import CovisitTable
from streamrec.model.manifest import seal
from streamrec.model.metrics import ndcg_at
from streamrec.model.prune import PruneConfig, describe, importance, prune
from streamrec.model.sasrec import SASRec, SASRecConfig
from streamrec.model.search import TEACHER_CANDIDATES, Candidate, SearchResult, search
from streamrec.model.serving import INDEX_FILE, VOCAB_FILE, OnnxScorer
from streamrec.model.train import (
    FitReport,
    TeacherTargets,
    TrainConfig,
    batches,
    covisit_embeddings,
    fit,
    teacher_targets,
    training_windows,
)
from streamrec.settings import Settings

# Hybrid models add co-visitation from the session's newest items: as many as the
# candidate index and the co-visitation baseline read.
COVISIT_RECENT = 5


@dataclass(frozen=True, slots=True)
class Shape:
    """A SASRec's size; the vocabulary fills in ``n_items``."""

    max_len: int
    d_model: int
    n_heads: int
    head_dim: int
    d_ff: int
    n_blocks: int
    dropout: float
    covisit_recent: int = 0  # > 0: a hybrid, with co-visitation from this many newest items

    def config(self, n_items: int) -> SASRecConfig:
        return SASRecConfig(n_items=n_items, **asdict(self))


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    teacher: Shape
    student: Shape
    teacher_train: TrainConfig  # lr is the search's; batch_size is an upper bound (all three)
    student_train: TrainConfig  # the distilled student adds kd_weight to it
    finetune: TrainConfig  # after pruning, distilled too
    candidates: tuple[Candidate, ...] = TEACHER_CANDIDATES  # the teacher's search
    trial_epochs: int = 3  # most epochs of one search trial
    search_share: float = 0.4  # of the teacher's time, for the trials
    softmax_max_items: int = 10_000  # larger catalogues train on sampled negatives
    steps_per_epoch: int = 50  # batch size: windows / this, a power of two in [16, batch_size]
    early_stop_points: int = 5000  # validation points that decide early stopping (a subset)
    kd_weight: float = 0.5
    kd_temperature: float = 1.0
    kd_top: int = 50
    prune: PruneConfig = field(default_factory=PruneConfig)
    # The teacher gets a block more per doubling of its training windows beyond this many.
    teacher_windows_per_block: int = 8192
    train_history: int = 400  # neural models train on each user's newest training items
    warm_start: bool = True  # item embeddings start from the co-visitation PPMI factors
    stream_fraction: float = 0.1  # the final stretch of time, as a share of the events
    stream_points: int = 3000  # streaming test points evaluated (a fixed random subset)
    loo_points: int = 5000  # leave-one-out users evaluated (a fixed random subset)
    max_events: int | None = None  # keep only the first users' events (quick runs)
    serve_candidates: int = 200
    recall_at: tuple[int, ...] = (100, 200, 500)
    latency_sessions: int = 256
    bootstrap: int = 1000

    def distilled(self, train: TrainConfig) -> TrainConfig:
        """``train`` with the distillation loss added (weight and temperature)."""
        return replace(train, kd_weight=self.kd_weight, kd_temperature=self.kd_temperature)

    def card_config(self) -> dict[str, Any]:
        """The card's ``config`` section: shapes, training, distillation and pruning."""
        return {
            "teacher": asdict(self.teacher),
            "student": asdict(self.student),
            "loss_rule": f"full softmax (in chunks) up to {self.softmax_max_items:,} items, "
            f"softmax over the target and {self.teacher_train.negatives} uniform negatives above",
            "teacher_train": asdict(self.teacher_train),
            "student_train": asdict(self.student_train),
            "finetune": asdict(self.finetune),
            "kd": {
                "weight": self.kd_weight,
                "temperature": self.kd_temperature,
                "top": self.kd_top,
            },
            "prune": asdict(self.prune),
        }


FULL = PipelineConfig(
    teacher=Shape(
        max_len=200,
        d_model=128,
        n_heads=4,
        head_dim=32,
        d_ff=512,
        n_blocks=3,
        dropout=0.5,
        covisit_recent=COVISIT_RECENT,
    ),
    # Hybrid students too: plain ones, distilled from the hybrid teacher, kept 88% of it on
    # ml-latest-small; given the same co-visitation input they keep ≥ 95%.
    student=Shape(
        max_len=50,
        d_model=64,
        n_heads=2,
        head_dim=32,
        d_ff=256,
        n_blocks=2,
        dropout=0.2,
        covisit_recent=COVISIT_RECENT,
    ),
    teacher_train=TrainConfig(epochs=100, patience=3, batch_size=128),
    student_train=TrainConfig(epochs=100, patience=3, batch_size=128, lr=2e-3),
    finetune=TrainConfig(epochs=10, patience=2, batch_size=128, lr=1e-3, warmup_steps=1),
)

QUICK = PipelineConfig(
    teacher=Shape(
        max_len=30,
        d_model=32,
        n_heads=2,
        head_dim=16,
        d_ff=64,
        n_blocks=2,
        dropout=0.1,
        covisit_recent=COVISIT_RECENT,
    ),
    student=Shape(
        max_len=20,
        d_model=16,
        n_heads=2,
        head_dim=8,
        d_ff=32,
        n_blocks=1,
        dropout=0.1,
        covisit_recent=COVISIT_RECENT,
    ),
    teacher_train=TrainConfig(epochs=2, patience=1, batch_size=32, warmup_steps=5),
    student_train=TrainConfig(epochs=2, patience=1, batch_size=32, lr=3e-3, warmup_steps=5),
    finetune=TrainConfig(epochs=1, patience=1, batch_size=32, lr=1e-3, warmup_steps=1),
    candidates=(Candidate(3e-3, 0.1), Candidate(1e-3, 0.1)),
    trial_epochs=1,
    kd_top=20,
    prune=PruneConfig(batches=3),
    stream_points=300,
    max_events=3000,
    serve_candidates=50,
    recall_at=(20, 50, 100),
    latency_sessions=64,
    bootstrap=200,
)

STAGES = (
    "load",
    "baselines",
    "teacher",
    "distillation targets",
    "student (no distillation)",
    "student (distilled)",
    "prune + fine-tune",
    "export + quantize",
    "evaluate",
    "latency",
    "card",
)

# Shares of the time budget (streamrec.model.budget): training stages stop at their deadline; the
# others hold a share so that training leaves them their usual time.
BUDGET_SHARES = {
    "load": 0.01,
    "baselines": 0.01,
    # Most for the teacher: every student is distilled from it and must not beat it (on
    # video games, 30 min, a half share stopped it at its deadline while still improving).
    "teacher": 0.60,
    "distillation targets": 0.02,
    "student (no distillation)": 0.08,
    "student (distilled)": 0.10,
    "prune + fine-tune": 0.04,
    "export + quantize": 0.14,  # with evaluation, latency and the card
}


@dataclass(frozen=True, slots=True)
class Invocation:
    """What the run was asked for, as the card records it."""

    data: Path
    quick: bool
    seed: int
    alpha: float
    command: str
    threads: int  # torch and onnxruntime
    time_budget_s: float | None


@dataclass(frozen=True, slots=True)
class Points:
    """The split, and the points every later stage evaluates or stops training on."""

    split: Split
    protocols: dict[str, EvalSet]  # the test points, "loo" and "stream": they only report
    evaluated: dict[str, EvalSet]  # the test points and "valid", whose points choose
    early_stop: EvalSet  # validation points that decide early stopping

    @property
    def n_items(self) -> int:
        return self.split.vocab.size


@dataclass(frozen=True, slots=True)
class Baselines:
    popular: Popular
    covisit: Covisit
    variants: dict[str, Variant]  # both, ranked on every evaluated protocol


@dataclass(frozen=True, slots=True)
class Training:
    """What every training stage reads."""

    points: Points
    cfg: PipelineConfig  # fitted to the data; after the search, with its dropout and lr
    train: list[np.ndarray]  # each user's newest training items
    covisit_table: CovisitTable | None  # a hybrid's co-visitation input: the index's table
    seed: int

    def new_model(self, shape: Shape, seed: int) -> SASRec:
        """A fresh model of ``shape``: seeded, hybrid and warm-started as configured."""
        torch.manual_seed(seed)
        config = shape.config(self.points.n_items)
        model = SASRec(config)
        if config.covisit_recent:
            table = self.covisit_table
            if table is None or table.recent != config.covisit_recent:
                raise ValueError(
                    f"a hybrid needs a co-visitation table of {config.covisit_recent} items"
                )
            model.covisit_table = table
        if self.cfg.warm_start:
            with torch.no_grad():
                model.item_emb.weight.copy_(
                    covisit_embeddings(
                        self.points.split.train, config.n_items, config.d_model, seed
                    )
                )
        return model


@dataclass(frozen=True, slots=True)
class Fitted:
    model: SASRec
    report: FitReport  # how its training went and why it stopped


@dataclass(frozen=True, slots=True)
class Trained:
    """The four trained models, the teacher's search and what pruning removed."""

    teacher: Fitted
    student_nokd: Fitted  # trained on the data alone
    student: Fitted  # the same initialisation, distilled from the teacher too
    pruned: Fitted  # the distilled student, pruned and fine-tuned
    search: SearchResult
    pruning: dict[str, int | float]  # ``streamrec.model.prune.describe``

    def by_variant(self) -> dict[str, tuple[Fitted, str]]:
        """Each model by its variant name, with its parent (the row it is compared with)."""
        return {
            "teacher": (self.teacher, "covisit"),
            "student_nokd": (self.student_nokd, "teacher"),
            "student": (self.student, "student_nokd"),
            "student_pruned": (self.pruned, "student"),
        }


@dataclass(frozen=True, slots=True)
class Exported:
    variants: dict[str, Variant]  # every model and int8 student, its ONNX file in the work dir
    index: CandidateIndex  # built on the distilled student's item embeddings


@dataclass(frozen=True, slots=True)
class Choice:
    """The card's rows, the variant ``f`` serves and the int8 student shipped beside it."""

    rows: list[VariantRow]
    chosen: str
    int8: str
    targets: list[Target]


def run(
    data: Path,
    out: Path,
    quick: bool = False,
    alpha: float = 0.5,
    seed: int = 0,
    command: str = "streamrec train",
    settings: Settings | None = None,
    time_budget_s: float | None = None,
    threads: int | None = None,
) -> Card:
    """Train, compress, evaluate and write the artifacts to ``out``; return the card.

    ``time_budget_s``: the whole run's wall-clock budget (``None``: validation alone
    ends training); ``threads``: torch and onnxruntime threads [default: the setting].
    A training stage asks the budget for its deadline when its training starts.
    """
    settings = settings or Settings()
    cfg = QUICK if quick else FULL
    threads = threads or settings.train_threads
    asked = Invocation(data, quick, seed, alpha, command, threads, time_budget_s)
    torch.set_num_threads(threads)
    budget = Budget(time_budget_s, BUDGET_SHARES)
    progress = Progress(budget)
    stage = progress.stage

    stage("load")
    points = load_points(data, cfg, seed)
    stage("baselines")
    baselines = fit_baselines(points)
    stage("teacher")
    t, found = train_teacher(points, cfg, seed, partial(budget.deadline, "teacher"))
    stage("distillation targets")
    targets = teacher_targets(found.model, t.train, t.cfg.kd_top, t.cfg.kd_temperature)
    stage("student (no distillation)")
    init = t.new_model(t.cfg.student, seed + 1)
    until = partial(budget.deadline, "student (no distillation)")
    nokd = train_student(init, t, "student_nokd", None, until)
    stage("student (distilled)")
    until = partial(budget.deadline, "student (distilled)")
    student = train_student(init, t, "student", targets, until)
    stage("prune + fine-tune")
    until = partial(budget.deadline, "prune + fine-tune")
    pruned, pruning = prune_student(student.model, t, targets, until)
    trained = Trained(Fitted(found.model, found.final), nokd, student, pruned, found, pruning)

    stage("export + quantize")
    work = Path(tempfile.mkdtemp(prefix="streamrec-train-"))
    try:
        exported = export_variants(trained, t, work)
        variants, index = {**baselines.variants, **exported.variants}, exported.index
        stage("evaluate")
        evaluate_variants(variants, index, points, threads)
        recall, served = candidate_recall(
            index, points.protocols, t.cfg.recall_at, t.cfg.serve_candidates
        )
        stage("latency")
        index_ms = measure_latency(
            variants, baselines, index, points, t.cfg, settings.session_length
        )
        stage("card")
        choice = choose_variant(variants, points, t.cfg, alpha)
        end = end_metric(variants[choice.chosen], index, points, served, t.cfg, threads)
        ship(out, work, choice, points.split, index)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    candidates = Candidates(recall, *index_ms, end_metric=end)
    card = assemble_card(asked, t, trained, choice, candidates, progress.close())
    model_card.write(out, card)
    # Last: a flow watching ``out`` refuses it until every file is written and sealed.
    seal(out)
    return card


def load_points(data: Path, cfg: PipelineConfig, seed: int) -> Points:
    """The events split (leave-one-out and streaming), and the points drawn from it."""
    events = load_events(data)
    if cfg.max_events is not None:
        events = first_users(events, cfg.max_events)
    split = split_events(events, cfg.stream_fraction)
    rng = np.random.default_rng(seed)
    stream_pick = np.sort(
        rng.choice(
            len(split.stream_test), min(cfg.stream_points, len(split.stream_test)), replace=False
        )
    )
    # Scoring the whole catalogue through every variant grows with users × items: a large
    # dataset's leave-one-out points are a fixed random subset of users (the same for both).
    loo_pick = np.sort(
        rng.choice(len(split.loo_test), min(cfg.loo_points, len(split.loo_test)), replace=False)
    )
    protocols = {
        "loo": split.loo_test.subset(loo_pick),
        "stream": split.stream_test.subset(stream_pick),
    }
    # Validation points choose the served variant; the test points only report on it.
    evaluated = {**protocols, "valid": split.loo_valid.subset(loo_pick)}
    early_stop = split.loo_valid.subset(
        np.sort(
            rng.choice(
                len(split.loo_valid),
                min(cfg.early_stop_points, len(split.loo_valid)),
                replace=False,
            )
        )
    )
    tqdm.write(f"data: {split.summary()}")
    return Points(split, protocols, evaluated, early_stop)


def fit_baselines(points: Points) -> Baselines:
    """Most-popular and co-visitation, ranked on every evaluated protocol."""
    split, n_items = points.split, points.n_items
    popular, covisit = Popular(split.train, n_items), Covisit(split.train, n_items)
    variants: dict[str, Variant] = {}
    for name, base, size in (
        ("popular", popular, popular.counts.size),
        ("covisit", covisit, covisit.neighbour.size * 2 + covisit.indptr.size),
    ):
        v = Variant(name, "popular" if name == "covisit" else None, int(size), int(size) * 4)
        for proto, evaluated in points.evaluated.items():
            v.ranks[proto] = rank_targets(base.score_all, evaluated)
        variants[name] = v
    return Baselines(popular, covisit, variants)


def train_teacher(
    points: Points, cfg: PipelineConfig, seed: int, deadline: Callable[[], float | None]
) -> tuple[Training, SearchResult]:
    """The configs fitted to the data, and the teacher the search on validation found.

    ``deadline`` is asked for once the search starts (the budget shares out the time
    left then); the returned config holds the winning trial's dropout and lr.
    """
    train = [seq[-cfg.train_history :] for seq in points.split.train]
    fitted = for_data(cfg, train, points.n_items, seed)
    # The table the candidate index will serve (built from the same sequences, same width).
    hybrid = fitted.teacher.covisit_recent or fitted.student.covisit_recent
    table = (
        CovisitTable.build(points.split.train, points.n_items, COVISIT_RECENT) if hybrid else None
    )
    t = Training(points, fitted, train, table, seed)
    found = search(
        lambda dropout: t.new_model(replace(fitted.teacher, dropout=dropout), seed),
        train,
        points.early_stop,
        fitted.teacher_train,
        fitted.candidates,
        fitted.trial_epochs,
        seed,
        "teacher",
        deadline(),
        fitted.search_share,
    )
    won = replace(
        fitted,
        teacher=replace(fitted.teacher, dropout=found.winner.dropout),
        teacher_train=replace(fitted.teacher_train, lr=found.winner.lr),
    )
    return replace(t, cfg=won), found


def train_student(
    init: SASRec,
    t: Training,
    name: str,
    targets: TeacherTargets | None,
    deadline: Callable[[], float | None],
) -> Fitted:
    """A copy of ``init`` trained on the data, and distilled from ``targets`` when given."""
    model = _copy(init)
    train_cfg = t.cfg.student_train if targets is None else t.cfg.distilled(t.cfg.student_train)
    report = fit(
        model,
        t.train,
        t.points.early_stop,
        train_cfg,
        t.seed + 1,
        name,
        teacher=targets,
        deadline=deadline(),
    )
    return Fitted(model, report)


def prune_student(
    student: SASRec,
    t: Training,
    targets: TeacherTargets,
    deadline: Callable[[], float | None],
) -> tuple[Fitted, dict[str, int | float]]:
    """The distilled student structurally pruned, then fine-tuned (distilled too);
    what pruning removed.  The deadline covers pruning and fine-tuning both."""
    until = deadline()
    kd = t.cfg.distilled(t.cfg.student_train)
    rng = np.random.default_rng(t.seed + 3)
    sample = batches(
        t.train,
        training_windows(t.train, student.cfg.max_len, rng),
        kd.batch_size,
        rng,
        targets.offsets,
    )[: t.cfg.prune.batches]
    torch.manual_seed(t.seed + 3)
    pruned = prune(student, importance(student, sample, kd, targets), t.cfg.prune)
    pruning = describe(student, pruned)
    report = fit(
        pruned,
        t.train,
        t.points.early_stop,
        t.cfg.distilled(t.cfg.finetune),
        t.seed + 2,
        "student_pruned",
        teacher=targets,
        deadline=until,
    )
    return Fitted(pruned, report), pruning


def export_variants(trained: Trained, t: Training, work: Path) -> Exported:
    """Every model exported to ONNX in ``work``, the candidate index, and the students
    quantized to int8 (dynamic and static) on validation sessions."""
    split = t.points.split
    variants: dict[str, Variant] = {}
    for name, (fitted, parent) in trained.by_variant().items():
        path = work / f"{name}.onnx"
        parity = export_onnx(fitted.model, path, name)
        size = path.stat().st_size
        variants[name] = Variant(name, parent, fitted.model.n_params(), size, path, parity=parity)
    index = CandidateIndex.build(
        split.train, t.points.n_items, trained.student.model.item_emb.weight.detach().numpy().copy()
    )
    calib = split.loo_valid.subset(np.arange(min(256, len(split.loo_valid))))
    calib_cands = index.candidates(calib.histories, t.cfg.serve_candidates)
    for source, fitted in (("student", trained.student), ("student_pruned", trained.pruned)):
        # Validation sessions: static calibration and the dynamic sensitivity check.
        feeds = calibration_feeds(
            calib.histories,
            calib_cands,
            fitted.model.cfg.max_len,
            covisit=index,
            covisit_recent=fitted.model.cfg.covisit_recent,
        )
        for int8 in _quantized(variants[source], feeds, work):
            variants[int8.name] = int8
    return Exported(variants, index)


def _quantized(src: Variant, feeds: list[dict[str, np.ndarray]], work: Path) -> list[Variant]:
    """``src`` quantized to int8, dynamic then static, its files in ``work``."""
    assert src.onnx is not None
    out = []
    for mode in ("dynamic", "static"):
        name = f"{src.name}_int8_{mode}"
        path = work / f"{name}.onnx"
        kept_fp32: list[str] = []
        if mode == "dynamic":
            kept_fp32 = quantize_dynamic_int8(src.onnx, path, feeds)
        else:
            quantize_static_int8(src.onnx, path, feeds)
        size = path.stat().st_size
        out.append(
            Variant(
                name, src.name, src.params, size, path, source=src.name, int8_fp32_matmuls=kept_fp32
            )
        )
    return out


def evaluate_variants(
    variants: dict[str, Variant], index: CandidateIndex, points: Points, threads: int
) -> None:
    """Every ONNX variant ranked on every evaluated protocol through onnxruntime, as
    served; the leave-one-out scores kept for the int8 agreement checks."""
    for v in tqdm([v for v in variants.values() if v.onnx], desc="evaluate", leave=False):
        assert v.onnx is not None
        scorer = OnnxScorer(v.onnx, threads=threads, covisit=index)
        for proto, evaluated in points.evaluated.items():
            keep: list[np.ndarray] | None = [] if proto == "loo" else None
            v.ranks[proto] = rank_targets(onnx_score_all(scorer, points.n_items), evaluated, keep)
            if keep is not None:
                v.scores_loo = np.concatenate(keep)


def measure_latency(
    variants: dict[str, Variant],
    baselines: Baselines,
    index: CandidateIndex,
    points: Points,
    cfg: PipelineConfig,
    session_length: int,
) -> tuple[float, float]:
    """Every variant's scoring latency (set on it) on real streaming sessions, and the
    candidate index's ms per event at batch 1 and 32."""
    stream = points.protocols["stream"]
    sessions = [
        h if len(h) else np.array([1])
        for h in stream.subset(np.arange(min(cfg.latency_sessions, len(stream)))).histories
    ]
    cands = index.candidates(sessions, cfg.serve_candidates)
    width = min(len(c) for c in cands)
    cands = [c[:width] for c in cands]
    measured = scoring_latency(
        list(variants.values()),
        index,
        baselines.popular,
        baselines.covisit,
        sessions,
        cands,
        session_length,
    )
    for v in variants.values():
        v.latency = measured[v.name]
    b1 = median_ms_per_event(
        [partial(index.candidates, [h], cfg.serve_candidates) for h in sessions], 1
    )
    b32 = median_ms_per_event(
        [
            partial(index.candidates, sessions[lo : lo + 32], cfg.serve_candidates)
            for lo in range(0, len(sessions) - 31, 32)
        ],
        32,
    )
    return b1, b32


def choose_variant(
    variants: dict[str, Variant], points: Points, cfg: PipelineConfig, alpha: float
) -> Choice:
    """The rows, the variant ``f`` chooses, the int8 student and the targets checked."""
    rows = variant_rows(variants, points.protocols, cfg.bootstrap)
    chosen = model_card.choose(rows, alpha)
    return Choice(rows, chosen, int8_student(rows, chosen).name, check_targets(rows, chosen))


def end_metric(
    chosen: Variant,
    index: CandidateIndex,
    points: Points,
    served: dict[str, list[np.ndarray]],
    cfg: PipelineConfig,
    threads: int,
) -> EndMetric:
    """The chosen variant's NDCG@10 scoring only its served candidates, and the catalogue."""
    assert chosen.onnx is not None, f"{chosen.name} cannot be served"
    scorer = OnnxScorer(chosen.onnx, threads=threads, covisit=index)
    ndcg: dict[str, tuple[float, float]] = {}
    for proto, evaluated in points.protocols.items():
        score = onnx_score_candidates(scorer, points.n_items, served[proto])
        ranks = rank_targets(score, evaluated)
        ndcg[proto] = float(ndcg_at(ranks, K).mean()), float(ndcg_at(chosen.ranks[proto], K).mean())
    return EndMetric(cfg.serve_candidates, *ndcg["loo"], *ndcg["stream"])


def ship(out: Path, work: Path, choice: Choice, split: Split, index: CandidateIndex) -> None:
    """Copy what the flow and the benchmark need: the chosen model, the teacher, the best
    int8 student (what the benchmark compares with the teacher), vocab and index; the
    rows of the models not shipped lose their file (and a stale copy in ``out`` goes)."""
    out.mkdir(parents=True, exist_ok=True)
    keep = {choice.chosen, "teacher", choice.int8}
    for row in choice.rows:
        if row.name in keep and row.onnx:
            shutil.copyfile(work / row.onnx, out / row.onnx)
        else:
            stale = out / f"{row.name}.onnx"
            stale.unlink(missing_ok=True)
            row.onnx = None
    split.vocab.save(out / VOCAB_FILE)
    index.save(out / INDEX_FILE)


def assemble_card(
    asked: Invocation,
    t: Training,
    trained: Trained,
    choice: Choice,
    candidates: Candidates,
    timings_s: dict[str, float],
) -> Card:
    """The card, from the run's parts; ``timings_s``: each stage's seconds and the total."""
    cfg, split, budget_s = t.cfg, t.points.split, asked.time_budget_s
    return Card(
        dataset=Dataset(asked.data.name, str(asked.data), split.summary()),
        quick=asked.quick,
        seed=asked.seed,
        alpha=asked.alpha,
        chosen=choice.chosen,
        variants=choice.rows,
        protocols=_protocols(t.points, cfg),
        candidates=candidates,
        training={name: f.report.summary() for name, (f, _) in trained.by_variant().items()},
        pruning=trained.pruning,
        config=cfg.card_config(),
        environment=Environment(
            torch=torch.__version__,
            onnxruntime=ort.__version__,
            python=platform.python_version(),
            cpu=platform.processor() or platform.machine(),
        ),
        command=asked.command,
        int8=choice.int8,
        targets=choice.targets,
        notes=_notes(split, cfg),
        search=trained.search.record(),
        budget=BudgetUse(
            minutes=None if budget_s is None else round(budget_s / 60, 2),
            threads=asked.threads,
            early_stop_points=len(t.points.early_stop),
            used_fraction=None if budget_s is None else round(timings_s["total"] / budget_s, 3),
        ),
        timings_s=timings_s,
    )


def _protocols(points: Points, cfg: PipelineConfig) -> dict[str, Protocol]:
    loo, stream, split = points.protocols["loo"], points.protocols["stream"], points.split
    return {
        "loo": Protocol(
            len(loo),
            len(split.loo_test),
            "each user's last interaction"
            + ("" if len(loo) == len(split.loo_test) else " (a fixed random subset of the users)"),
        ),
        "stream": Protocol(
            len(stream),
            len(split.stream_test),
            "every event of the final stretch of time, from the session as it stood (a fixed "
            "random subset of them)",
            fraction=cfg.stream_fraction,
        ),
    }


def first_users(events: Sequence[Any], max_events: int) -> list[Any]:
    """The events of the first users (by first appearance) that fit in ``max_events``."""
    per_user = Counter(e.user_id for e in events)
    kept: set[str] = set()
    total = 0
    for e in events:
        if e.user_id not in kept and total + per_user[e.user_id] <= max_events:
            kept.add(e.user_id)
            total += per_user[e.user_id]
    return [e for e in events if e.user_id in kept]


def _notes(split: Split, cfg: PipelineConfig) -> list[str]:
    """What the numbers mean and how they were measured: the card's notes."""
    s = split.summary()
    return [
        f"Training uses each user's interactions that are neither among their last two nor in "
        f"the final stretch of time ({s['train_interactions']} of the dataset's interactions), so "
        "neither protocol's test points are ever trained on.",
        f"The vocabulary holds the {s['items']} items seen in training; "
        f"{s['stream_cold_targets']} streaming targets are items first seen later (cold): "
        "a miss for every variant.",
        "Every model row is evaluated through onnxruntime, as served; latency is the median "
        f"per-event CPU time of the scoring call alone, {cfg.serve_candidates} candidates "
        "(co-visitation, embedding neighbours, popular), one intra-op thread, no spinning, "
        "on real streaming sessions; the variants take turns of 16 calls in shuffled order, "
        "so other load hits all alike.",
        "Exported with torch's TorchScript-based exporter (dynamo=False): it exports in under a "
        "second (the dynamo exporter took 6-17 s per model here) and, after onnxruntime's graph "
        "optimizations, both graphs score equally fast; every export is checked against torch.",
        f"The CPU here: {describe_int8_support() or 'unknown'}; what int8 gains on matrices "
        "this small depends on it, so the latency columns are measured, not assumed.  int8 "
        "covers the transformer's weight MatMuls; the embedding lookups and the final scoring "
        "product stay fp32 (one int8 scale per embedding table reordered the full-catalogue "
        "ranking).  Weights are 7-bit per output channel: full 8-bit weights saturate the "
        "int16 sums of the kernel CPUs without VNNI use; dynamic int8 keeps in fp32 at most "
        "two MatMuls whose quantization alone moves the validation scores 3x more than the "
        "median one.",
        "Item embeddings of every model start from the truncated SVD of the co-visitation PPMI "
        "matrix; with the full softmax, training keeps items already in the prefix out of it "
        "(serving never recommends them); models train on each user's newest "
        f"{cfg.train_history} training interactions.",
        "f is computed for every row, but only ONNX variants can be served; the baselines' f "
        "is shown for comparison.",
        *([_hybrid_note(cfg)] if cfg.teacher.covisit_recent or cfg.student.covisit_recent else []),
    ]


def _hybrid_note(cfg: PipelineConfig) -> str:
    who = (
        "The teacher and the students are hybrids"
        if cfg.student.covisit_recent
        else "The teacher is a hybrid (the students, plain SASRecs, learn its ranking by "
        "distillation)"
    )
    return (
        f"{who}: each score adds a learnt gate (from the session's hidden state) times "
        "log(1 + the item's co-visitation sum after the session's newest "
        f"{COVISIT_RECENT} items), read from the candidate index's neighbour table, in "
        "training as in serving (where the flow's online counts keep it current)."
    )


class Progress:
    """One progress bar over the stages, how long each took, and the budget's time left
    (refreshed every second by a daemon thread, since a stage may run for minutes)."""

    def __init__(self, budget: Budget | None = None) -> None:
        self.bar = tqdm(total=len(STAGES), desc="streamrec train", unit="stage")
        self.budget = budget
        self.started = self.stage_started = time.time()
        self.timings: dict[str, float] = {}
        self.current: str | None = None
        self._closed = threading.Event()
        if budget is not None and budget.seconds is not None:
            threading.Thread(target=self._tick, daemon=True).start()

    def _tick(self) -> None:
        while not self._closed.wait(1.0):
            self._show_left()

    def _show_left(self) -> None:
        if self.budget is not None and self.budget.seconds is not None:
            self.bar.set_postfix_str(f"{clock_text(self.budget.left())} left of the budget")

    def stage(self, name: str) -> None:
        assert name in STAGES, name
        self._finish_current()
        self.current = name
        self.bar.set_description(f"streamrec train: {name}")
        self._show_left()

    def close(self) -> dict[str, float]:
        self._closed.set()
        self._finish_current()
        self.bar.close()
        return {**self.timings, "total": round(time.time() - self.started, 1)}

    def _finish_current(self) -> None:
        now = time.time()
        if self.current is not None:
            self.timings[self.current] = round(now - self.stage_started, 1)
            self.bar.update(1)
        self.stage_started = now


def for_data(
    cfg: PipelineConfig, train: Sequence[np.ndarray], n_items: int, seed: int
) -> PipelineConfig:
    """The configs made to fit the data: loss by catalogue size, batch size and the
    teacher's depth by the number of training windows."""
    loss = loss_for(n_items, cfg.softmax_max_items)
    rng = np.random.default_rng(seed)

    def fitted(train_cfg: TrainConfig, max_len: int) -> TrainConfig:
        windows = len(training_windows(train, max_len, rng))
        return replace(
            train_cfg,
            loss=loss,
            batch_size=batch_size_for(windows, cfg.steps_per_epoch, train_cfg.batch_size),
        )

    teacher_windows = len(training_windows(train, cfg.teacher.max_len, rng))
    blocks = teacher_blocks(teacher_windows, cfg.teacher.n_blocks, cfg.teacher_windows_per_block)
    return replace(
        cfg,
        teacher=replace(cfg.teacher, n_blocks=blocks),
        teacher_train=fitted(cfg.teacher_train, cfg.teacher.max_len),
        student_train=fitted(cfg.student_train, cfg.student.max_len),
        finetune=fitted(cfg.finetune, cfg.student.max_len),
    )


def teacher_blocks(windows: int, base: int, windows_per_block: int, most: int = 3) -> int:
    """``base`` blocks, and one more per doubling of the training windows beyond
    ``windows_per_block`` (at most ``most`` more): more data holds a deeper teacher, and
    its students, distilled with the same co-visitation input, must stay below it.

    >>> [teacher_blocks(windows, 3, 8192) for windows in (905, 31_435, 10**7)]
    [3, 5, 6]
    """
    if windows <= windows_per_block:
        return base
    return base + min(most, round(float(np.log2(windows / windows_per_block))))


def loss_for(n_items: int, softmax_max_items: int) -> str:
    """Full softmax while the catalogue is small enough to score whole every step."""
    return "softmax" if n_items <= softmax_max_items else "sampled"


def batch_size_for(windows: int, steps_per_epoch: int, largest: int) -> int:
    """The power of two nearest ``windows / steps_per_epoch``, within [16, ``largest``].

    >>> batch_size_for(1000, 50, 128), batch_size_for(31000, 50, 128), batch_size_for(10, 50, 8)
    (16, 128, 8)
    """
    wanted = max(windows / max(steps_per_epoch, 1), 1.0)
    size = 2 ** round(np.log2(wanted))
    return int(min(largest, max(16, size)))


def _copy(model: SASRec) -> SASRec:
    clone = SASRec(model.cfg)
    clone.load_state_dict(model.state_dict())
    clone.covisit_table = model.covisit_table
    return clone
