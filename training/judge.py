"""The judge: the paper's five-level verdicts, from an MLLM or from the reference.

One module serves offline preference-pair building and the online feedback loop:

- :func:`reference_judge` derives the verdict from agreement with a reference listing
  (no model needed): each generated aspect is *Correctly Identified* when the
  reference has the same normalised name and value; the title matches when the
  ROUGE-L F1 of the normalised titles is at least 0.5; the score is the share of
  correct items (aspects plus the title) and maps onto the five levels by the paper's
  thresholds (>=95% / 80-94% / 50-79% / 30-49% / <30%).
- :func:`mllm_judge` asks a judge model through an OpenAI-compatible endpoint with
  structured output; its labels give the score, its own grade gives the verdict.
  Unusable judge output raises :class:`~inference.output.InvalidOutputError` (callers
  count it, never crash).
- :class:`OnlineJudge` judges streamed AspectEvents (the judge agent's judge): the MLLM
  judge against the photo and the seller's MACE-refined listing when an endpoint is
  configured and the photo can be read, the reference rules otherwise (no endpoint, no
  image, a rejected image, unusable judge output: each counted as a fallback); a sample
  of MLLM-judged events is also judged by the rules, so their agreement can be watched.
  Every JudgeOutcome names its judge (``judge_model``: the MLLM's served name or
  :data:`REFERENCE_JUDGE`). A judge endpoint that is down raises (the agent waits it out).
- :func:`to_outcome` / :func:`preference_pair` turn a judgement into the JudgeOutcome
  event and, for the bottom two levels, the DPO pair (chosen = reference, rejected =
  model output), with a deterministic pair id so re-emitting is idempotent.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from inference.client import InferenceRejectedError, ListingClient
from inference.images import PreparedImage, prepare_image
from inference.output import InvalidOutputError
from inference.prompt import JUDGE_LEVELS, completion_json, instruction, judge_messages, judge_schema
from schemas.category import CategoryRegistry, CategorySchema
from schemas.errors import OpalError
from schemas.events import AspectEvent, AspectLabel, ImageRef, JudgeOutcome, ModelInfo, PreferencePair, Verdict
from training.mace import refine
from training.metrics import canonical_json, norm, rouge_l_f1

THRESHOLDS: tuple[tuple[float, Verdict], ...] = (
    (0.95, Verdict.CORRECT),
    (0.80, Verdict.MOSTLY_CORRECT),
    (0.50, Verdict.PARTIALLY_CORRECT),
    (0.30, Verdict.MOSTLY_INCORRECT),
    (0.0, Verdict.INCORRECT),
)
LEVEL_TO_VERDICT = dict(zip(JUDGE_LEVELS, (v for _, v in THRESHOLDS), strict=True))
PAIR_VERDICTS = {Verdict.MOSTLY_INCORRECT, Verdict.INCORRECT}
REFERENCE_JUDGE = "reference-rules-v1"


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    score: float
    aspect_labels: list[AspectLabel]
    title_matched: bool
    judge_model: str
    reference_kind: str


def verdict_for(score: float) -> Verdict:
    return next(v for t, v in THRESHOLDS if score >= t - 1e-9)


def _score(labels: list[AspectLabel], title_matched: bool) -> float:
    return (sum(lab.correctly_identified for lab in labels) + int(title_matched)) / (len(labels) + 1)


def reference_judge(title: str, aspects: Mapping[str, str], ref_title: str, ref_aspects: Mapping[str, str]) -> Judgement:
    ref = {norm(k): norm(v) for k, v in ref_aspects.items()}
    labels = [AspectLabel(name=k, value=v, correctly_identified=ref.get(norm(k)) == norm(v)) for k, v in aspects.items()]
    matched = rouge_l_f1(norm(title), norm(ref_title)) >= 0.5
    s = _score(labels, matched)
    return Judgement(verdict_for(s), s, labels, matched, REFERENCE_JUDGE, "ground_truth")


async def mllm_judge(
    client: ListingClient,
    images: Sequence[bytes | PreparedImage],
    category: CategorySchema,
    title: str,
    aspects: Mapping[str, str],
    reference: tuple[str, Mapping[str, str]] | None = None,
) -> Judgement:
    generated = canonical_json(title, aspects)
    ref_json = canonical_json(*reference) if reference else None
    urls = [(b if isinstance(b, PreparedImage) else prepare_image(b)).data_url() for b in images]
    resp, *_ = await client.complete_json(
        judge_messages(category, urls, generated, ref_json), judge_schema(list(aspects)), "opal_judge", max_tokens=512
    )
    raw = ""
    try:
        raw = resp["choices"][0]["message"].get("content") or ""
        doc = json.loads(raw)
        verdict = LEVEL_TO_VERDICT[doc["verdict"]]
        said = {str(a["name"]): bool(a["correctly_identified"]) for a in doc["aspects"]}
        title_matched = bool(doc["title_matched"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise InvalidOutputError(f"unusable judge output ({type(e).__name__}: {e})", raw) from None
    labels = [AspectLabel(name=k, value=v, correctly_identified=said.get(k, False)) for k, v in aspects.items()]
    judge_model = str(resp.get("model", "judge"))
    return Judgement(
        verdict, _score(labels, title_matched), labels, title_matched, judge_model, "ground_truth" if reference else "image_only"
    )


def to_outcome(
    j: Judgement,
    listing_id: str,
    source_event_id: str,
    category: str,
    title: str,
    aspects: Mapping[str, str],
    model: ModelInfo,
    reference: tuple[str, Mapping[str, str]] | None = None,
) -> JudgeOutcome:
    return JudgeOutcome(
        listing_id=listing_id,
        source_event_id=source_event_id,
        category=category,
        verdict=j.verdict,
        score=j.score,
        aspect_labels=j.aspect_labels,
        title_matched=j.title_matched,
        generated=canonical_json(title, aspects),
        reference_kind=j.reference_kind,
        reference=canonical_json(*reference) if reference else None,
        judge_model=j.judge_model,
        model=model,
    )


def preference_pair(outcome: JudgeOutcome, category: CategorySchema, image: ImageRef) -> PreferencePair | None:
    """The DPO pair for a low verdict (chosen = reference, rejected = output); None otherwise or without a reference."""
    if outcome.verdict not in PAIR_VERDICTS or outcome.reference is None:
        return None
    chosen, rejected = json.loads(outcome.reference), json.loads(outcome.generated)
    digest = hashlib.sha256(f"{outcome.listing_id}\0{outcome.model.version}\0{outcome.generated}".encode()).hexdigest()[:24]
    return PreferencePair(
        pair_id=digest,
        listing_id=outcome.listing_id,
        category=outcome.category,
        prompt=instruction(category),
        image=image,
        chosen=completion_json(chosen["title"], chosen["aspects"], category),  # the order the model is trained to emit
        rejected=completion_json(rejected["title"], rejected["aspects"], category),
        verdict=outcome.verdict,
        model=outcome.model,
    )


@dataclass
class OnlineJudge:
    """The judge agent's judge (module docstring); one instance per agent, called once per selected event."""

    categories: CategoryRegistry
    client: ListingClient | None = None
    load_image: Callable[[str], Awaitable[bytes | PreparedImage]] | None = None
    agreement_rate: float = 0.0
    on_judged: Callable[[str, Verdict, float], None] | None = None  # (judge, verdict, seconds)
    on_fallback: Callable[[str], None] | None = None  # reason
    on_agreement: Callable[[bool], None] | None = None
    fallbacks: dict[str, int] = field(default_factory=dict)
    _opened: bool = False  # the client's connection pools are made on the loop that first judges (faust's)

    def _fallback(self, reason: str) -> None:
        self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1
        if self.on_fallback is not None:
            self.on_fallback(reason)

    def _sampled(self, event: AspectEvent) -> bool:
        bucket = int(hashlib.sha256(f"agreement:{event.source_event_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        return bucket < self.agreement_rate

    async def __call__(self, event: AspectEvent) -> tuple[JudgeOutcome, PreferencePair | None] | None:
        """The outcome and (bottom verdicts) the pair; None without a seller listing to judge against."""
        if not event.seller_title:
            return None
        cat = self.categories.resolve(event.category)
        ref = refine(event.listing_id, event.seller_title, event.seller_aspects, cat)
        reference = (ref.title, ref.aspects)
        aspects = {a.name: a.value for a in event.aspects}
        t0 = time.perf_counter()
        rules = reference_judge(event.title, aspects, ref.title, ref.aspects)
        j, judge = rules, "rules"
        if self.client is None or self.load_image is None:
            self._fallback("no_endpoint")
        elif not event.images:
            self._fallback("no_image")
        else:
            j, judge = await self._mllm(event, cat, aspects, reference, rules)
        if self.on_judged is not None:
            self.on_judged(judge, j.verdict, time.perf_counter() - t0)
        outcome = to_outcome(j, event.listing_id, event.source_event_id, event.category, event.title, aspects, event.model, reference)
        pair = preference_pair(outcome, cat, event.images[0]) if event.images else None
        return outcome, pair

    async def _mllm(
        self, event: AspectEvent, cat: CategorySchema, aspects: dict[str, str], reference: tuple[str, Mapping[str, str]], rules: Judgement
    ) -> tuple[Judgement, str]:
        assert self.client is not None and self.load_image is not None
        if not self._opened:
            await self.client.__aenter__()
            self._opened = True
        try:
            image = await self.load_image(event.images[0].uri)
        except OpalError as e:
            if e.dependency and e.retriable:
                raise  # an image host that is down: an outage, the agent waits
            self._fallback("image_rejected")
            return rules, "rules"
        try:
            j = await mllm_judge(self.client, [image], cat, event.title, aspects, reference)
        except InvalidOutputError:
            self._fallback("judge_output_invalid")
            return rules, "rules"
        except InferenceRejectedError:  # the judge refused this request (e.g. too long): the rules still judge it
            self._fallback("judge_rejected")
            return rules, "rules"
        if self.on_agreement is not None and self._sampled(event):
            self.on_agreement(j.verdict == rules.verdict)
        return j, "mllm"
