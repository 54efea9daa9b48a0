"""`opal dlq ...`: what the dead-letter topic holds, and replay of dead letters into the lane each came from."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from opal.commands.common import console, exits_on, fail, require_kafka, resolved_settings
from schemas.errors import OpalError

app = typer.Typer(help="Dead letters: list them by origin and reason, replay them by reason.", no_args_is_help=True)

ReasonOpt = Annotated[list[str] | None, typer.Option("--reason", help="DeadLetter error_kind (repeatable), e.g. invalid_image.")]
TopicOpt = Annotated[list[str] | None, typer.Option("--topic", help="Origin topic (repeatable).")]
SinceOpt = Annotated[str | None, typer.Option(help="Only dead letters that failed since: a duration (30m, 6h, 7d) or an ISO time (UTC).")]


def _when(t: datetime | None) -> str:
    return "" if t is None else t.strftime("%Y-%m-%d %H:%M:%S")


@app.command("list")
def dlq_list(reason: ReasonOpt = None, topic: TopicOpt = None, since: SinceOpt = None) -> None:
    """Dead letters by origin topic and reason: counts, how many a replay could send, oldest and newest failure."""
    from confluent_kafka import KafkaException

    from schemas.events import DeadLetter
    from schemas.serde import CodecSet
    from workers.dlq import Criteria, overview, parse_since

    s = resolved_settings()
    require_kafka(s)
    with exits_on(ValueError, highlight=False):
        criteria = Criteria(frozenset(reason or ()), frozenset(topic or ()), parse_since(since) if since else None)
    with (
        console.status(f"reading {s.topics.dead_letters} ..."),
        exits_on(TimeoutError, LookupError, OpalError, KafkaException, highlight=False),
    ):
        ov = overview(s.kafka, s.topics, CodecSet.of(s.kafka)[DeadLetter], criteria)
    t = Table(title=f"dead letters in {s.topics.dead_letters} (UTC)")
    for name in ("origin topic", "reason", "count", "replayable", "after replay", "oldest failed_at", "newest failed_at"):
        t.add_column(name, no_wrap=True)
    t.add_column("latest message", max_width=60)  # the one column that wraps
    for g in ov.rows():
        lane = "" if g.origin_topic in ov.lanes else " [dim](not a lane)[/]"
        t.add_row(
            f"{escape(g.origin_topic) or '(none)'}{lane}",
            escape(g.reason),
            str(g.count),
            str(g.replayable),
            str(g.after_replay),
            _when(g.oldest),
            _when(g.newest),
            escape(g.last_message[:200]),
        )
    console.print(t)
    print(ov.line(), flush=True)


@app.command("replay")
def dlq_replay(
    reason: ReasonOpt = None,
    topic: TopicOpt = None,
    since: SinceOpt = None,
    rate: Annotated[float, typer.Option(min=0.0, help="Records per second at most (0: no limit).")] = 50.0,
    dry_run: Annotated[bool, typer.Option(help="Count what would be replayed; send nothing.")] = False,
) -> None:
    """Put dead letters of the given reasons back on the topic each came from (the original key, value and headers).

    Reads the dead-letter topic to the end it has when the command starts (never what is dead-lettered meanwhile),
    keeps those matching every filter, and sends each to its origin topic with the header
    opal-replayed-from: <topic>/<partition>/<offset>. Only the image lanes and the preference topic take replays;
    truncated dead letters and those without a value are skipped and counted. Returns once every record sent is
    acknowledged; on an error, rerun it (records keep their event ids: downstream recognises them). Dead letters stay
    in their topic (use --since to leave out earlier ones on a rerun).
    """
    from confluent_kafka import KafkaException

    from schemas.events import DeadLetter
    from schemas.serde import CodecSet
    from workers.dlq import Criteria, ReplayError, parse_since, replay, replay_lanes

    if not reason:
        raise fail("Name the reasons to replay with --reason (repeatable);", " `opal dlq list` shows them.")
    s = resolved_settings()
    require_kafka(s)
    lanes = replay_lanes(s.topics)
    refused = sorted(set(topic or ()) - set(lanes))
    if refused:
        shown = ", ".join(f"{t} ({what})" for t, what in lanes.items())
        raise fail(f"--topic {', '.join(refused)}: not a replay lane.", f" Replays go only to {shown}.", highlight=False)
    with exits_on(ValueError, highlight=False):
        criteria = Criteria(frozenset(reason), frozenset(topic or ()), parse_since(since) if since else None)
    with exits_on(ReplayError, TimeoutError, LookupError, OpalError, KafkaException, highlight=False):
        report = replay(
            s.kafka,
            s.topics,
            CodecSet.of(s.kafka)[DeadLetter],
            criteria,
            rate_per_s=rate,
            dry_run=dry_run,
            progress=lambda n: console.print(f"  sent {n:,}", highlight=False),
        )
    t = Table("reason", "matched", "would replay" if dry_run else "replayed", "skipped", "skipped because")
    t.title = f"replay from {s.topics.dead_letters}" + (" (dry run: nothing sent)" if dry_run else "")
    for name, counts in sorted(report.reasons.items()):
        why = ", ".join(f"{w} ({n})" for w, n in counts.skipped.most_common())
        t.add_row(escape(name), str(counts.matched), str(counts.replayed), str(counts.skipped.total()), escape(why))
    if not report.reasons:
        t.add_row(f"[dim]no dead letter with reason {escape(', '.join(sorted(reason)))}[/]", "0", "0", "0", "")
    console.print(t)
    print(report.line(), flush=True)
