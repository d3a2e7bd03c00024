"""The `streamrec` command: the user's front door to every stage.

Each stage owns its subcommands (``tools/``, ``state/``, ``model/``,
``flows/``, ``bench/``); this module only mounts them.  Each is imported by a small
function of its own, so that the wiring reads as imports while staying lazy:
``streamrec kafka up`` does not import onnxruntime and ``streamrec run`` never
imports torch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import click

from streamrec.settings import ENV_PREFIX, describe

# A command, imported when it is used.
Loader = Callable[[], click.Command]


def _kafka() -> click.Command:
    from streamrec.tools.kafka_cli import kafka_group

    return kafka_group


def _topics() -> click.Command:
    from streamrec.tools.kafka_cli import topics_group

    return topics_group


def _state() -> click.Command:
    from streamrec.state.cli import state_group

    return state_group


def _train() -> click.Command:
    from streamrec.model.cli import train_command

    return train_command


def _model() -> click.Command:
    from streamrec.model.cli import model_group

    return model_group


def _run() -> click.Command:
    from streamrec.flows.cli import run_command

    return run_command


def _replay() -> click.Command:
    from streamrec.tools.replay import replay_command

    return replay_command


def _record() -> click.Command:
    from streamrec.tools.record import record_command

    return record_command


def _latency() -> click.Command:
    from streamrec.tools.latency import latency_command

    return latency_command


def _demo() -> click.Command:
    from streamrec.tools.demo import demo_command

    return demo_command


def _bench_state() -> click.Command:
    from streamrec.bench.state import bench_state

    return bench_state


def _bench_e2e() -> click.Command:
    from streamrec.bench.e2e import bench_e2e_command

    return bench_e2e_command


def _bench_stages() -> click.Command:
    from streamrec.bench.stages import bench_stages_command

    return bench_stages_command


def _bench_restore() -> click.Command:
    from streamrec.bench.restore import bench_restore_command

    return bench_restore_command


def _bench_memory() -> click.Command:
    from streamrec.bench.memory import bench_memory_command

    return bench_memory_command


def _bench_changelog() -> click.Command:
    from streamrec.bench.changelog import bench_changelog_command

    return bench_changelog_command


def _config() -> click.Command:
    return config_command


def _bench() -> click.Command:
    return bench_group


# name -> (its loader, one line for the command list; `--help` stays import-free)
COMMANDS: dict[str, tuple[Loader, str]] = {
    "kafka": (_kafka, "Start, stop or inspect the local Kafka broker."),
    "topics": (_topics, "Create the topics streamrec uses."),
    "config": (_config, "List every setting and its variable."),
    "state": (_state, "Inspect the RocksDB session stores."),
    "train": (_train, "Train, distill, prune, quantize; write the card."),
    "model": (_model, "Seal or verify a model directory's sha256 digests."),
    "run": (_run, "Run the dataflow: events -> recommendations."),
    "replay": (_replay, "Replay recorded traffic into the events topic."),
    "record": (_record, "Capture a topic to a file for later replay."),
    "latency": (_latency, "Measure event-to-recommendation latency."),
    "bench": (_bench, "Benchmarks whose figures go into BENCHMARKS.md."),
    "demo": (_demo, "Run the whole system end to end on real data."),
}

BENCH_COMMANDS: dict[str, tuple[Loader, str]] = {
    "state": (_bench_state, "Microseconds per session update on RocksDB."),
    "e2e": (_bench_e2e, "Latency vs throughput: floor, teacher, student."),
    "stages": (_bench_stages, "Cost per event of each hot-path stage."),
    "restore": (_bench_restore, "Seconds to rebuild a shard."),
    "memory": (_bench_memory, "Flow memory over a 30-minute soak."),
    "changelog": (_bench_changelog, "Changelog bytes per event, by kind and codec."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported only when used."""

    def __init__(
        self, *args: object, lazy: dict[str, tuple[Loader, str]], **kwargs: object
    ) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(self.lazy)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.lazy:
            return None
        command = self.lazy[name][0]()
        if not isinstance(command, click.Command):
            raise TypeError(f"the {name!r} command is not a click command")
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, summary) for name, (_, summary) in sorted(self.lazy.items())]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(
    cls=LazyGroup,
    lazy=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(package_name="streamrec")
@click.option(
    "--kafka-config",
    "kafka_config",
    multiple=True,
    metavar="KEY=VALUE|FILE",
    help="A librdkafka setting for every Kafka client (repeatable), or a properties file of "
    "them, e.g. --kafka-config security.protocol=SASL_SSL. Same as STREAMREC_KAFKA_OPTIONS / "
    "STREAMREC_KAFKA_CONFIG. Secrets (sasl.password, ...) go in the file only, readable by "
    "you alone; they are never printed.",
)
def cli(kafka_config: tuple[str, ...]) -> None:
    """Real-time recommendations from a Kafka stream of user events.

    \b
    Quick start:
      streamrec kafka up          # a local Apache Kafka broker (KRaft, Java 17)
      streamrec topics create     # events, recommendations, dead letters, changelog
      streamrec run               # the dataflow: events -> top-K recommendations
      streamrec replay --count 1000 --rate 500
      streamrec latency --count 1000

    Every option's default comes from a setting that the environment can
    override (STREAMREC_*); `streamrec config` lists them.
    """
    files = [item for item in kafka_config if "=" not in item]
    options = [item for item in kafka_config if "=" in item]
    # Through the environment, because every command reads its settings from there and
    # so do the processes they start (a flow, a benchmark's services).
    if len(files) > 1:
        raise click.UsageError("--kafka-config takes at most one properties file")
    if options:
        from streamrec.kafka_clients import (
            KafkaConfigError,
            parse_properties,
            refuse_inline_secrets,
        )

        try:  # refused before anything reads it; the value is never shown
            refuse_inline_secrets(parse_properties("\n".join(options), "--kafka-config"))
        except KafkaConfigError as err:
            raise click.UsageError(str(err)) from None
    if files:
        os.environ[ENV_PREFIX + "KAFKA_CONFIG"] = files[0]
    if options:
        earlier = os.environ.get(ENV_PREFIX + "KAFKA_OPTIONS", "")
        os.environ[ENV_PREFIX + "KAFKA_OPTIONS"] = "\n".join(filter(None, [earlier, *options]))


@click.group(cls=LazyGroup, lazy=BENCH_COMMANDS)
def bench_group() -> None:
    """Benchmarks whose figures go into BENCHMARKS.md."""


@click.command("config")
def config_command() -> None:
    """List every setting: its environment variable, default and meaning."""
    for env_name, default, meaning in describe():
        click.echo(f"{env_name}\n    default: {default}\n    {meaning}")


def main() -> None:
    try:
        cli(prog_name="streamrec")
    except KeyboardInterrupt:
        sys.exit(130)
