"""Per-user signatures for checkpoint parts that can only be stored as pickles (pymoo's GA state).

Such a part runs code when it is unpickled, so it is read only when its HMAC matches a secret key kept
in the user's cache directory (created once, mode 0600): a file written by this user on this machine
resumes, a file from anywhere else is refused before anything in it runs (as Jupyter signs notebooks).
"""
from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path
from typing import Any

_KEY_FILE = Path(os.environ.get("AMC_CACHE", Path.home() / ".cache" / "amc")) / "checkpoint.key"


def _key() -> bytes:
    try:
        return _KEY_FILE.read_bytes()
    except FileNotFoundError:
        _KEY_FILE.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(_KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            return _KEY_FILE.read_bytes()
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
        return _KEY_FILE.read_bytes()


def sign(blob: bytes) -> str:
    return hmac.new(_key(), blob, hashlib.sha256).hexdigest()


def verify(blob: bytes, signature: Any) -> bool:
    return isinstance(signature, str) and hmac.compare_digest(sign(blob), signature)
