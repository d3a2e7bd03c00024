"""The `streamrec` command: the user's front door to every stage.

Each stage owns its subcommands (``tools/``, ``state/``, ``model/``,
``flows/``); this module only mounts them, lazily, so that ``streamrec kafka
up`` does not import onnxruntime and ``streamrec run`` never imports torch.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from streamrec.settings import ENV_PREFIX, describe

# name -> (module:attribute, one line for the command list; `--help` stays import-free)
COMMANDS: dict[str, tuple[str, str]] = {
    "kafka": ("tools.kafka_cli:kafka_group", "Start, stop or inspect the local Kafka broker."),
    "topics": ("tools.kafka_cli:topics_group", "Create the topics streamrec uses."),
    "config": ("streamrec.cli:config_command", "List every setting and its variable."),
    "state": ("state.cli:state_group", "Inspect the RocksDB session stores."),
    "train": ("model.cli:train_command", "Train, distill, prune, quantize; write the card."),
    "run": ("flows.cli:run_command", "Run the dataflow: events -> recommendations."),
    "replay": ("tools.replay:replay_command", "Replay recorded traffic into the events topic."),
    "record": ("tools.record:record_command", "Capture a topic to a file for later replay."),
    "latency": ("tools.latency:latency_command", "Measure event-to-recommendation latency."),
    "bench": ("streamrec.cli:bench_group", "Benchmarks whose figures go into BENCHMARKS.md."),
    "demo": ("tools.demo:demo_command", "Run the whole system end to end on real data."),
}

BENCH_COMMANDS: dict[str, tuple[str, str]] = {
    "state": ("state.cli:bench_state", "Microseconds per session update on RocksDB."),
    "e2e": ("tools.bench_e2e:bench_e2e_command", "Latency vs throughput: floor, teacher, student."),
    "stages": ("tools.bench_stages:bench_stages_command", "Cost per event of each hot-path stage."),
    "restore": ("tools.bench_restore:bench_restore_command", "Seconds to rebuild a shard."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported only when used."""

    def __init__(self, *args: object, lazy: dict[str, tuple[str, str]], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(self.lazy)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.lazy:
            return None
        target = self.lazy[name][0]
        module_name, attr = target.split(":")
        command = getattr(importlib.import_module(module_name), attr)
        if not isinstance(command, click.Command):
            raise TypeError(f"{target} is not a click command")
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
    "STREAMREC_KAFKA_CONFIG; secrets are never printed.",
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
