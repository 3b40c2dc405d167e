"""English sentences that ship with Python itself: the docstrings of a fixed list of stdlib modules.

Text models (Hugging Face sentence encoders) need calibration and evaluation text, and nothing may be
downloaded at run time; every Python install carries thousands of hand-written English sentences in
its standard library's docstrings. They are split into sentences, filtered (prose only, no doctest
or code lines), de-duplicated, and split into three disjoint sets by a hash of each sentence, so a
sentence always lands in the same set whatever else is found:

    from amc.data import text_sentences
    calib = text_sentences("calibration", n=256)   # to calibrate / reconstruct on
    held = text_sentences("heldout", n=512)        # to measure agreement with the original on
    retr = text_sentences("retrieval", n=256)      # a corpus for nearest-neighbour agreement

The exact sentences depend on the Python version (docstrings change between releases), not on
the order modules are walked, the machine, or a seed.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import re
import sys
import warnings
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

from ..errors import DataError

#: The stdlib modules whose docstrings (module, public classes, functions and methods) are read.
#: Pure-Python modules with prose docstrings, importable on every platform.
TEXT_MODULES: Tuple[str, ...] = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "email", "enum", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext",
    "glob", "gzip", "heapq", "hmac", "html", "http.client", "http.server", "imaplib", "inspect",
    "ipaddress", "json", "logging", "mailbox", "mimetypes", "numbers", "optparse", "os", "pathlib",
    "pickle", "pkgutil", "platform", "poplib", "pprint", "queue", "random", "re", "sched", "secrets",
    "selectors", "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver", "statistics",
    "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
    "trace", "traceback", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings",
    "wave", "weakref", "xml.dom.minidom", "zipfile",
)

#: The three disjoint sets and the share of sentences each receives (by hash, so stable).
SPLITS: Dict[str, float] = {"calibration": 0.4, "heldout": 0.4, "retrieval": 0.2}

MIN_WORDS, MAX_WORDS = 6, 40
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE_HINT = re.compile(r">>>|\.\.\.|::|[{}\[\]<>=\\|`#@$]|\w\(|\w_\w|--|\*\*|^\W")


def _docstrings(module_name: str) -> List[str]:
    """Module docstring plus those of its public classes, functions and methods defined in it."""
    try:
        mod = importlib.import_module(module_name)
    except ImportError:
        return []
    docs = [inspect.getdoc(mod) or ""]
    with warnings.catch_warnings():  # deprecated aliases (typing.re) warn when touched
        warnings.simplefilter("ignore", DeprecationWarning)
        members = sorted(vars(mod).items())
        for name, obj in members:
            _add_docs(mod, name, obj, docs)
    return [d for d in docs if d]


def _add_docs(mod: object, name: str, obj: object, docs: List[str]) -> None:
    """Append the docstrings of one public class (and its methods) or function defined in `mod`."""
    if name.startswith("_") or getattr(obj, "__module__", None) != getattr(mod, "__name__", None):
        return
    if inspect.isclass(obj) or inspect.isfunction(obj):
        docs.append(inspect.getdoc(obj) or "")
    if inspect.isclass(obj):
        for mname, member in sorted(vars(obj).items()):
            if not mname.startswith("_") and inspect.isfunction(member):
                docs.append(member.__doc__ or "")


def split_sentences(doc: str) -> List[str]:
    """Prose sentences of one docstring: paragraphs joined, split at . ! ? before a capital, and kept
    only when they look like English (MIN_WORDS..MAX_WORDS words, no code-like characters)."""
    out = []
    for para in re.split(r"\n\s*\n", doc):
        lines = [ln.strip() for ln in para.splitlines()]
        if any(ln.startswith((">>>", "$", "-", "*", "+", "|")) or ln.endswith(":") for ln in lines):
            continue  # doctest, shell, lists, tables, headers: not prose
        text = " ".join(ln for ln in lines if ln)
        for s in _SENTENCE_END.split(text):
            s = s.strip()
            words = s.split()
            if not (MIN_WORDS <= len(words) <= MAX_WORDS) or not s[0].isupper() or s[-1] not in ".!?":
                continue
            if _CODE_HINT.search(s) or sum(c.isalpha() for c in s) < 0.7 * len(s):
                continue
            out.append(s)
    return out


def _bucket(sentence: str) -> str:
    h = int.from_bytes(hashlib.sha256(sentence.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64
    acc = 0.0
    for name, share in SPLITS.items():
        acc += share
        if h < acc:
            return name
    return name


@lru_cache(maxsize=1)
def _all_sentences() -> Dict[str, Tuple[str, ...]]:
    seen = set()
    for module_name in TEXT_MODULES:
        for doc in _docstrings(module_name):
            seen.update(split_sentences(doc))
    buckets: Dict[str, List[str]] = {name: [] for name in SPLITS}
    for s in seen:
        buckets[_bucket(s)].append(s)
    # order within a set: by hash too, so any prefix (n=...) is a fair sample, not alphabetical
    return {k: tuple(sorted(v, key=lambda s: hashlib.sha256(b"order" + s.encode("utf-8")).digest()))
            for k, v in buckets.items()}


def text_sentences(split: str = "calibration", n: Optional[int] = None) -> List[str]:
    """The first `n` (all when None) sentences of one set: "calibration", "heldout" or "retrieval".

    Sets are disjoint and de-duplicated; a smaller `n` is a prefix of a larger one.
    """
    if split not in SPLITS:
        raise DataError(f"unknown text split {split!r}; use one of {list(SPLITS)}")
    sentences = _all_sentences()[split]
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise DataError(f"n must be a positive int or None, got {n!r}")
        if n > len(sentences):
            raise DataError(f"asked for {n} {split} sentences but Python {sys.version.split()[0]}'s "
                            f"docstrings give only {len(sentences)}; ask for fewer")
        sentences = sentences[:n]
    return list(sentences)


def text_split_sizes() -> Dict[str, int]:
    """How many sentences each set holds on this Python version."""
    return {k: len(v) for k, v in _all_sentences().items()}
