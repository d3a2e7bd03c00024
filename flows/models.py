"""The models a flow serves: variants split by user, and new artifacts taken without a restart.

``--variant student_pruned_int8_dynamic=90,teacher=10`` serves two variants at once;
each user is given one by a hash of their id (stable across restarts,
processes and model versions), so a user's recommendations never flip between
variants.  Each recommendation's ``model`` field names the variant and the
version that answered it, which ``streamrec latency`` breaks down.

Roll-out: a ``ModelWatcher`` looks at the model directory every few seconds
(``STREAMREC_MODEL_CHECK_S``).  When what it resolves to has changed (a
symlink repointed at a newly trained directory, or files replaced), it loads
and checks the new artifacts in the background while the old ones serve;
each worker takes them between two micro-batches.  Artifacts that cannot be
served, or do not match their manifest (``streamrec.model.manifest``), are
refused with one log line and counted by reason
(``streamrec_model_refused_total``), and the old version goes on.

>>> parse_variants("student_pruned_int8_dynamic=90,teacher=10")
[('student_pruned_int8_dynamic', 90), ('teacher', 10)]
>>> parse_variants(None)
[(None, 100)]
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from bisect import bisect_right
from itertools import accumulate
from pathlib import Path
from typing import Final
from zlib import crc32

from streamrec.flows import metrics
from streamrec.lru import MB
from streamrec.model.manifest import ManifestError
from streamrec.model.serving import Recommender
from streamrec.settings import Settings

log = logging.getLogger(__name__)

# Fingerprint of a model directory: where it resolves to, and each file's name, size and mtime.
Fingerprint = tuple[str, tuple[tuple[str, int, int], ...]]
# One variant of a split: its name (None: the card's chosen one) and its weight.
Share = tuple[str | None, int]

SMOKE_TOP_K: Final = 3


class VariantSpecError(ValueError):
    """A ``--variant`` split that cannot be served as written."""


def parse_variants(text: str | None) -> list[Share]:
    """``name`` or ``name=weight,name=weight,...`` as (name, weight) pairs; None: the card's."""
    if text is None or not text.strip():
        return [(None, 100)]
    shares: list[Share] = []
    weighted = []
    for part in text.split(","):
        name, sep, weight = part.strip().partition("=")
        name = name.strip()
        if not name:
            raise VariantSpecError(f"--variant {text!r}: an empty variant name")
        try:
            share = int(weight) if sep else 100
        except ValueError:
            raise VariantSpecError(
                f"--variant {text!r}: the weight of {name!r} must be a whole number, got {weight!r}"
            ) from None
        if share <= 0:
            raise VariantSpecError(f"--variant {text!r}: the weight of {name!r} must be positive")
        if any(name == other for other, _ in shares):
            raise VariantSpecError(f"--variant {text!r}: {name!r} is named twice")
        shares.append((name, share))
        weighted.append(bool(sep))
    if len(shares) > 1 and not all(weighted):
        raise VariantSpecError(f"--variant {text!r}: give every variant of a split its weight")
    return shares


class ModelSet:
    """One worker's models: a ``Recommender`` per variant and the split between them."""

    def __init__(self, recommenders: list[Recommender], weights: list[int]) -> None:
        self.recommenders = recommenders
        self._bounds = list(accumulate(weights))
        self._total = self._bounds[-1]

    @property
    def versions(self) -> list[str]:
        return [r.version for r in self.recommenders]

    def pick(self, user_id: str) -> int:
        """The index of ``user_id``'s variant: the same on every process and every run."""
        return bisect_right(self._bounds, crc32(user_id.encode()) % self._total)


def load_model_set(model_dir: Path, shares: list[Share], settings: Settings) -> ModelSet:
    """Load and check every variant of ``shares``; raises whatever makes one unservable."""
    recommenders = []
    for name, _ in shares:
        recommender = Recommender.load(
            model_dir,
            variant=name,
            threads=settings.scoring_threads,
            candidates=settings.candidates,
            half_life=settings.online_half_life_events,
            user_cap=settings.online_user_cap,
            exclusion_cache_bytes=round(settings.exclusion_cache_mb * MB),
        )
        _smoke_test(recommender)
        recommenders.append(recommender)
    return ModelSet(recommenders, [weight for _, weight in shares])


def _smoke_test(recommender: Recommender) -> None:
    # The last item's code is the largest: a vocabulary that the model's embedding does not
    # cover fails here, at load, rather than on a live event.
    items = recommender.vocab.items
    if not items:
        raise ValueError("the vocabulary is empty")
    ranked = recommender.recommend([[items[0], items[-1]]], SMOKE_TOP_K)
    if len(ranked) != 1 or not ranked[0]:
        raise ValueError("scoring a two-item session gave no recommendation")


def fingerprint(model_dir: Path) -> Fingerprint:
    """What ``model_dir`` resolves to and each file's name, size and modification time."""
    real = os.path.realpath(model_dir)
    files = []
    with os.scandir(real) as entries:
        for entry in entries:
            if entry.is_file():
                stat = entry.stat()
                files.append((entry.name, stat.st_size, stat.st_mtime_ns))
    return real, tuple(sorted(files))


class ModelWatcher:
    """Watches the model directory; new artifacts are loaded here and taken by each worker.

    ``generation`` counts the model sets published; a worker whose generation is
    older takes one with ``take`` at its next micro-batch.  One thread per process.
    """

    def __init__(
        self,
        settings: Settings,
        shares: list[Share],
        serving: ModelSet,
        workers: int,
    ) -> None:
        self.generation = 0
        self._settings = settings
        self._shares = shares
        self._workers = workers
        self._versions = serving.versions
        _say_serving([], self._versions)
        self._failure: str | None = None  # the last unexpected failure, said once
        self._ready: list[ModelSet] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._seen = self._fingerprint()
        self._thread = threading.Thread(target=self._watch, name="model-watcher", daemon=True)

    def start(self) -> ModelWatcher:
        if self._settings.model_check_s > 0:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def take(self) -> tuple[int, ModelSet | None]:
        """The latest generation, and a model set of it for the calling worker (None: none left)."""
        with self._lock:
            return self.generation, self._ready.pop() if self._ready else None

    def check(self) -> bool:
        """Look once: True if new artifacts were loaded and published."""
        seen = self._fingerprint()
        if seen is None or seen == self._seen:
            return False
        self._seen = seen  # said once, whether taken or refused
        model_dir = self._settings.model_dir
        try:
            sets = [
                load_model_set(model_dir, self._shares, self._settings)
                for _ in range(self._workers)
            ]
        except Exception as err:  # noqa: BLE001 - whatever makes it unservable is refused
            metrics.MODELS_REFUSED.labels(refusal_reason(err)).inc()
            self._say(
                f"refused the model in {model_dir} ({_first_line(err)}); still serving "
                f"{', '.join(self._versions)}"
            )
            return False
        versions = sets[0].versions
        with self._lock:
            self._ready = sets
            self.generation += 1
        self._say(
            f"model roll-out: {', '.join(self._versions)} -> {', '.join(versions)}, "
            "taken by each worker at its next micro-batch"
        )
        _say_serving(self._versions, versions)
        self._versions = versions
        return True

    def _watch(self) -> None:
        while not self._stop.wait(self._settings.model_check_s):
            self._look()

    def _look(self) -> None:
        """``check``, surviving whatever goes wrong: a watcher that died would roll out nothing."""
        try:
            self.check()
            self._failure = None
        except Exception as err:  # noqa: BLE001 - logged, counted, and looked at again
            metrics.MODEL_WATCH_FAILURES.inc()
            self._seen = None  # what failed is looked at afresh next time
            said = _first_line(err)
            if said != self._failure:
                self._failure = said
                log.exception("looking at the model directory failed (%s); trying again", said)

    def _fingerprint(self) -> Fingerprint | None:
        try:
            return fingerprint(self._settings.model_dir)
        except OSError:
            return None  # mid-swap or gone for a moment: look again later

    def _say(self, line: str) -> None:
        log.info(line)


def _say_serving(before: list[str], now: list[str]) -> None:
    """``/metrics``: the variants and versions served now (``name@digest`` each)."""
    for version in before:
        name, _, digest = version.partition("@")
        with contextlib.suppress(KeyError):
            metrics.MODELS_SERVING.remove(name, digest)
    for version in now:
        name, _, digest = version.partition("@")
        metrics.MODELS_SERVING.labels(name, digest).set(1)


def refusal_reason(err: BaseException) -> str:
    """The ``reason`` label of a refused version: the manifest's kind of mismatch, or
    ``unservable``."""
    return err.reason if isinstance(err, ManifestError) else "unservable"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"
