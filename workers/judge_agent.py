"""Judge agent (faust-streaming): generated listings -> JudgeOutcomes; low verdicts -> DPO preference pairs.

Contract
- Consumes ``topics.aspects`` as faust app / consumer group :data:`JUDGE_GROUP`.
- Judges a listing when its lowest aspect confidence is below ``judge.confidence_below``
  (the model was unsure) or, for calibration, when a hash of its source event id falls in
  ``judge.sample_rate``; the rest are counted as not selected. The verdict itself comes
  from the injected ``judge`` function, plain or async (the CLI wires
  :class:`training.judge.OnlineJudge`: the MLLM judge when ``judge.endpoint`` is set, the
  reference rules otherwise; it returns None when the event carries no seller listing,
  counted as ``no_reference``).
- Writes the JudgeOutcome (key: listing id) to ``topics.judge_outcomes`` and, for the
  bottom two verdicts, the PreferencePair (key: its deterministic pair id) to
  ``topics.preferences``: the next DPO set (``opal train dpo`` reads a dump of it).
- At-least-once: every send is awaited until Kafka acknowledges it before the agent
  takes the next event, and faust commits an offset only after the agent finished the
  event. A crash replays the uncommitted tail; the same keys and contents are written
  again, which compaction and the pair id make harmless.
- Decoding never blocks the loop, and a schema registry outage is waited out like any
  dependency (:func:`workers.faust_app.decode_event`).
- A record that is not an AspectEvent becomes a DeadLetter with its reason; a judge
  error on one event becomes a DeadLetter too (``internal_error``), never a stuck agent.
  A judge failure that names a dependency (an :class:`~schemas.errors.OpalError` with
  ``dependency``, e.g. a judge endpoint that is down) is an outage: the agent waits and
  retries through the breaker (:func:`workers.faust_app.gate_for`), no dead letter.
- Runs until SIGTERM/SIGINT (faust's worker stops the agent, commits and leaves).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections import Counter
from collections.abc import Awaitable, Callable

import faust

from schemas.errors import ErrorKind, OpalError
from schemas.events import AspectEvent, DeadLetter, JudgeOutcome, PreferencePair
from schemas.serde import CodecSet
from schemas.settings import OpalSettings
from topology.declared import JUDGE_GROUP
from workers.faust_app import decode_event, gate_for, make_faust_app, raw_topic, send_acked, send_dead_letter

log = logging.getLogger(__name__)
JudgeResult = "tuple[JudgeOutcome, PreferencePair | None] | None"
JudgeFn = Callable[[AspectEvent], "JudgeResult | Awaitable[JudgeResult]"]


class JudgeFailedError(OpalError):
    """The judge raised on an event (a bug or a judge outage); the event is dead-lettered with the message."""

    reason = ErrorKind.INTERNAL


def selected(event: AspectEvent, confidence_below: float, sample_rate: float) -> bool:
    """Low confidence, or in the deterministic calibration sample."""
    if event.aspects and min(a.confidence for a in event.aspects) < confidence_below:
        return True
    bucket = int(hashlib.sha256(event.source_event_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < sample_rate


async def _call(judge: JudgeFn, event: AspectEvent) -> tuple[JudgeOutcome, PreferencePair | None] | None:
    result = judge(event)
    return await result if inspect.isawaitable(result) else result


def build_judge_app(settings: OpalSettings, judge: JudgeFn, counts: Counter[str] | None = None) -> faust.App:
    """The faust app with one agent (see the module contract); ``counts`` collects what happened to each event."""
    codecs = CodecSet.of(settings.kafka)
    codec, out_codec, pair_codec, dl_codec = codecs[AspectEvent], codecs[JudgeOutcome], codecs[PreferencePair], codecs[DeadLetter]
    counts = counts if counts is not None else Counter()
    t, j = settings.topics, settings.judge
    app = make_faust_app(settings, JUDGE_GROUP)
    gate = gate_for(settings, counts)
    source, outcomes = raw_topic(app, t.aspects), raw_topic(app, t.judge_outcomes)
    preferences, dead_letters = raw_topic(app, t.preferences), raw_topic(app, t.dead_letters)

    @app.agent(source)
    async def judge_listings(stream: faust.StreamT) -> None:
        async for ev in stream.events():
            try:
                event = await decode_event(gate, codec, ev.value)
            except OpalError as e:
                await send_dead_letter(dead_letters, dl_codec, t.aspects, ev, e, counts)
                continue
            if not selected(event, j.confidence_below, j.sample_rate):
                counts["not_selected"] += 1
                continue
            try:
                result = await gate.call("judge", lambda ev_=event: _call(judge, ev_))
            except Exception as e:  # one bad event must not stop the agent
                log.exception("judge failed on %s", event.listing_id)
                err = JudgeFailedError(f"judge failed: {type(e).__name__}: {e}")
                await send_dead_letter(dead_letters, dl_codec, t.aspects, ev, err, counts)
                continue
            if result is None:
                counts["no_reference"] += 1
                continue
            outcome, pair = result
            await send_acked(outcomes, outcome.listing_id.encode(), out_codec.encode(outcome))
            counts[f"verdict:{outcome.verdict.value}"] += 1
            if pair is not None:
                await send_acked(preferences, pair.pair_id.encode(), pair_codec.encode(pair))
                counts["pairs"] += 1

    return app
