"""`marche weights fetch/list` and the weight cache, against a loopback HTTP server (no network)."""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.hub import (
    MANIFEST,
    WeightsMissing,
    cache_dir,
    cache_path,
    find_weights,
    part_path,
    source_url,
)
from marche.cli import app
from marche.weights_cmd import CHUNK, FetchError, fetch_file

runner = CliRunner()
BLOB = bytes(range(256)) * 1024 + b"tail" * 250  # 263,144 bytes: not a multiple of CHUNK
DIGEST = hashlib.sha256(BLOB).hexdigest()


@dataclass
class Behaviour:
    """What the loopback server does; tests change it between fetches."""

    honour_range: bool = True
    fail_after: int | None = None  # send this many body bytes, then drop the connection
    no_length: bool = False  # no Content-Length: the body ends when the connection closes
    status: int | None = None  # answer every request with this status instead
    html: bool = False  # a web page (a sharing link's landing page) instead of the file
    seen: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)

    def ranges(self) -> list[str | None]:
        return [r for _, r in self.seen]


@dataclass
class Server:
    url: str  # base: http://127.0.0.1:PORT
    behaviour: Behaviour


@pytest.fixture
def server() -> Iterator[Server]:
    behaviour = Behaviour()

    class RangeHandler(BaseHTTPRequestHandler):  # HTTP/1.0: one request per connection
        def do_GET(self) -> None:
            b, size = behaviour, len(BLOB)
            b.seen.append((self.path, self.headers.get("Range")))
            if b.status is not None:
                self.send_response(b.status)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if b.html:
                page = b"<!doctype html><title>Dropbox</title>"
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)
                return
            m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if m and b.honour_range:
                start = int(m[1])
                if start >= size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
                body = BLOB[start:]
            else:
                self.send_response(200)
                body = BLOB
            if not b.no_length:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: b.fail_after])  # a short write, then the connection closes

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield Server(f"http://127.0.0.1:{httpd.server_address[1]}", behaviour)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MARCHE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MARCHE_WEIGHTS_MIRROR", raising=False)
    return tmp_path / "cache"


def part(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


# -- the downloader ------------------------------------------------------------------------


def test_complete_fetch_renames_into_place(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "vae" / "kl16.ckpt"
    assert fetch_file("vae", server.url + "/kl16.ckpt", dest, sha256=DIGEST) is True
    assert dest.read_bytes() == BLOB
    assert not part(dest).exists()
    assert server.behaviour.ranges() == [None]
    # a second fetch finds the file and asks the server nothing
    assert fetch_file("vae", server.url + "/kl16.ckpt", dest) is False
    assert len(server.behaviour.seen) == 1


def test_interrupted_download_resumes_with_range(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "kl16.ckpt"
    server.behaviour.fail_after = 2 * CHUNK
    with pytest.raises(FetchError, match=r"stopped at 131072 bytes .*rerun") as error:
        fetch_file("vae", server.url + "/f", dest)
    assert "\n" not in str(error.value)
    assert part(dest).stat().st_size == 2 * CHUNK and not dest.exists()

    server.behaviour.fail_after = None
    assert fetch_file("vae", server.url + "/f", dest) is True
    assert server.behaviour.ranges() == [None, f"bytes={2 * CHUNK}-"]
    assert dest.read_bytes() == BLOB and not part(dest).exists()


def test_server_ignoring_range_restarts_from_zero(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "kl16.ckpt"
    part(dest).write_bytes(b"x" * 1000)  # wrong bytes: appending to them would corrupt the file
    server.behaviour.honour_range = False
    assert fetch_file("vae", server.url + "/f", dest) is True
    assert server.behaviour.ranges() == ["bytes=1000-"]
    assert dest.read_bytes() == BLOB


def test_complete_part_is_finished_by_a_416(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "kl16.ckpt"
    part(dest).write_bytes(BLOB)
    assert fetch_file("vae", server.url + "/f", dest, sha256=DIGEST) is True
    assert server.behaviour.ranges() == [f"bytes={len(BLOB)}-"]
    assert dest.read_bytes() == BLOB and not part(dest).exists()


def test_short_file_is_refused_and_kept_for_resume(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "kl16.ckpt"
    server.behaviour.no_length, server.behaviour.fail_after = True, 100_000  # looks complete
    with pytest.raises(FetchError) as error:
        fetch_file("vae", server.url + "/f", dest, size=len(BLOB))
    assert str(error.value) == (
        f"vae is incomplete: 100000 of {len(BLOB)} bytes; "
        "rerun `marche weights fetch vae` to resume"
    )
    assert not dest.exists() and part(dest).stat().st_size == 100_000

    server.behaviour.no_length, server.behaviour.fail_after = False, None
    assert fetch_file("vae", server.url + "/f", dest, size=len(BLOB)) is True
    assert server.behaviour.ranges()[-1] == "bytes=100000-"
    assert dest.read_bytes() == BLOB


def test_sha256_mismatch_removes_the_download(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "kl16.ckpt"
    with pytest.raises(FetchError, match=f"has sha256 {DIGEST}, not 0{{64}}; removed"):
        fetch_file("vae", server.url + "/f", dest, sha256="0" * 64)
    assert not dest.exists() and not part(dest).exists()


def test_http_error_is_one_line(server: Server, tmp_path: Path) -> None:
    server.behaviour.status = 404
    with pytest.raises(FetchError, match=r"^127\.0\.0\.1 answered HTTP 404 Not Found for vae$"):
        fetch_file("vae", server.url + "/f", tmp_path / "kl16.ckpt")


def test_second_fetch_waits_for_the_first(server: Server, tmp_path: Path) -> None:
    import fcntl

    dest = tmp_path / "kl16.ckpt"
    results: list[bool] = []
    with open(tmp_path / "kl16.ckpt.lock", "a") as held:  # another fetch holds the lock
        fcntl.flock(held, fcntl.LOCK_EX)
        waiter = threading.Thread(
            target=lambda: results.append(fetch_file("vae", server.url, dest))
        )
        waiter.start()
        waiter.join(timeout=0.3)
        assert waiter.is_alive() and server.behaviour.seen == []  # blocked on the lock
        dest.write_bytes(BLOB)  # the other fetch completes, then releases the lock
    waiter.join(timeout=5)
    assert results == [False] and server.behaviour.seen == []  # nothing downloaded twice


# -- cache layout, mirrors, and loading without a path -----------------------------------------


def test_cache_dir_and_mirror_urls() -> None:
    assert cache_dir({"MARCHE_CACHE": "/c", "XDG_CACHE_HOME": "/x"}) == Path("/c")
    assert cache_dir({"XDG_CACHE_HOME": "/x"}) == Path("/x/marche")
    assert cache_dir({"XDG_CACHE_HOME": "relative"}) == Path.home() / ".cache" / "marche"
    assert cache_path("vae", {"MARCHE_CACHE": "/c"}) == Path("/c/vae/kl16.ckpt")
    mirror = {"MARCHE_WEIGHTS_MIRROR": "https://m.example/prefix/"}
    assert source_url("mar_base", mirror) == "https://m.example/prefix/mar_base/checkpoint-last.pth"
    assert source_url("vae", mirror) == "https://m.example/prefix/vae/kl16.ckpt"
    assert source_url("mar_huge", {}) == MANIFEST["mar_huge"].url
    assert MANIFEST["mar_huge"].url.startswith(
        "https://www.dropbox.com/scl/fi/1qmfx6fpy3k7j9vcjjs3s/"
    )


def test_find_weights_names_the_command_and_ignores_part_files(cache: Path) -> None:
    ckpt = cache_path("mar_base")
    ckpt.parent.mkdir(parents=True)
    part(ckpt).write_bytes(b"partial")
    with pytest.raises(WeightsMissing) as error:
        find_weights(["mar_base", "vae"])
    assert str(error.value) == (
        f"mar_base and vae weights not found in {cache}; "
        "run `marche weights fetch mar_base vae` (or pass --checkpoint/--vae)"
    )
    ckpt.write_bytes(b"done")
    assert find_weights(["mar_base"]) == {"mar_base": ckpt}


def test_pipeline_load_takes_mar_base_from_the_cache(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import engine.pipeline as pipeline

    loaded: dict[str, Path] = {}
    monkeypatch.setattr(pipeline, "load_mar", lambda cfg, path, dev: loaded.setdefault("mar", path))
    monkeypatch.setattr(pipeline, "load_vae", lambda path, *a: loaded.setdefault("vae", path))
    with pytest.raises(ValueError, match=r"run `marche weights fetch mar_base vae`"):
        pipeline.Pipeline.load("mar_base", device="cpu")
    for name in ("mar_base", "vae"):
        cache_path(name).parent.mkdir(parents=True, exist_ok=True)
        cache_path(name).write_bytes(b"weights")
    pipe = pipeline.Pipeline.load("mar_base", device="cpu")
    assert loaded == {"mar": cache_path("mar_base"), "vae": cache_path("vae")}
    assert pipe.name == "mar_base"
    # an explicit path still wins over the cache
    loaded.clear()
    pipeline.Pipeline.load("mar_base", checkpoint="/elsewhere.pth", device="cpu")
    assert loaded == {"mar": "/elsewhere.pth", "vae": cache_path("vae")}
    # the shipped model never looks at the cache
    assert pipeline.weight_paths("digits") == (pipeline.MODELS["digits"].weights, None)


# -- the command line ----------------------------------------------------------------------


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def test_cli_fetch_through_a_mirror_then_list(
    server: Server, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MARCHE_WEIGHTS_MIRROR", server.url + "/weights")
    result = runner.invoke(app, ["weights", "fetch", "vae", "--sha256", DIGEST.upper()])
    assert result.exit_code == 0, result.output
    assert server.behaviour.seen == [("/weights/vae/kl16.ckpt", None)]
    assert (cache / "vae" / "kl16.ckpt").read_bytes() == BLOB
    assert "vae: fetched" in result.output

    part(cache_path("mar_base")).parent.mkdir(parents=True)
    part(cache_path("mar_base")).write_bytes(b"x" * 10)
    listing = runner.invoke(app, ["weights", "list"])
    assert listing.exit_code == 0, listing.output
    rows = {line.split()[1]: line for line in listing.output.splitlines() if "│ " in line}
    assert "present" in rows["vae"] and "partial" in rows["mar_base"]
    assert "missing" in rows["mar_large"] and "missing" in rows["mar_huge"]


def test_cli_failure_is_exit_2_and_one_error_line(server: Server, cache: Path) -> None:
    url = server.url + "/kl16.ckpt"
    result = runner.invoke(app, ["weights", "fetch", "vae", "--url", url, "--sha256", "0" * 64])
    assert result.exit_code == 2
    assert len(error_lines(result.output)) == 1
    assert "removed the download" in " ".join(result.output.split())
    assert not part(cache_path("vae")).exists() and not cache_path("vae").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["fetch", "mar_giant"], "unknown weights mar_giant"),
        (["fetch", "vae", "mar_base", "--url", "http://x/y"], "one name at a time"),
        (["fetch", "vae", "--url", "file:///etc/passwd"], "is not an http(s) URL"),
        (["fetch", "vae", "--sha256", "abc"], "64 hexadecimal digits"),
    ],
)
def test_cli_rejects_bad_arguments(cache: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["weights", *args])
    assert result.exit_code == 2 and message in " ".join(result.output.split())
    assert len(error_lines(result.output)) == 1
    assert not cache.exists() or not any(cache.rglob("*.ckpt*"))


def test_generate_without_weights_names_the_fetch_command(cache: Path) -> None:
    result = runner.invoke(app, ["generate", "--model", "mar_base", "--device", "cpu"])
    assert result.exit_code == 2
    assert len(error_lines(result.output)) == 1
    assert "marche weights fetch mar_base vae" in " ".join(result.output.split())


def test_a_web_page_instead_of_the_file_is_refused(server, tmp_path):
    server.behaviour.html = True
    dest = tmp_path / "vae" / "kl16.ckpt"
    with pytest.raises(FetchError, match="a web page, not the file"):
        fetch_file("vae", server.url + "/vae/kl16.ckpt", dest)
    assert not dest.exists() and not part_path(dest).exists()
