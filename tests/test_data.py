import hashlib
import http.server
import os
import threading
import zipfile
from pathlib import Path

import pytest

from shared import data

CONTENT = b"a small data file\n" * 100


def sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


@pytest.fixture
def env(tmp_path, monkeypatch):
    """An empty cache and no mirror."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(data.CACHE_ENV, str(cache))
    monkeypatch.delenv(data.MIRROR_ENV, raising=False)
    return tmp_path


def add_entry(monkeypatch, urls, content=CONTENT, **kw):
    kw.setdefault("sha256", sha(content))
    entry = data.DataFile("test-file", "test.txt", tuple(urls), **kw)
    monkeypatch.setitem(data.REGISTRY, entry.name, entry)
    return entry


def serve(tmp_path, content):
    """A file on disk and its file:// URL."""
    source = tmp_path / "served" / "remote.txt"
    source.parent.mkdir(exist_ok=True)
    source.write_bytes(content)
    return source.as_uri()


def test_download_verifies_and_caches(env, monkeypatch):
    add_entry(monkeypatch, [serve(env, CONTENT)])
    path = data.fetch("test-file", progress=False)
    assert path == env / "cache" / "test.txt"
    assert path.read_bytes() == CONTENT
    assert data.fetch("test-file") == path  # second call: from the cache
    assert [p.name for p in path.parent.iterdir()] == ["test.txt"]


def test_backup_url_is_tried(env, monkeypatch):
    missing = (env / "nowhere.txt").as_uri()
    add_entry(monkeypatch, [missing, serve(env, CONTENT)])
    assert data.fetch("test-file", progress=False).read_bytes() == CONTENT


def test_corrupt_download_leaves_nothing_behind(env, monkeypatch):
    add_entry(monkeypatch, [serve(env, b"not what was promised")], sha256=sha(CONTENT))
    with pytest.raises(data.DataUnavailableError, match="corrupt"):
        data.fetch("test-file", progress=False)
    cache = env / "cache"
    assert not cache.exists() or list(cache.iterdir()) == []


def test_offline_error_names_urls_env_var_and_file(env, monkeypatch):
    url = (env / "gone.txt").as_uri()
    add_entry(monkeypatch, [url])
    with pytest.raises(data.DataUnavailableError) as info:
        data.fetch("test-file", progress=False)
    message = str(info.value)
    for needle in [url, "LLM_DATA_MIRROR", "test.txt", "LLM_DATA_DIR"]:
        assert needle in message


def test_mirror_is_used_and_not_copied(env, monkeypatch):
    empty, mirror = env / "empty-mirror", env / "mirror"
    empty.mkdir()
    mirror.mkdir()
    (mirror / "test.txt").write_bytes(CONTENT)
    monkeypatch.setenv(data.MIRROR_ENV, os.pathsep.join([str(empty), str(mirror)]))
    add_entry(monkeypatch, [])
    assert data.fetch("test-file") == mirror / "test.txt"
    assert not (env / "cache").exists()


def test_bad_mirror_copy_is_skipped(env, monkeypatch):
    mirror = env / "mirror"
    mirror.mkdir()
    (mirror / "test.txt").write_bytes(b"tampered")
    monkeypatch.setenv(data.MIRROR_ENV, str(mirror))
    add_entry(monkeypatch, [serve(env, CONTENT)])
    with pytest.warns(UserWarning, match="bad mirror copy"):
        path = data.fetch("test-file", progress=False)
    assert path.read_bytes() == CONTENT and path.parent == env / "cache"


def test_a_bad_cached_copy_is_set_aside_not_deleted_and_fetched_again(env, monkeypatch):
    add_entry(monkeypatch, [serve(env, CONTENT)])
    (env / "cache").mkdir()
    (env / "cache" / "test.txt").write_bytes(b"half a fi")
    with pytest.warns(UserWarning, match="does not check out .*moved to .*test.txt.rejected, not deleted"):
        path = data.fetch("test-file", progress=False)
    assert path.read_bytes() == CONTENT
    # the copy that failed was perhaps the reader's own edit: it is kept, and a second one does not overwrite it
    assert (env / "cache" / "test.txt.rejected").read_bytes() == b"half a fi"
    path.write_bytes(b"an edited copy")
    with pytest.warns(UserWarning, match="moved to .*test.txt.rejected.1"):
        assert data.fetch("test-file", progress=False).read_bytes() == CONTENT
    assert (env / "cache" / "test.txt.rejected").read_bytes() == b"half a fi"
    assert (env / "cache" / "test.txt.rejected.1").read_bytes() == b"an edited copy"


def test_zip_member_is_extracted(env, monkeypatch):
    archive = env / "bundle.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("readme.txt", "other")
        z.writestr("test.txt", CONTENT)
    add_entry(monkeypatch, [archive.as_uri()], zip_member="test.txt")
    assert data.fetch("test-file", progress=False).read_bytes() == CONTENT


def test_unpinned_files_get_a_size_check(env, monkeypatch):
    add_entry(monkeypatch, [serve(env, b"tiny")], sha256=None, min_bytes=1000)
    with pytest.raises(data.DataUnavailableError, match="fewer than the 1,000"):
        data.fetch("test-file", progress=False)
    with pytest.raises(ValueError, match="needs a min_bytes"):
        data.register(data.DataFile("x", "x.txt", (), None))


def test_unknown_name_lists_the_registry():
    with pytest.raises(KeyError, match="the-verdict"):
        data.fetch("no-such-file")


def test_registry_has_the_names_chapters_use():
    needed = {"the-verdict", "tinyshakespeare", "instruction-data", "instruction-preference", "sms-spam",
              "gpt2-encoder", "gpt2-vocab-bpe", "tinystories-valid", "hellaswag-val"}
    assert needed <= set(data.REGISTRY)
    for entry in data.REGISTRY.values():
        assert entry.sha256 or entry.min_bytes > 1
        assert all(url.startswith("https://") for url in entry.urls)


def test_every_file_can_be_had_without_the_offline_mirror():
    """A reader has no mirror: every entry downloads, or ships in the repository and verifies there."""
    for entry in data.REGISTRY.values():
        assert entry.urls or entry.bundled, entry.name
        if entry.bundled:
            assert data.verify(entry, data.REPO_ROOT / entry.bundled) is None, entry.name
    with pytest.raises(ValueError, match="needs download URLs or a bundled copy"):
        data.register(data.DataFile("nowhere", "nowhere.txt", (), sha(CONTENT)))


def test_bundled_fixtures_need_no_cache_and_no_mirror(env):
    path = data.fetch("hellaswag-val-sample")
    assert path == data.REPO_ROOT / "shared" / "fixtures" / "hellaswag_val_sample.jsonl"
    assert not (env / "cache").exists()


def test_registry_matches_the_mirror_checksums():
    """Every pinned file in the offline mirror (LLM_DATA_MIRROR, set by .ci/run) verifies."""
    mirrors = [m for m in data.mirror_dirs() if (m / "SHA256SUMS").is_file()]
    if not mirrors:
        pytest.skip("LLM_DATA_MIRROR does not name a mirror with SHA256SUMS")
    sums = dict(reversed(line.split()) for line in (mirrors[0] / "SHA256SUMS").read_text().splitlines())
    pinned = [e for e in data.REGISTRY.values() if e.filename in sums]
    assert len(pinned) >= 8
    for entry in pinned:
        assert entry.sha256 == sums[entry.filename], entry.name
        expected = (data.REPO_ROOT / entry.bundled).parent if entry.bundled else mirrors[0]
        assert data.fetch(entry.name).parent == expected


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_http_download_with_progress_and_404_fallback(env, monkeypatch, capsys):
    root = Path(serve(env, CONTENT).removeprefix("file://")).parent
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: _Handler(*a, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        add_entry(monkeypatch, [f"{base}/missing.txt", f"{base}/remote.txt"])
        path = data.fetch("test-file", progress=True)
    finally:
        server.shutdown()
    assert path.read_bytes() == CONTENT
    assert "test.txt" in capsys.readouterr().err  # the progress bar, on stderr


class _RangeServer:
    """A local HTTP server of one file that honours `Range: bytes=N-` (unless `ranges` is False), and can cut
    its first answers short after `cut` bytes of body, as a dropped connection would."""

    def __init__(self, content: bytes, cut: int | None = None, ranges: bool = True, cuts: int = 1):
        self.content, self.cut, self.ranges, self.cuts_left, self.seen = content, cut, ranges, cuts, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                asked = self.headers.get("Range")
                outer.seen.append(asked)
                start = int(asked.removeprefix("bytes=").rstrip("-")) if asked and outer.ranges else 0
                body = outer.content[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(outer.content) - 1}/{len(outer.content)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.cut is not None and outer.cuts_left > 0:
                    outer.cuts_left -= 1
                    self.wfile.write(body[:outer.cut])
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/big.txt"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()


BIG = bytes(range(256)) * 400           # 102,400 bytes


def test_an_interrupted_download_resumes_where_it_stopped(env, monkeypatch):
    with _RangeServer(BIG, cut=30_000) as server:
        add_entry(monkeypatch, [server.url], content=BIG)
        with pytest.raises(data.DataUnavailableError, match="stopped at 30,000 of 102,400 bytes; fetch again"):
            data.fetch("test-file", progress=False)
        part = data.cache_dir() / "test.txt.part"
        assert part.stat().st_size == 30_000 and not (data.cache_dir() / "test.txt").exists()
        path = data.fetch("test-file", progress=False)
    assert path.read_bytes() == BIG and not part.exists()
    assert server.seen == [None, "bytes=30000-"]                # the second request asked only for the rest


def test_a_truncated_unpinned_file_is_never_accepted_by_its_size_alone(env, monkeypatch):
    # a file checked only by a minimum size, as TinyStories' 2.2 GB is: the cut copy passes min_bytes
    with _RangeServer(BIG, cut=90_000, cuts=2) as server:
        add_entry(monkeypatch, [server.url], content=BIG, sha256=None, min_bytes=50_000)
        with pytest.raises(data.DataUnavailableError, match="stopped at 90,000 of 102,400"):
            data.fetch("test-file", progress=False)
        assert not (data.cache_dir() / "test.txt").exists()
        path = data.fetch("test-file", progress=False)          # cut again, but only the rest was asked for
    assert path.read_bytes() == BIG and server.seen == [None, "bytes=90000-"]


def test_a_server_that_ignores_ranges_sends_the_whole_file_again(env, monkeypatch):
    with _RangeServer(BIG, cut=10_000, ranges=False) as server:
        add_entry(monkeypatch, [server.url], content=BIG)
        with pytest.raises(data.DataUnavailableError):
            data.fetch("test-file", progress=False)
        path = data.fetch("test-file", progress=False)
    assert path.read_bytes() == BIG                               # not the first 10,000 bytes twice
