"""The judge: five levels from the reference by hand, pairs only for the bottom two levels,
and the MLLM judge against the real tiny-model vLLM server surviving whatever it says."""

from __future__ import annotations

import asyncio
import json

import pytest

from inference.client import ListingClient
from inference.images import ImageRejectedError
from inference.output import InvalidOutputError
from opal.samples import load_samples
from schemas.category import default_categories
from schemas.events import AspectEvent, AspectValue, ImageRef, ModelInfo, SchemaCheck, Verdict
from training.judge import REFERENCE_JUDGE, OnlineJudge, mllm_judge, preference_pair, reference_judge, to_outcome, verdict_for

SHOES = default_categories().get("shoes")
REF = ("White leather kitten heel court shoes", {"Color": "white", "Material": "leather", "Heel Type": "kitten"})
MODEL = ModelInfo(name="opal-tiny", version="v1")


@pytest.mark.parametrize(
    ("score", "verdict"),
    [
        (1.0, Verdict.CORRECT),
        (0.95, Verdict.CORRECT),
        (0.94, Verdict.MOSTLY_CORRECT),
        (0.8, Verdict.MOSTLY_CORRECT),
        (0.79, Verdict.PARTIALLY_CORRECT),
        (0.5, Verdict.PARTIALLY_CORRECT),
        (0.49, Verdict.MOSTLY_INCORRECT),
        (0.3, Verdict.MOSTLY_INCORRECT),
        (0.29, Verdict.INCORRECT),
        (0.0, Verdict.INCORRECT),
    ],
)
def test_paper_thresholds(score: float, verdict: Verdict) -> None:
    assert verdict_for(score) is verdict


def test_reference_judge_by_hand() -> None:
    perfect = reference_judge(REF[0], REF[1], *REF)
    assert perfect.verdict is Verdict.CORRECT and perfect.score == 1.0 and perfect.title_matched
    # 2 of 3 aspects right, title right: 3/4 = 0.75 -> partially
    half = reference_judge("white leather kitten heel court shoes", {"Color": "white", "Material": "suede", "Heel Type": "Kitten"}, *REF)
    assert half.score == pytest.approx(0.75) and half.verdict is Verdict.PARTIALLY_CORRECT
    assert [lab.correctly_identified for lab in half.aspect_labels] == [True, False, True]
    # nothing right: title unrelated, wrong colour -> 0 -> incorrect
    bad = reference_judge("blue running sneaker", {"Color": "blue"}, *REF)
    assert bad.score == 0.0 and bad.verdict is Verdict.INCORRECT and not bad.title_matched


def test_pairs_only_for_the_bottom_two_levels() -> None:
    image = ImageRef(uri="file:///x.jpg")
    bad = reference_judge("blue running sneaker", {"Color": "blue"}, *REF)
    out = to_outcome(bad, "l1", "e1", "shoes", "blue running sneaker", {"Color": "blue"}, MODEL, reference=REF)
    pair = preference_pair(out, SHOES, image)
    assert pair is not None and pair.verdict is Verdict.INCORRECT
    assert json.loads(pair.chosen) == {"title": REF[0], "aspects": REF[1]}
    assert pair.chosen.startswith('{"aspects"')  # the order the model emits (aspects first, then the title)
    assert json.loads(pair.rejected) == {"title": "blue running sneaker", "aspects": {"Color": "blue"}}
    assert preference_pair(out, SHOES, image).pair_id == pair.pair_id  # deterministic: re-emitting is idempotent
    good = to_outcome(reference_judge(REF[0], REF[1], *REF), "l1", "e1", "shoes", REF[0], REF[1], MODEL, reference=REF)
    assert preference_pair(good, SHOES, image) is None
    no_ref = to_outcome(bad, "l1", "e1", "shoes", "x", {"Color": "blue"}, MODEL)
    assert preference_pair(no_ref, SHOES, image) is None


@pytest.mark.vllm
def test_mllm_judge_on_the_real_server_never_crashes(vllm_url: str) -> None:
    samples = load_samples()[:8]
    ok, failed = [], []

    async def go() -> None:
        async with ListingClient([vllm_url], max_concurrency=8) as c:

            async def one(i: int) -> None:
                s = samples[i]
                cat = default_categories().get(s.product_type)
                aspects = {"Color": s.color} if cat.aspect("Color") and s.color in (cat.aspect("Color").values or []) else {}
                try:
                    ok.append(await mllm_judge(c, [s.image.read_bytes()], cat, s.title, aspects, reference=(s.title, aspects)))
                except InvalidOutputError as e:
                    failed.append(e)

            await asyncio.gather(*[one(i) for i in range(len(samples))])

    asyncio.run(go())
    assert len(ok) + len(failed) == 8  # every call ended as a judgement or a counted, typed failure
    for j in ok:
        assert j.verdict in set(Verdict) and 0.0 <= j.score <= 1.0 and j.judge_model.startswith("opal-tiny")


def _event(image_uri: str | None, title: str = "black suede ankle boots") -> AspectEvent:
    s = load_samples()[0]
    return AspectEvent(
        listing_id="l1",
        source_event_id="e1",
        category=s.product_type,
        title=title,
        aspects=[AspectValue(name="Color", value="black", confidence=0.2)],
        model=MODEL,
        schema_check=SchemaCheck(valid=True),
        images=[ImageRef(uri=image_uri)] if image_uri else [],
        seller_title=s.title,
        seller_aspects={"Color": s.color},
    )


def test_without_an_endpoint_the_rules_judge_and_the_fallback_is_counted() -> None:
    seen: list[tuple[str, Verdict]] = []
    judge = OnlineJudge(default_categories(), on_judged=lambda kind, verdict, _s: seen.append((kind, verdict)))
    result = asyncio.run(judge(_event("file:///x.jpg")))
    assert result is not None
    outcome, _ = result
    assert outcome.judge_model == REFERENCE_JUDGE and outcome.reference_kind == "ground_truth"
    assert judge.fallbacks == {"no_endpoint": 1} and seen == [("rules", outcome.verdict)]
    assert asyncio.run(judge(_event("file:///x.jpg").model_copy(update={"seller_title": None}))) is None  # nothing to judge against


@pytest.mark.vllm
def test_the_online_judge_asks_the_mllm_and_falls_back_to_the_rules_where_it_cannot(vllm_url: str) -> None:
    s = load_samples()[0]
    agreements: list[bool] = []

    async def load(uri: str) -> bytes:
        if "missing" in uri:
            raise ImageRejectedError("no such file")
        return s.image.read_bytes()

    async def go() -> tuple[object, object, object]:
        judge = OnlineJudge(default_categories(), ListingClient([vllm_url]), load, agreement_rate=1.0, on_agreement=agreements.append)
        results = []
        for uri in (s.image.as_uri(), "file:///missing.jpg", None):
            results.append(await judge(_event(uri)))
        assert judge.fallbacks == {"image_rejected": 1, "no_image": 1}
        return tuple(results)  # type: ignore[return-value]

    mllm, rejected, imageless = asyncio.run(go())
    assert mllm is not None and mllm[0].judge_model.startswith("opal-tiny@")  # type: ignore[index]
    assert rejected[0].judge_model == REFERENCE_JUDGE and imageless[0].judge_model == REFERENCE_JUDGE  # type: ignore[index]
    assert len(agreements) == 1  # the one MLLM verdict was compared with the rules'
