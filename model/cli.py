"""`streamrec train` and `streamrec model`: the front doors of ``streamrec.model.pipeline``
and of the artifacts' manifest (``streamrec.model.manifest``).

torch is imported only when training runs: the runtime install (the flow)
has no torch, and ``streamrec --help`` and ``streamrec model seal`` must work there too.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import click

from streamrec.settings import Settings


@click.command(name="train")
@click.option(
    "--data",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Interaction dataset: a MovieLens directory (ratings.csv), a .jsonl of events, or a "
    "'user item' .txt file (or a directory holding one, e.g. ../shared/data/amazon-video-games). "
    "[default: STREAMREC_DATA_DIR, data/ml-latest-small]",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the artifacts go: ONNX models, vocab.json, candidates.npz, card.json, card.md, "
    "frontier.png, and manifest.json (their sha256 digests, which the flow checks). "
    "[default: STREAMREC_MODEL_DIR, model/artifacts]",
)
@click.option(
    "--quick",
    is_flag=True,
    help="Tiny models on the first users' events, in seconds: checks the pipeline end to end, "
    "not the model's quality.",
)
@click.option(
    "--alpha",
    type=click.FloatRange(0.0, 1.0),
    default=0.5,
    show_default=True,
    help="Weight of latency against quality when choosing the served variant: "
    "f = α·T + (1−α)·(1−quality), both relative to the teacher.",
)
@click.option(
    "--time-budget",
    "time_budget",
    type=click.FloatRange(min=0.0, min_open=True),
    default=None,
    metavar="MINUTES",
    help="Wall-clock budget of the whole run: each stage gets a share of the time left, "
    "training stops at its share's end (the search and the epochs are cut to fit), and the "
    "progress bar shows the time left. [default: none; validation alone ends training]",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="torch and onnxruntime threads. [default: STREAMREC_TRAIN_THREADS where set to other "
    "than its default, else the cores this process may use]",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every random draw.")
def train_command(
    data: Path | None,
    out: Path | None,
    quick: bool,
    alpha: float,
    time_budget: float | None,
    threads: int | None,
    seed: int,
) -> None:
    """Train the teacher, distil, prune and quantize students, evaluate all, write the card.

    Runs the whole model pipeline on CPU with a progress bar: baselines
    (most-popular, co-visitation), a large SASRec teacher, a small student with
    and without distillation, a structurally pruned student, ONNX fp32 and int8
    (dynamic, static) exports, full-ranking NDCG@10/HR@10 under leave-one-out and
    streaming protocols with bootstrap intervals, scoring latency, candidate
    recall, and the variant served by the flow chosen by f.  Without --time-budget,
    validation decides when each model stops training; --quick takes about
    half a minute.

    \b
    Example:
      streamrec train --quick --out /tmp/model
      streamrec train --data ../shared/data/amazon-video-games --time-budget 30 --out /tmp/vg
    """
    try:
        from streamrec.model import pipeline
    except ImportError as err:  # the runtime install has no torch
        raise click.ClickException(
            f"training needs the train extra ({err.name} is missing): pip install -e '.[train]'"
        ) from None
    settings = Settings.from_env()
    if threads is None:
        # The setting's default (2) predates sizing by the machine: only an override wins.
        changed = settings.train_threads != Settings().train_threads
        threads = settings.train_threads if changed else machine_threads()
    given = [("--data", data), ("--out", out), ("--time-budget", time_budget)]
    command = shlex.join(
        ["streamrec", "train", *(["--quick"] if quick else [])]
        + [f"{flag}={value}" for flag, value in given if value is not None]
        + [f"--alpha={alpha}", f"--threads={threads}", f"--seed={seed}"]
    )
    data = data or settings.data_dir
    out = out or settings.model_dir
    card = pipeline.run(
        data,
        out,
        quick=quick,
        alpha=alpha,
        seed=seed,
        command=command,
        settings=settings,
        time_budget_s=None if time_budget is None else time_budget * 60.0,
        threads=threads,
    )
    click.echo(f"chosen: {card.chosen} → {out}")
    for target in card.targets:
        click.echo(f"  {'met   ' if target.met else 'MISSED'} {target.target}: {target.detail}")
    click.echo(f"card: {out / 'card.md'}")


@click.group("model")
def model_group() -> None:
    """Seal or verify a model directory: the sha256 digests the flow checks at load.

    `streamrec train` seals what it writes (manifest.json).  The flow serves a
    model directory only if every file it reads (card.json, vocab.json,
    candidates.npz, each ONNX file the card names) is listed there, matches its
    digest, and stays inside the directory; otherwise it stops at start (exit 78)
    or, at a roll-out, refuses the new version and keeps serving the old one.
    """


@model_group.command("seal")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
def seal_command(directory: Path) -> None:
    """Write DIRECTORY/manifest.json from the files as they are now.

    Needed only after changing artifacts by hand (an edited card.json, a
    replaced ONNX file or vocabulary): check them first, since sealing
    vouches for them.  A card naming a file outside DIRECTORY (an absolute
    path, '..', a symlink pointing out) is refused: copy the file in.

    \b
    Example:
      streamrec model seal model/v2 && ln -sfn v2 model/current
    """
    from streamrec.model.manifest import ManifestError, seal

    try:
        manifest = seal(directory)
    except (ManifestError, OSError) as err:
        raise click.ClickException(f"cannot seal {directory}: {err}") from None
    for name, digest in sorted(manifest.digests.items()):
        click.echo(f"  {digest[:16]}  {name}")
    click.echo(f"sealed {len(manifest.digests)} files in {directory}/manifest.json")


@model_group.command("verify")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
def verify_command(directory: Path) -> None:
    """Check DIRECTORY against its manifest, as the flow will.

    Exits 1 naming the first file that differs, is not listed, or leads outside
    DIRECTORY; use it before repointing a served symlink at a copied model.
    """
    from streamrec.model.manifest import ManifestError, verify

    try:
        manifest = verify(directory)
    except (ManifestError, OSError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"{directory}: {len(manifest.digests)} files match their manifest")


def machine_threads() -> int:
    """The cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
