"""Class names: the shipped ImageNet table, and names back to ids (exact, ambiguous, unknown)."""

from __future__ import annotations

import hashlib
from importlib.resources import files

import pytest

from engine.labels import ClassNameError, ClassNames, digit_classes, imagenet_classes, normalise
from engine.pipeline import MODELS


def test_the_imagenet_table_is_the_sorted_synset_order():
    classes = imagenet_classes()
    assert len(classes) == 1000 and [c.id for c in classes] == list(range(1000))
    synsets = [c.synset for c in classes]
    assert synsets == sorted(synsets)  # ImageFolder's order, which MAR trained with
    # timm 1.0.31's imagenet_synsets.txt, the file the table was built from, byte for byte
    text = "".join(f"{s}\n" for s in synsets).encode()
    assert hashlib.sha256(text).hexdigest() == (
        "70002b0ff5de60a3a17a82dbfcff291931f96225ddf941ad2e182fc39e183d15"
    )
    anchors = {0: ("n01440764", "tench"), 1: ("n01443537", "goldfish"),
               207: ("n02099601", "golden retriever"), 281: ("n02123045", "tabby"),
               388: ("n02510455", "giant panda"), 980: ("n09472597", "volcano"),
               999: ("n15075141", "toilet tissue")}  # fmt: skip
    for class_id, (synset, name) in anchors.items():
        assert (classes[class_id].synset, classes[class_id].name) == (synset, name)
    names = [c.name for c in classes]
    assert len(set(names)) == 1000  # display names are unique ("crane bird" vs "crane")
    assert classes[134].name == "crane bird" and classes[639].name == "maillot tank suit"
    assert MODELS["mar_base"].labels[207] == "golden retriever"
    data = files("engine").joinpath("data/imagenet_classes.tsv").read_text(encoding="utf-8")
    assert "Apache-2.0" in data.splitlines()[2]  # the attribution travels with the data


@pytest.mark.parametrize(
    ("name", "class_id"),
    [("golden retriever", 207), ("Golden  Retriever", 207), ("GOLDEN-RETRIEVER", 207),
     ("tabby cat", 281), ("Tinca tinca", 0), ("jack-o'-lantern", 607), ("jack o lantern", 607),
     ("n02099601", 207), ("crane bird", 134), ("Cardigan Welsh corgi", 264),
     ("toilet paper", 999)],
)  # fmt: skip
def test_any_synonym_in_any_case_resolves(name, class_id):
    assert imagenet_classes().resolve(name) == class_id


@pytest.mark.parametrize(
    ("name", "ids"),
    [("crane", {134, 517}), ("Crane", {134, 517}), ("cardigan", {264, 474}),
     ("panda", {387, 388}), ("maillot", {638, 639})],
)  # fmt: skip
def test_a_shared_name_is_never_resolved_silently(name, ids):
    with pytest.raises(ClassNameError) as err:
        imagenet_classes().resolve(name)
    assert err.value.ambiguous and {c.id for c in err.value.candidates} == ids
    for class_id in ids:
        assert str(class_id) in str(err.value)


def test_there_are_exactly_nineteen_shared_names():
    classes = imagenet_classes()
    shared = [key for key, ids in classes._index.items() if len(ids) > 1]
    assert len(shared) == 19, shared


@pytest.mark.parametrize(
    ("name", "first"),
    [("golden retreiver", "golden retriever"), ("retriever", "golden retriever"),
     ("volcanoe", "volcano"), ("tabbby", "tabby")],
)  # fmt: skip
def test_an_unknown_name_suggests_close_ones(name, first):
    with pytest.raises(ClassNameError) as err:
        imagenet_classes().resolve(name)
    assert not err.value.ambiguous and 1 <= len(err.value.candidates) <= 3
    assert err.value.candidates[0].name == first and repr(first) in str(err.value)


def test_nothing_close_suggests_nothing():
    with pytest.raises(ClassNameError) as err:
        imagenet_classes().resolve("qqqqxz")
    assert err.value.candidates == () and str(err.value) == "unknown class name 'qqqqxz'"


def test_digits_answer_to_numerals_and_words():
    digits = digit_classes()
    assert [digits.resolve(str(i)) for i in range(10)] == list(range(10))
    assert digits.resolve("Seven") == digits.resolve(" seven ") == 7
    assert digits.resolve("zero") == 0 and digits.labels == tuple(str(i) for i in range(10))
    assert [c.name for c in digits.suggest("sevn")] == ["7"]


def test_normalise_and_plain_labels():
    assert normalise("  Jack-o'-Lantern ") == "jack o lantern"
    plain = ClassNames.from_labels(["a cat", "a dog"])
    assert plain.resolve("A  CAT") == 0 and plain.known("a dog") and not plain.known("a cow")
