"""Visible defects of a rendered answer: what a reader sees broken, measured the same way in every mode.

Each check looks at what the user gets (the rendered text), plus, where the answer has them, its pieces (one
thread each, in reading order, with why the thread ended) and `limits_hit`. A sequential answer has one piece, so
the checks that need chunk boundaries find nothing to flag there, and the text checks apply to every mode alike.
Definitions are in docs/spec.md ("Quality measures"):

- `tag_leak`: a tag or a piece of one in the text (`<promise`, `</async`, `<sync`, ` tokens="12`, ...);
- `hit_limit`: the answer ended on the token or context limit; `runaway`: it did so while main was still
  promising (a promise within main's last 300 characters of annotated text);
- `cut_chunk`: a chunk that ended in mid-sentence on its block budget, or where the block guard ended it (a block
  that wrote a promise: `...Salt is one of the most`);
- `glued`: two chunks touch with no whitespace between them (`...a deli.2. **Buy`, `languageAnother`), or a list
  marker stands mid-line right after a sentence end;
- `numbering`: numbered list markers out of order (1, 2, 4, 4, ...; a restart at 1 is a new list);
- `duplicate_items`: two items of one answer say nearly the same thing (the same header, or 3-word shingles with
  Jaccard similarity >= 0.5);
- `empty_item`: a list item that is only its lead: a marker, a header or a short label ending in ':' with nothing
  after it (`6. Conclusion:` at the end of an answer a guard ended).
"""

from __future__ import annotations

import re

from ..lang.tags import TAG_HEAD_RE

TOKEN_LIMITS = ("max_new_tokens", "context")
_ATTR_LEAK = re.compile(r'\b(?:topic|tokens)="')
_SENTENCE_END = re.compile(r"""[.!?:;)\]"'*`]\s*$""")
# A list marker right after a sentence end on the same line: "...deli.2. **Buy", "done. 3. Next".
_MARKER_MID_LINE = re.compile(r"[.!?:](?:[ \t]?)(\d{1,2})[.)][ \t]+(?:\*\*|[A-Z])|[.!?](?:-|\*)[ \t]+\*\*")
_LINE_MARKER = re.compile(r"^[ \t]{0,3}(\d{1,2})[.)][ \t]+\S", re.MULTILINE)
_ITEM_START = re.compile(r"^[ \t]{0,3}(?:\d{1,2}[.)]|[-*•+]|#{1,4})[ \t]+", re.MULTILINE)
_HEADER = re.compile(r"^\s*\*\*([^*\n]{2,80}?)\*\*")


def tag_leak(text: str) -> bool:
    return bool(TAG_HEAD_RE.search(text) or _ATTR_LEAK.search(text))


def runaway(raw: str, limits_hit: list[str]) -> bool:
    """Hit the token limit while main was still writing promises."""
    return any(h in TOKEN_LIMITS for h in limits_hit) and "<promise" in _main_tail(raw, 300)


def _main_tail(raw: str, chars: int) -> str:
    """The last `chars` characters of main's annotated text (blocks removed)."""
    main = re.sub(r"<async>.*?(?:</async>|$)", "", raw, flags=re.DOTALL)
    return main[-chars:]


CUTTING = ("budget", "block_guard")  # why a block ended that can leave its last sentence unfinished


def cut_chunks(pieces: list[dict]) -> int:
    return sum(1 for p in pieces if p.get("finish") in CUTTING and p.get("thread", 0) != 0
               and p["text"].strip() and not _SENTENCE_END.search(p["text"]))


def glued(text: str, pieces: list[dict]) -> bool:
    for a, b in zip(pieces, pieces[1:]):
        left, right = a["text"], b["text"]
        if left and right and not left[-1].isspace() and not right[0].isspace() and right[0] not in ",.;:!?)]'\"":
            return True
    return bool(_MARKER_MID_LINE.search(text))


def numbering_broken(text: str) -> bool:
    """Numbered markers at line starts (and glued mid-line ones) must count up by one; 1 starts a new list."""
    marks = sorted([(m.start(), int(m.group(1))) for m in _LINE_MARKER.finditer(text)]
                   + [(m.start(), int(m.group(1))) for m in _MARKER_MID_LINE.finditer(text) if m.group(1)])
    prev = None
    for _, n in marks:
        if prev is not None and n != prev + 1 and n != 1:
            return True
        prev = n
    return False


def items(text: str) -> list[str]:
    """The answer's list items (from one marker to the next) or, without a list, its paragraphs."""
    starts = [m.start() for m in _ITEM_START.finditer(text)]
    if len(starts) >= 2:
        bounds = starts + [len(text)]
        return [text[a:b].strip() for a, b in zip(bounds, bounds[1:]) if text[a:b].strip()]
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def _shingles(s: str, n: int = 3) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", s.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def duplicate_items(text: str, threshold: float = 0.5) -> int:
    """Items that nearly repeat an earlier item of the same answer."""
    its = [_ITEM_START.sub("", x, count=1) for x in items(text)]
    heads = [(_HEADER.match(x).group(1).strip(" :").lower() if _HEADER.match(x) else None) for x in its]
    sh = [_shingles(x) for x in its]
    dup = 0
    for j in range(1, len(its)):
        for i in range(j):
            same_head = heads[j] is not None and heads[j] == heads[i]
            inter = len(sh[i] & sh[j])
            union = len(sh[i] | sh[j])
            if same_head or (union and min(len(sh[i]), len(sh[j])) >= 3 and inter / union >= threshold):
                dup += 1
                break
    return dup


_LEAD_ONLY = re.compile(r"^(?:\*\*[^*\n]*\*\*|[^\n]{0,60}:)?[\s:*_.-]*$")


def empty_items(text: str) -> int:
    """List items with nothing after their marker and header (or a label ending in ':'). An item followed by a
    deeper or different marker (`1. **Step**:` then `   - sub-item`) has sub-items and is not empty."""
    marks = list(_ITEM_START.finditer(text))
    if len(marks) < 2:
        return 0
    n = 0
    for k, m in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else len(text)
        if not _LEAD_ONLY.match(text[m.end():end].strip()):
            continue
        if k + 1 < len(marks) and _shape(marks[k + 1].group()) != _shape(m.group()):
            continue
        n += 1
    return n


def _shape(marker: str) -> tuple[int, str]:
    """Indent and kind (number, bullet or heading) of a list marker."""
    body = marker.lstrip(" \t")
    kind = "n" if body[:1].isdigit() else body[:1]
    return len(marker) - len(body), kind


def defects(text: str, raw: str = "", pieces: list[dict] | None = None, limits_hit: list[str] | None = None) -> dict:
    """All checks for one answer: booleans, plus counts where there can be several."""
    pieces = pieces or [{"thread": 0, "text": text, "finish": ""}]
    limits_hit = limits_hit or []
    cut = cut_chunks(pieces)
    dup = duplicate_items(text)
    return {
        "tag_leak": tag_leak(text),
        "hit_limit": any(h in TOKEN_LIMITS for h in limits_hit),
        "runaway": runaway(raw or text, limits_hit),
        "cut_chunk": cut > 0,
        "cut_chunks": cut,
        "glued": glued(text, pieces),
        "numbering": numbering_broken(text),
        "duplicate_items": dup > 0,
        "duplicates": dup,
        "empty_item": empty_items(text) > 0,
    }


DEFECTS = ("tag_leak", "hit_limit", "runaway", "cut_chunk", "glued", "numbering", "duplicate_items", "empty_item")
