"""Real long documents, prose and code, for quality and needle-in-a-haystack tests.

Machines here reach only PyPI and Debian's archive, so every document comes from one of:
  * the Python standard library (always there): real code, and a Language Reference
    section that pydoc ships;
  * small Debian packages (main, freely licensed).  They are not installed system-wide:
    ``ensure_installed()`` runs ``apt-get download`` and unpacks the .deb with
    ``dpkg-deb -x`` into ``$VLLM_HGA_CACHE/debs`` (default ``~/.cache/vllm-hga``).  That
    needs no root once apt's package lists exist, pulls no dependencies (dict-devil
    would otherwise bring the dictd daemon), and leaves the system untouched.  A package
    installed with ``apt-get install`` is used too.

Every document is at least MIN_CHARS characters (>= 8K tokens for SmolLM2's tokenizer).

    python -m devkit.texts        # fetch what is missing, then list the documents
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MIN_CHARS = 40_000


class MissingDocumentError(RuntimeError):
    """A document's source is not on this machine. The message says how to get it."""


@dataclass(frozen=True)
class Document:
    name: str
    kind: str  # "prose" or "code"
    author: str
    source: str  # the work, its licence, and the package/file it is read from
    load: Callable[[], str]
    deb: str | None = None  # Debian package that ships it, if any


# ------------------------------------------------------------------ Debian packages
def _deb_cache() -> Path:
    env = os.environ.get("VLLM_HGA_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "vllm-hga") / "debs"


def _deb_file(package: str, path: str) -> Path:
    """``path`` as shipped by ``package``: installed system-wide or unpacked in the cache."""
    for root in (Path("/"), _deb_cache() / package):
        candidate = root / path.lstrip("/")
        if candidate.is_file():
            return candidate
    raise MissingDocumentError(
        f"{path} (Debian package {package}) is missing: run "
        f"`python -m devkit.texts` (apt-get download + dpkg-deb -x into "
        f"{_deb_cache()}), or `apt-get install -y --no-install-recommends {package}`"
    )


def _fetch_deb(package: str) -> None:
    """Unpack ``package``'s .deb into the cache, atomically (temp dir, then rename)."""
    dest = _deb_cache() / package
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = ["apt-get", "download", "-q", package]
        run = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        if run.returncode != 0 and os.geteuid() == 0:
            # A fresh image has empty package lists; "apt-get download" needs them.
            subprocess.run(["apt-get", "update", "-q"], capture_output=True)
            run = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob(f"{package}_*.deb"))
        if run.returncode != 0 or not debs:
            raise MissingDocumentError(
                f"`apt-get download {package}` failed ({run.stderr.strip()[-300:]}); "
                f"run `apt-get update` as root first, or "
                f"`apt-get install -y --no-install-recommends {package}`"
            )
        unpacked = Path(tmp) / "root"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], check=True)
        try:
            os.rename(unpacked, dest)
        except OSError:  # a concurrent fetch got there first
            if not dest.is_dir():
                raise


def _gunzip(package: str, path: str) -> str:
    # .gz and dictd's .dict.dz are both gzip streams.
    with gzip.open(_deb_file(package, path), "rt", encoding="utf-8") as f:
        return f.read()


def _devils_dictionary() -> str:
    text = _gunzip("dict-devil", "/usr/share/dictd/devil.dict.dz")
    # Drop dictfmt's header entries (00-database-*) before the book and its alphabet
    # line after it: what remains is the book, preface to ZOOLOGY.
    start = text.rfind("\n", 0, text.index("The Internet Wiretap")) + 1
    body = text[start:].rstrip()
    if body.endswith("abcdefghijklmnopqrstuvwxyz"):
        body = body.rsplit("\n", 1)[0].rstrip()
    return body + "\n"


# ------------------------------------------------------------------ standard library
def _stdlib_source(module: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise MissingDocumentError(f"the standard library module {module} has no .py source here")
    return Path(spec.origin).read_text(encoding="utf-8")


def _python_special_methods() -> str:
    # One whole section of the Language Reference as pydoc's help ships it.  (Not all
    # topics joined: they overlap, e.g. "compound" contains "if", and repeated text
    # would flatter perplexity.)
    from pydoc_data.topics import topics

    return topics["specialnames"]


_JARGON = "/usr/share/doc/jargon-text/jargon.txt.gz"
_GNU_STANDARDS = "/usr/share/doc/gnu-standards/standards.text.gz"

DOCUMENTS: dict[str, Document] = {
    d.name: d
    for d in [
        Document(
            "devils_dictionary",
            "prose",
            "Ambrose Bierce",
            "The Devil's Dictionary (1911, public domain); Debian dict-devil, "
            "/usr/share/dictd/devil.dict.dz",
            _devils_dictionary,
            deb="dict-devil",
        ),
        Document(
            "jargon_file",
            "prose",
            "Eric S. Raymond (ed.), Guy Steele et al.",
            f"The Jargon File 4.4.7 (public domain); Debian jargon-text, {_JARGON}",
            lambda: _gunzip("jargon-text", _JARGON),
            deb="jargon-text",
        ),
        Document(
            "gnu_coding_standards",
            "prose",
            "Richard Stallman et al. (FSF)",
            f"GNU Coding Standards (GFDL); Debian gnu-standards, {_GNU_STANDARDS}",
            lambda: _gunzip("gnu-standards", _GNU_STANDARDS),
            deb="gnu-standards",
        ),
        Document(
            "python_special_methods",
            "prose",
            "the Python documentation authors",
            "The Python Language Reference, 3.3 'Special method names' (PSF License); "
            "stdlib pydoc_data/topics.py",
            _python_special_methods,
        ),
        Document(
            "argparse_py",
            "code",
            "Steven Bethard",
            "argparse.py (PSF License); Python standard library",
            lambda: _stdlib_source("argparse"),
        ),
        Document(
            "difflib_py",
            "code",
            "Tim Peters",
            "difflib.py (PSF License); Python standard library",
            lambda: _stdlib_source("difflib"),
        ),
        Document(
            "pydecimal_py",
            "code",
            "Eric Price, Facundo Batista, Raymond Hettinger, Aahz, Mark Dickinson",
            "_pydecimal.py (PSF License); Python standard library",
            lambda: _stdlib_source("_pydecimal"),
        ),
    ]
}

# What CI must fetch (ensure_installed() does it): apt-get download of these packages.
DEB_PACKAGES = sorted({d.deb for d in DOCUMENTS.values() if d.deb})


def load_text(name: str) -> str:
    """The full text of the document ``name``; MissingDocumentError says how to get it."""
    try:
        doc = DOCUMENTS[name]
    except KeyError:
        raise KeyError(f"no document {name!r}; known: {', '.join(DOCUMENTS)}") from None
    return doc.load()


def available_documents() -> list[str]:
    """Names of the documents whose source is on this machine now."""
    names = []
    for name, doc in DOCUMENTS.items():
        try:
            doc.load()
        except MissingDocumentError:
            continue
        names.append(name)
    return names


def ensure_installed() -> None:
    """Fetch every missing Debian-sourced document (apt-get download + dpkg-deb -x)."""
    for package in DEB_PACKAGES:
        docs = [d for d in DOCUMENTS.values() if d.deb == package]
        try:
            for d in docs:
                d.load()
        except MissingDocumentError:
            _fetch_deb(package)


if __name__ == "__main__":
    try:
        ensure_installed()
    except MissingDocumentError as e:
        sys.exit(f"error: {e}")
    for name, doc in DOCUMENTS.items():
        print(
            f"{name:22} {doc.kind:5} {len(load_text(name)):>9,} chars  {doc.author}: {doc.source}"
        )
