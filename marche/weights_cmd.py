"""`marche weights`: fetch the official MAR checkpoints and the KL-16 VAE into the cache.

A download goes to `<file>.part` next to the target, resumes with an HTTP Range request,
is checked against the expected size (the pinned one, else the server's total) and the
sha256 when one is known, and is renamed into place (`os.replace`, atomic) only when complete.
A lock file (`<file>.lock`, flock) keeps two fetches of the same file from interleaving.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import httpx
import typer
from rich.table import Table
from tqdm import tqdm

from engine.hub import LOCK_SUFFIX, MANIFEST, cache_dir, cache_path, part_path, source_url
from marche.options import console, fail, out

CHUNK = 64 * 1024  # iter_raw buffers a whole chunk: a drop loses at most this much
# upstream's trick (LTH14/mar util/download.py): with a Wget user agent, Dropbox's `dl=0`
# link serves the file itself rather than a preview page
USER_AGENT = "Wget/1.16 (linux-gnu)"
TIMEOUT = httpx.Timeout(30.0, read=120.0)
CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
UNSATISFIED_RANGE = re.compile(r"bytes \*/(\d+)")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class FetchError(Exception):
    """A download that did not complete; the message is one line for the user."""


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def file_lock(dest: Path) -> Iterator[None]:
    """Hold `<dest>.lock` exclusively; a second fetch of the same file waits here.

    The lock file stays behind: deleting it would let a third fetch lock a new inode."""
    with open(dest.with_name(dest.name + LOCK_SUFFIX), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            console.print(f"waiting for another fetch of {dest} to finish", highlight=False)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # closing the handle releases the lock


def fetch_file(
    name: str, url: str, dest: Path, *, size: int | None = None, sha256: str | None = None
) -> bool:
    """Download `url` to `dest` (resuming `dest.part`); False when `dest` was already there."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(dest):
        if dest.is_file():  # complete (an earlier run, or the fetch we waited for)
            if sha256 is not None and (got := file_sha256(dest)) != sha256:
                raise FetchError(
                    f"{dest} has sha256 {got}, not {sha256}; delete it to fetch {name} again"
                )
            return False
        part = part_path(dest)
        expected = download(name, url, part, size)
        verify(name, part, expected, sha256)
        os.replace(part, dest)
    return True


def download(name: str, url: str, part: Path, size: int | None) -> int | None:
    """Append the missing bytes of `url` to `part`; the file's total size when known."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Accept-Encoding": "identity", "User-Agent": USER_AGENT}  # no gzip: byte offsets
    if have:
        headers["Range"] = f"bytes={have}-"
    resume = f"rerun `marche weights fetch {name}` to resume"
    try:
        with (
            httpx.Client(follow_redirects=True, timeout=TIMEOUT) as client,
            client.stream("GET", url, headers=headers) as response,
        ):
            start, total = where_to_start(name, response, part, have)
            if size is not None and total is not None and total != size:
                raise FetchError(
                    f"{response.url.host} serves {total} bytes, but {name} should be {size} bytes"
                )
            if response.status_code == 416:
                return total
            with (
                part.open("ab" if start else "wb") as f,
                tqdm(
                    total=size or total,
                    initial=start,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=name,
                    disable=None,  # no bar when stderr is not a terminal
                ) as bar,
            ):
                for chunk in response.iter_raw(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
                f.flush()
                os.fsync(f.fileno())
    except httpx.HTTPError as exc:
        kept = part.stat().st_size if part.exists() else 0
        where = urlsplit(url).hostname or url
        if kept:
            raise FetchError(
                f"download of {name} from {where} stopped at {kept} bytes ({one_line(exc)}); "
                + resume
            ) from None
        raise FetchError(f"cannot download {name} from {where}: {one_line(exc)}") from None
    return size or total


def where_to_start(
    name: str, response: httpx.Response, part: Path, have: int
) -> tuple[int, int | None]:
    """(offset the body starts at, total size if the server says) from the response status."""
    status = response.status_code
    if status in (200, 206) and "text/html" in response.headers.get("Content-Type", ""):
        raise FetchError(  # a sharing link's landing page, a login wall, a proxy's error...
            f"{response.url.host} sent a web page, not the file, for {name}; try another "
            "source (--url or MARCHE_WEIGHTS_MIRROR)"
        )
    if status == 206:
        m = CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
        if m is None or int(m[1]) != have:
            part.unlink()
            raise FetchError(
                f"the server answered `Range: bytes={have}-` with Content-Range "
                f"{response.headers.get('Content-Range')!r}; removed the partial file of {name}, "
                "rerun to start over"
            )
        return have, None if m[3] == "*" else int(m[3])
    if status == 200:  # a fresh download, or a server that ignores Range: start again at 0
        if have:
            console.print(f"{name}: the server ignores Range; downloading from the start")
        length = response.headers.get("Content-Length")
        return 0, int(length) if length and length.isdigit() else None
    if status == 416 and have:  # nothing after `have`: the .part may already be complete
        m = UNSATISFIED_RANGE.fullmatch(response.headers.get("Content-Range", ""))
        if m is None or int(m[1]) != have:
            part.unlink()
            raise FetchError(
                f"the partial file of {name} ({have} bytes) does not fit the server's file "
                f"({response.headers.get('Content-Range')!r}); removed it, rerun to start over"
            )
        return have, have
    raise FetchError(
        f"{response.url.host} answered HTTP {status} {response.reason_phrase} for {name}"
    )


def verify(name: str, part: Path, expected: int | None, sha256: str | None) -> None:
    """Refuse a short, long or corrupt download; only a short one is kept (to resume)."""
    got = part.stat().st_size
    if expected is not None and got < expected:
        raise FetchError(
            f"{name} is incomplete: {got} of {expected} bytes; "
            f"rerun `marche weights fetch {name}` to resume"
        )
    if expected is not None and got > expected:
        part.unlink()
        raise FetchError(f"{name} is {got} bytes, more than the {expected} expected; removed it")
    if sha256 is not None and (digest := file_sha256(part)) != sha256:
        part.unlink()
        raise FetchError(f"{name} has sha256 {digest}, not {sha256}; removed the download")


app = typer.Typer(
    help="Official MAR checkpoints and the KL-16 VAE, in the cache ($MARCHE_CACHE).",
    no_args_is_help=True,
)

NamesArg = Annotated[
    list[str], typer.Argument(help=f"what to fetch: {', '.join(MANIFEST)}", show_default=False)
]


@app.command("fetch")
def fetch_command(
    names: NamesArg,
    url: Annotated[
        str | None, typer.Option(help="download from this URL instead (one name only)")
    ] = None,
    sha256: Annotated[
        str | None, typer.Option(help="expected sha256, hex; checked after download (one name)")
    ] = None,
) -> None:
    """Download weights into the cache (a partial download resumes).

    `marche serve --model mar_base` then finds them without a path.
    MARCHE_WEIGHTS_MIRROR=https://host/prefix fetches <prefix>/<name>/<filename>
    instead of the official links."""
    unknown = [n for n in names if n not in MANIFEST]
    if unknown:
        raise fail(f"unknown weights {', '.join(unknown)}; known: {', '.join(MANIFEST)}")
    if (url is not None or sha256 is not None) and len(names) != 1:
        raise fail("--url and --sha256 apply to one name at a time")
    if sha256 is not None:
        sha256 = sha256.strip().lower()
        if not SHA256_HEX.fullmatch(sha256):
            raise fail("--sha256 takes 64 hexadecimal digits")
    for name in dict.fromkeys(names):
        file, dest = MANIFEST[name], cache_path(name)
        source = url or source_url(name)
        if urlsplit(source).scheme not in ("http", "https"):
            raise fail(f"{source!r} is not an http(s) URL")
        try:
            fetched = fetch_file(name, source, dest, size=file.size, sha256=sha256 or file.sha256)
        except FetchError as exc:
            raise fail(str(exc)) from None
        except OSError as exc:
            raise fail(f"cannot write {exc.filename or dest}: {exc.strerror or exc}") from None
        state = "fetched" if fetched else "already present:"
        out.print(f"{name}: {state} {dest} ({mib(dest.stat().st_size)})", highlight=False)


@app.command("list")
def list_command() -> None:
    """The known weights, where they go in the cache, and which are there."""
    table = Table("name", "path", "status", title=f"cache: {cache_dir()}")
    for name in MANIFEST:
        path = cache_path(name)
        part = part_path(path)
        if path.is_file():
            status = f"present, {mib(path.stat().st_size)}"
        elif part.is_file():
            status = f"partial, {mib(part.stat().st_size)} (fetch resumes)"
        else:
            status = "missing"
        table.add_row(name, str(path), status)
    out.print(table)
