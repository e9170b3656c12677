"""Build engine/data/imagenet_classes.tsv from timm's ImageNet metadata (run once; committed).

    pip download timm==1.0.31 --no-deps -d /tmp/timm
    python scripts/imagenet_classes.py /tmp/timm/timm-1.0.31-py3-none-any.whl

Class ids follow the sorted synset list (MAR trains with torchvision's ImageFolder, which
sorts the class folders). The display name is the first WordNet lemma, except the two
classes whose first lemma another class shares: 134 "crane bird" and 639 "maillot tank suit"
(torchvision's names). Every lemma stays a synonym.
"""

from __future__ import annotations

import hashlib
import sys
import zipfile
from pathlib import Path

SYNSETS = "timm/data/_info/imagenet_synsets.txt"
LEMMAS = "timm/data/_info/imagenet_synset_to_lemma.txt"
SYNSETS_SHA256 = "70002b0ff5de60a3a17a82dbfcff291931f96225ddf941ad2e182fc39e183d15"  # timm 1.0.31
DISPLAY = {134: "crane bird", 639: "maillot tank suit"}
OUT = Path(__file__).resolve().parent.parent / "engine" / "data" / "imagenet_classes.tsv"
HEADER = """\
# ImageNet-1k classes: id<TAB>synset<TAB>name<TAB>synonyms (comma-separated WordNet lemmas).
# Ids are positions in the sorted synset list (ImageFolder order, as MAR trains).
# Source: timm 1.0.31 (Apache-2.0) timm/data/_info/imagenet_synsets.txt and
# imagenet_synset_to_lemma.txt; lemmas from WordNet (Princeton University). Built by
# scripts/imagenet_classes.py.
"""


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as z:
        raw = z.read(SYNSETS)
        lemma_lines = z.read(LEMMAS).decode().splitlines()
    if hashlib.sha256(raw).hexdigest() != SYNSETS_SHA256:
        sys.exit("imagenet_synsets.txt differs from timm 1.0.31's")
    synsets = raw.decode().split()
    assert len(synsets) == 1000 and synsets == sorted(synsets)
    lemmas = dict(line.split("\t", 1) for line in lemma_lines)
    rows = []
    for i, synset in enumerate(synsets):
        names = [s.strip() for s in lemmas[synset].split(",")]
        rows.append(f"{i}\t{synset}\t{DISPLAY.get(i, names[0])}\t{', '.join(names)}")
    OUT.write_text(HEADER + "\n".join(rows) + "\n", encoding="utf-8")
    sys.stdout.write(f"wrote {OUT} ({len(rows)} classes)\n")


if __name__ == "__main__":
    main(sys.argv[1])
