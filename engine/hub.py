"""Where the official weights come from and where they live on disk (stdlib only).

The cache holds one folder per weight name, the same layout a mirror serves:

    $MARCHE_CACHE/mar_base/checkpoint-last.pth     <mirror>/mar_base/checkpoint-last.pth
    $MARCHE_CACHE/vae/kl16.ckpt                    <mirror>/vae/kl16.ckpt

`marche weights fetch NAME` downloads into it (marche/weights_cmd.py); `Pipeline.load` looks
there when no path is given. A download in progress is `<file>.part` and is never loaded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

PART_SUFFIX = ".part"
LOCK_SUFFIX = ".lock"


@dataclass(frozen=True)
class WeightFile:
    """One downloadable file. `size`/`sha256` are None until pinned from a trusted download:
    upstream (LTH14/mar util/download.py) publishes neither."""

    name: str  # cache folder and `marche weights fetch` argument
    filename: str
    url: str  # the official upstream link
    size: int | None = None
    sha256: str | None = None


def _dropbox(key: str, filename: str, rlkey: str) -> str:
    return f"https://www.dropbox.com/scl/fi/{key}/{filename}?rlkey={rlkey}&dl=0"


CHECKPOINT = "checkpoint-last.pth"
# size/sha256: pin both here after a trusted first download (None: not checked)
MANIFEST: dict[str, WeightFile] = {
    "mar_base": WeightFile(
        "mar_base",
        CHECKPOINT,
        _dropbox("f6dpuyjb7fudzxcyhvrhk", CHECKPOINT, "a6i4bo71vhfo4anp33n9ukujb"),
        size=None,
        sha256=None,
    ),
    "mar_large": WeightFile(
        "mar_large",
        CHECKPOINT,
        _dropbox("pxacc5b2mrt3ifw4cah6k", CHECKPOINT, "m48ovo6g7ivcbosrbdaz0ehqt"),
        size=None,
        sha256=None,
    ),
    "mar_huge": WeightFile(
        "mar_huge",
        CHECKPOINT,
        _dropbox("1qmfx6fpy3k7j9vcjjs3s", CHECKPOINT, "4lae281yzxb406atp32vzc83o"),
        size=None,
        sha256=None,
    ),
    "vae": WeightFile(
        "vae",
        "kl16.ckpt",
        _dropbox("hhmuvaiacrarfg28qxhwz", "kl16.ckpt", "l44xipsezc8atcffdp4q7mwmh"),
        size=None,
        sha256=None,
    ),
}
VAE = "vae"


class WeightsMissing(ValueError):
    """An official file is needed and is not in the cache; the message names the command."""


def weight_file(name: str) -> WeightFile:
    if name not in MANIFEST:
        raise ValueError(f"unknown weights {name!r}; known: {', '.join(MANIFEST)}")
    return MANIFEST[name]


def cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """`$MARCHE_CACHE`, else `$XDG_CACHE_HOME/marche`, else `~/.cache/marche`."""
    env = os.environ if env is None else env
    if env.get("MARCHE_CACHE"):
        return Path(env["MARCHE_CACHE"]).expanduser()
    xdg = env.get("XDG_CACHE_HOME", "")
    if xdg and Path(xdg).is_absolute():  # the XDG spec: relative values are ignored
        return Path(xdg) / "marche"
    return Path.home() / ".cache" / "marche"


def cache_path(name: str, env: Mapping[str, str] | None = None) -> Path:
    """Where `name` lives once fetched (whether or not it is there)."""
    file = weight_file(name)
    return cache_dir(env) / file.name / file.filename


def part_path(path: Path) -> Path:
    return path.with_name(path.name + PART_SUFFIX)


def source_url(name: str, env: Mapping[str, str] | None = None) -> str:
    """The official link, or `<prefix>/<name>/<filename>` under `$MARCHE_WEIGHTS_MIRROR`."""
    env = os.environ if env is None else env
    file = weight_file(name)
    mirror = env.get("MARCHE_WEIGHTS_MIRROR", "").rstrip("/")
    return f"{mirror}/{file.name}/{file.filename}" if mirror else file.url


def find_weights(names: Sequence[str], env: Mapping[str, str] | None = None) -> dict[str, Path]:
    """The fetched file of each name; any missing raises one line naming the command to run."""
    paths = {name: cache_path(name, env) for name in names}
    missing = [name for name, path in paths.items() if not path.is_file()]  # never a `.part`
    if missing:
        options = "/".join(dict.fromkeys("--vae" if n == VAE else "--checkpoint" for n in missing))
        raise WeightsMissing(
            f"{' and '.join(missing)} weights not found in {cache_dir(env)}; "
            f"run `marche weights fetch {' '.join(missing)}` (or pass {options})"
        )
    return paths
