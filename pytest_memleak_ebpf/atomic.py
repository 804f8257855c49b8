"""Atomic file writes: the one helper (temp file in the same directory, then rename)."""

from __future__ import annotations

import json
import os
import tempfile

__all__ = ["write_text_atomic", "write_json_atomic"]


def write_text_atomic(path: str | os.PathLike, text: str, *, prefix: str = ".ebpf-leaks-",
                      suffix: str = ".tmp") -> None:
    """Write `text` to `path` atomically: readers see the old file or the new
    one, never a part; the temp file is removed when anything fails."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path)) or "."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_json_atomic(path: str | os.PathLike, doc, *, indent: int | None = 2, prefix: str = ".ebpf-leaks-",
                      suffix: str = ".tmp") -> None:
    """`doc` as JSON (indented, with a final newline when `indent` is set)."""
    text = json.dumps(doc, indent=indent) + ("\n" if indent is not None else "")
    write_text_atomic(path, text, prefix=prefix, suffix=suffix)
