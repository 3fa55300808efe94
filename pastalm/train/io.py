"""JSONL reading and writing with errors that name the file, the line and what is wrong."""

from __future__ import annotations

import json
from pathlib import Path


class DataError(ValueError):
    """A malformed input file: the message names the file, the line and the problem."""


def read_jsonl(path: str | Path, required: dict[str, type] | None = None) -> list[dict]:
    """Records of a JSONL file; every record must be an object holding the `required` fields with those types."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            for key, typ in (required or {}).items():
                if key not in rec:
                    raise DataError(f"{path}:{lineno}: missing field '{key}'")
                if not isinstance(rec[key], typ) or (typ is str and not rec[key].strip()):
                    want = "a non-empty string" if typ is str else typ.__name__
                    raise DataError(f"{path}:{lineno}: field '{key}' must be {want}, got {rec[key]!r:.60}")
            rows.append(rec)
    return rows


def append_jsonl(path: str | Path, rec: dict) -> None:
    with Path(path).open("a", encoding="utf-8") as f:
        f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, rows) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for rec in rows:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
