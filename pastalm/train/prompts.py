"""The prompt sets shipped with pastalm (see scripts/make_prompts.py for how they are written).

Each line of `pastalm/data/prompts/{train,eval}.jsonl` is an object with `id`, `prompt`, `category`,
`parallel` (does the ask have independent parts), `template` and `topic`. Load them with `load_prompts("train")`
or, as a `datasets.Dataset`, with `datasets.load_dataset("json", data_files=prompt_file("train"))`.
"""

from __future__ import annotations

from pathlib import Path

from .io import DataError, read_jsonl

DATA = Path(__file__).resolve().parent.parent / "data" / "prompts"
SPLITS = ("train", "eval")
PARALLEL_CATEGORIES = ("tips", "list", "steps", "comparison", "pros_cons", "multi_part", "outline")
SERIAL_CATEGORIES = ("fact", "arithmetic", "definition", "poem", "yes_no")


def prompt_file(split_or_path: str) -> Path:
    """Path of a shipped split ('train', 'eval') or of a user's JSONL file."""
    if split_or_path in SPLITS:
        return DATA / f"{split_or_path}.jsonl"
    return Path(split_or_path)


def load_prompts(split_or_path: str = "train", limit: int | None = None) -> list[dict]:
    """Prompt records of a shipped split or a JSONL file. A user file needs `prompt`; the other fields default."""
    path = prompt_file(split_or_path)
    rows = read_jsonl(path, required={"prompt": str})
    seen = set()
    for i, rec in enumerate(rows):
        rec.setdefault("id", f"{path.stem}-{i:04d}")
        rec.setdefault("category", "unknown")
        rec.setdefault("parallel", rec["category"] in PARALLEL_CATEGORIES)
        if rec["id"] in seen:
            raise DataError(f"{path}: duplicate id {rec['id']!r}")
        seen.add(rec["id"])
    return rows[:limit] if limit is not None else rows
