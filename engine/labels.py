"""Class names: what a model's class ids mean, and turning a typed name back into an id.

ImageNet-1k (MAR-B/L/H) ships as `engine/data/imagenet_classes.tsv`: every class with its
WordNet synonyms, "golden retriever" -> 207. Digits are "0".."9" and "zero".."nine". A name
matches case- and punctuation-insensitively on any synonym; a name two classes share
("crane": the bird and the machine) is never resolved silently, and an unknown one comes back
with the closest names.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from importlib.resources import files

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MAX_SUGGESTIONS = 3


def normalise(text: str) -> str:
    """ "Jack-o'-lantern " -> "jack o lantern": case-folded, punctuation and runs of
    spaces to one space."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.casefold()).split())


@dataclass(frozen=True)
class ClassInfo:
    id: int
    name: str  # the display name, unique per model
    synonyms: tuple[str, ...] = ()  # every name that means this class (the name included)
    synset: str | None = None  # ImageNet's WordNet id, "n02099601" (resolves too)

    def brief(self) -> dict[str, int | str]:
        return {"id": self.id, "name": self.name}


class ClassNameError(ValueError):
    """A name that means no class (`candidates`: the closest ones) or several (all of them)."""

    def __init__(self, message: str, name: str, candidates: Sequence[ClassInfo], ambiguous: bool):
        super().__init__(message)
        self.name, self.candidates, self.ambiguous = name, tuple(candidates), ambiguous


class ClassNames:
    """A model's classes by id, and a name index over every synonym."""

    def __init__(self, classes: Sequence[ClassInfo]) -> None:
        assert [c.id for c in classes] == list(range(len(classes))), "ids must be 0..N-1"
        self.classes = tuple(classes)
        self._index: dict[str, list[int]] = {}
        for c in self.classes:
            names = (c.name, *c.synonyms, *([c.synset] if c.synset else []))
            for name in dict.fromkeys(names):  # each name once per class
                ids = self._index.setdefault(normalise(name), [])
                if c.id not in ids:
                    ids.append(c.id)

    @classmethod
    def from_labels(cls, labels: Sequence[str]) -> ClassNames:
        return cls([ClassInfo(i, label, (label,)) for i, label in enumerate(labels)])

    def __len__(self) -> int:
        return len(self.classes)

    def __getitem__(self, class_id: int) -> ClassInfo:
        return self.classes[class_id]

    def __iter__(self) -> Iterator[ClassInfo]:
        return iter(self.classes)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    def known(self, name: str) -> bool:
        """Whether `name` means at least one class."""
        return normalise(name) in self._index

    def resolve(self, name: str) -> int:
        """The id a name means; ClassNameError when it means none or several."""
        key = normalise(name)
        ids = self._index.get(key, [])
        if len(ids) == 1:
            return ids[0]
        if ids:
            matches = [self.classes[i] for i in ids]
            listed = ", ".join(f"{c.id} ({c.name})" for c in matches)
            raise ClassNameError(
                f"class name {name!r} is ambiguous: it names classes {listed}; "
                "use a more specific name or class_id",
                name, matches, ambiguous=True,
            )  # fmt: skip
        close = self.suggest(name)
        hint = "; did you mean " + ", ".join(repr(c.name) for c in close) + "?" if close else ""
        raise ClassNameError(f"unknown class name {name!r}{hint}", name, close, ambiguous=False)

    def suggest(self, name: str, n: int = MAX_SUGGESTIONS) -> list[ClassInfo]:
        """Up to `n` classes whose names are closest to `name`: names holding all its words
        first, shortest first ("dog" -> "hot dog", "sled dog"; by spelling alone it would be
        "dough"), then near spellings (difflib: "golden retreiver" -> "golden retriever")."""
        key = normalise(name)
        if not key:
            return []
        found: list[int] = []

        def add(names: Sequence[str]) -> None:
            for k in names:
                for i in self._index[k]:
                    if i not in found and len(found) < n:
                        found.append(i)

        words = set(key.split())
        add(sorted((k for k in self._index if words <= set(k.split())), key=lambda k: (len(k), k)))
        add(difflib.get_close_matches(key, list(self._index), n=n, cutoff=0.6))
        return [self.classes[i] for i in found]


@cache
def imagenet_classes() -> ClassNames:
    """The 1000 ImageNet-1k classes, from the data file shipped with the package."""
    text = files("engine").joinpath("data/imagenet_classes.tsv").read_text(encoding="utf-8")
    classes = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            class_id, synset, name, synonyms = line.split("\t")
            classes.append(ClassInfo(int(class_id), name, tuple(synonyms.split(", ")), synset))
    return ClassNames(classes)


@cache
def digit_classes() -> ClassNames:
    return ClassNames([ClassInfo(i, str(i), (str(i), w)) for i, w in enumerate(DIGIT_WORDS)])
