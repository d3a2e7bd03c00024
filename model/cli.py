"""`streamrec train`: the command-line front door of ``model.pipeline``.

torch is imported only when the command runs: the runtime install (the flow)
has no torch, and ``streamrec --help`` must work there too.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from streamrec.settings import Settings


@click.command(name="train")
@click.option(
    "--data",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Interaction dataset: a MovieLens directory (ratings.csv) or a .jsonl of events. "
    "[default: STREAMREC_DATA_DIR, data/ml-latest-small]",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the artifacts go: ONNX models, vocab.json, candidates.npz, card.json, card.md, "
    "frontier.png. [default: STREAMREC_MODEL_DIR, model/artifacts]",
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
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every random draw.")
def train_command(
    data: Path | None, out: Path | None, quick: bool, alpha: float, seed: int
) -> None:
    """Train the teacher, distil, prune and quantize students, evaluate all, write the card.

    Runs the whole model pipeline on CPU with a progress bar: baselines
    (most-popular, co-visitation), a large SASRec teacher, a small student with
    and without distillation, a structurally pruned student, ONNX fp32 and int8
    (dynamic, static) exports, full-ranking NDCG@10/HR@10 under leave-one-out and
    streaming protocols with bootstrap intervals, scoring latency, candidate
    recall, and the variant served by the flow chosen by f.  The full run takes
    7 to 20 minutes on two cores (more while they are shared); --quick about
    half a minute.

    \b
    Example:
      streamrec train --quick --out /tmp/model
    """
    try:
        from model import pipeline
    except ImportError as err:  # the runtime install has no torch
        raise click.ClickException(
            f"training needs the train extra ({err.name} is missing): pip install -e '.[train]'"
        ) from None
    settings = Settings.from_env()
    given = [("--data", data), ("--out", out)]
    command = shlex.join(
        ["streamrec", "train", *(["--quick"] if quick else [])]
        + [f"{flag}={value}" for flag, value in given if value is not None]
        + [f"--alpha={alpha}", f"--seed={seed}"]
    )
    data = data or settings.data_dir
    out = out or settings.model_dir
    card = pipeline.run(
        data, out, quick=quick, alpha=alpha, seed=seed, command=command, settings=settings
    )
    click.echo(f"chosen: {card['chosen']} → {out}")
    for target in card["targets"]:
        click.echo(
            f"  {'met   ' if target['met'] else 'MISSED'} {target['target']}: {target['detail']}"
        )
    click.echo(f"card: {out / 'card.md'}")
