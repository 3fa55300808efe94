"""Annotators turn an existing answer into PASTA-LANG, and `check` keeps only annotations that are exact.

Two annotators share one interface, `annotate(prompt, answer) -> annotated text`:
- `StructuralAnnotator` (offline, the default): list items, steps and sections become promises with a short
  topic, each followed by its async block; a `<sync/>` goes before trailing text that refers back to them.
- `TeacherAnnotator` (`pastalm.train.teacher`): asks any OpenAI-compatible chat endpoint.

`check` validates an annotation against the original answer (it parses, every promise has a closed block,
`render(annotated) == answer` exactly, no empty block) and rewrites every `tokens` attribute to the real token
count of its chunk in the model's tokenizer, optionally rounded up to a bucket. Invalid annotations are
dropped and counted by reason by `annotate_records`; they are never trained on.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

from tqdm.auto import tqdm

from ..lang.render import CHUNK, CLOSE, OPEN, PROMISE, segments, validate
from ..lang.tags import ASYNC_CLOSE, ASYNC_OPEN, SYNC, parse_promise, promise_tag


class Annotator(Protocol):
    name: str

    def annotate(self, prompt: str, answer: str) -> str:
        """The answer with PASTA-LANG tags inserted (it may be invalid; `check` decides)."""


# A top-level item start: "1. ", "2) ", "- ", "* ", "• ", "IV. ", or a markdown heading.
_ITEM = re.compile(r"(?P<indent>[ \t]{0,3})(?:(?P<num>\d{1,2})[.)]|(?P<bullet>[-*•+])|(?P<roman>[IVX]{1,4})\.|(?P<head>#{1,4}))[ \t]+\S")
# Text after the last item that refers back to the items: it must see them, so a sync goes before it.
_REFERS_BACK = re.compile(
    r"\b(these|those|above|following|listed|in summary|to summari[sz]e|in conclusion|overall|by (following|"
    r"implementing|using|incorporating|applying|taking)|each of|all of th)\b", re.IGNORECASE)
# An item that computes from or points at another item: the list is a chain, not independent parts.
_DEPENDS = re.compile(r"\d\s*=|=\s*\d|\b(previous|the result|this result|step \d|steps \d|from step|above)\b",
                      re.IGNORECASE)
_TOPIC_SPLIT = re.compile(r"[:.,;!?()\[\]—–-]\s")
_BAD_TOPIC = re.compile(r'["<>*_`#]')


def _kind(m: re.Match) -> str:
    for k in ("num", "bullet", "roman", "head"):
        if m.group(k):
            return k if k != "bullet" else "bullet" + m.group(k)
    return ""


_STOP = {"a", "an", "the", "and", "or", "of", "on", "in", "to", "for", "with", "your", "you", "is", "are", "it"}


def topic_of(item: str, max_words: int = 2) -> str:
    """A short topic for a list item: its bold lead if any, else its first few words."""
    body = _ITEM.match(item)
    text = item[body.end() - 1:] if body else item
    bold = re.match(r"\s*\*\*(.+?)\*\*", text)
    lead = bold.group(1) if bold else _TOPIC_SPLIT.split(text.strip() + " ", maxsplit=1)[0]
    words = _BAD_TOPIC.sub("", lead).split()[:max_words + 1]
    while len(words) > max_words or (len(words) > 1 and words[-1].lower() in _STOP):
        words.pop()
    return " ".join(words).strip(" :.,;").lower()


@dataclass
class StructuralAnnotator:
    """Offline annotator for lists, steps, outlines and multi-paragraph answers.

    A list (>= `min_items` items of the same marker at the same indent) becomes one promise per item; an
    item runs to the next item start, and the last item to the first blank line followed by unindented text.
    The whitespace after an item stays inside its chunk, so main writes promises back to back. Without a
    list, an answer of >= `min_paragraphs` long prose paragraphs has its middle paragraphs annotated (the
    first stays in main as the introduction). Items shorter than `min_chars` on average are left alone: a
    promise costs main about a dozen tokens, so a short chunk is not worth one.

    `scheme` picks the annotation (docs/spec.md, "Annotation schemes"):
    - "v2" (the default): each item's *lead* stays in main, on the critical path, before its promise: the list
      marker and number and the item's header (`2. **Design**:`), or its first clause or first words when it
      has no header; so is the whitespace between items. The block holds only the body. Numbering, layout and
      the outline are written in order by main, every block sees the leads of all earlier items, and no two
      chunks can touch. Topics are the lead's key words, distinct within an answer.
    - "v3": v2 without topics (`<promise tokens="N"/>`): the lead main has just written names the item, so a topic
      only repeats it on the critical path (about 5 tokens a promise).
    - "v1": the whole item, its marker and the whitespace after it, is the block; topics are two words."""

    name = "structural"
    min_items: int = 2
    min_chars: int = 50
    min_paragraphs: int = 3
    min_paragraph_chars: int = 160
    scheme: str = "v2"
    lead_words: int = 4  # v2: an item without a header or short first clause keeps this many words in main

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"annotation scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")

    def annotate(self, prompt: str, answer: str) -> str:
        lists = self._lists(answer)
        if lists:
            return self._emit(answer, lists)
        return self._paragraphs(answer)

    # --- lists -----------------------------------------------------------------------------------------
    def _lists(self, answer: str) -> list[list[tuple[int, int]]]:
        """Lists as [(start, end) char span of each item]."""
        lines = answer.splitlines(keepends=True)
        offs = [0]
        for ln in lines:
            offs.append(offs[-1] + len(ln))
        starts = []  # (line index, kind, indent, number)
        for i, ln in enumerate(lines):
            m = _ITEM.match(ln)
            if m:
                starts.append((i, _kind(m), len(m.group("indent")), int(m.group("num")) if m.group("num") else None))
        # Only the outermost items count: deeper ones (sub-bullets) stay inside their parent item.
        if starts:
            top = min(s[2] for s in starts)
            starts = [s for s in starts if s[2] == top]
        # Group consecutive starts of the same kind into lists; a numbered list restarting at 1 is new.
        groups: list[list[tuple]] = []
        for s in starts:
            g = groups[-1] if groups else None
            if g and s[1:3] == g[-1][1:3] and not (s[3] == 1 and g[-1][3] is not None) \
                    and not self._breaks(lines, g[-1][0], s[0], s[2]):
                g.append(s)
            else:
                groups.append([s])
        out = []
        for gi, g in enumerate(groups):
            if len(g) < self.min_items:
                continue
            spans = []
            stop = groups[gi + 1][0][0] if gi + 1 < len(groups) else len(lines)  # the next list's first item
            for k, (i, _, indent, _) in enumerate(g):
                end_line = g[k + 1][0] if k + 1 < len(g) else min(self._item_end(lines, i, indent), stop)
                spans.append((offs[i], offs[end_line]))
            if sum(e - s for s, e in spans) / len(spans) < self.min_chars:
                continue
            if any(_DEPENDS.search(answer[s:e]) for s, e in spans):
                continue
            out.append(spans)
        return out

    @staticmethod
    def _breaks(lines, a: int, b: int, indent: int) -> bool:
        """Between two item starts, an unindented paragraph after a blank line that ends with ':' (a heading
        for what follows) ends the list."""
        blank = False
        for ln in lines[a + 1:b]:
            if not ln.strip():
                blank = True
            elif blank and len(ln) - len(ln.lstrip()) <= indent and ln.rstrip().endswith(":"):
                return True
        return False

    @staticmethod
    def _item_end(lines, i: int, indent: int) -> int:
        """Line index one past the last item's end (its trailing blank lines included)."""
        j = i + 1
        while j < len(lines):
            ln = lines[j]
            if not ln.strip():
                k = j
                while k < len(lines) and not lines[k].strip():
                    k += 1
                if k == len(lines) or len(lines[k]) - len(lines[k].lstrip()) <= indent:
                    return k
                j = k
            else:
                j += 1
        return j

    def _emit(self, answer: str, lists: list[list[tuple[int, int]]]) -> str:
        out, pos = [], 0
        for spans in lists:
            out.append(answer[pos:spans[0][0]])
            topics: set[str] = set()
            for k, (s, e) in enumerate(spans):
                if self.scheme != "v1":
                    out.append(self._item_v2(answer[s:e], k, topics))
                    continue
                out.append(promise_tag(topic_of(answer[s:e]) or f"part {k + 1}", 1))
                out.append(ASYNC_OPEN + answer[s:e] + ASYNC_CLOSE)
            pos = spans[-1][1]
            rest = answer[pos:]
            if rest.strip() and _REFERS_BACK.search(rest.split("\n\n", 1)[0]):
                out.append(SYNC)
        out.append(answer[pos:])
        return "".join(out)

    # --- paragraphs ------------------------------------------------------------------------------------
    def _paragraphs(self, answer: str) -> str:
        parts = re.split(r"(?<=\n\n)", answer)  # each paragraph keeps its trailing blank line
        if len(parts) < self.min_paragraphs:
            return answer
        middle = parts[1:-1] if len(parts) > self.min_paragraphs else parts[1:]
        if any(len(p.strip()) < self.min_paragraph_chars or "\n" in p.strip() for p in middle):
            return answer
        out = [parts[0]]
        topics: set[str] = set()
        for k, p in enumerate(middle):
            if self.scheme != "v1":
                out.append(self._item_v2(p, k, topics))
                continue
            out.append(promise_tag(topic_of(p) or f"part {k + 1}", 1) + ASYNC_OPEN + p + ASYNC_CLOSE)
        if len(parts) > len(middle) + 1:
            last = parts[-1]
            if _REFERS_BACK.search(last):
                out.append(SYNC)
            out.append(last)
        return "".join(out)


    # --- v2 --------------------------------------------------------------------------------------------
    def _item_v2(self, item: str, k: int, topics: set[str]) -> str:
        """One item (or paragraph) in the v2 scheme: lead in main, promise, body in the block, trailing whitespace
        in main. An item with nothing after its lead stays main text."""
        cut = lead_end(item, self.lead_words)
        lead, rest = item[:cut], item[cut:]
        body = rest.rstrip()
        if not body.strip():
            return item
        topic = None if self.scheme == "v3" else distinct_topic(lead_topic(lead) or topic_of(item, 4), item, k,
                                                                  topics)
        return lead + promise_tag(topic, 1) + ASYNC_OPEN + body + ASYNC_CLOSE + rest[len(body):]


SCHEMES = ("v2", "v3", "v1")
_CLAUSE_END = re.compile(r"[:,;.!?]")


def lead_end(item: str, words: int = 4) -> int:
    """Where an item's lead ends (v2): after its marker, a markdown heading line, a bold header (with the colon that
    follows it), a first clause ending in ':' within 8 words, one ending in ',' within 6 words, or else the first
    `words` words. Whitespace after the lead belongs to the body."""
    m = _ITEM.match(item)
    start = m.end() - 1 if m else len(item) - len(item.lstrip())
    if m and m.group("head"):
        nl = item.find("\n", start)
        return nl if nl >= 0 else len(item)
    text = item[start:]
    bold = re.match(r"\*\*[^*\n]+?\*\*:?", text)
    if bold:
        return start + bold.end()
    first_line = text.split("\n", 1)[0]
    c = _CLAUSE_END.search(first_line)
    if c and c.group() in ":," and len(first_line[:c.start()].split()) <= (8 if c.group() == ":" else 6):
        return start + c.end()
    spans = [w.end() for w in re.finditer(r"\S+", first_line)]
    if not spans:
        return start
    return start + spans[min(words, len(spans)) - 1]


def lead_words(annotated: str) -> int:
    """Words main renders before an annotation's first promise (the whole answer when there is none)."""
    from ..lang import render

    cut = annotated.find("<promise")
    return len(render(annotated if cut < 0 else annotated[:cut]).split())


def lead_topic(lead: str, max_words: int = 4) -> str:
    """The key words of a lead: without its marker, markup and trailing stop words, lower-cased."""
    m = _ITEM.match(lead)
    text = lead[m.end() - 1:] if m and not m.group("head") else lead.lstrip(" \t#")
    words = _BAD_TOPIC.sub("", text).replace(":", " ").split()[:max_words + 2]
    while words and (len(words) > max_words or words[-1].lower() in _STOP):
        words.pop()
    return " ".join(words).strip(" :.,;!?").lower()


def distinct_topic(topic: str, item: str, k: int, used: set[str]) -> str:
    """Make a topic distinct within one list: a topic already used takes more of the item's words, then its
    ordinal."""
    if not topic:
        topic = f"part {k + 1}"
    if topic in used:
        longer = topic_of(item, 7)
        topic = longer if longer and longer not in used else f"{topic} {k + 1}"
    used.add(topic)
    return topic


# --- validation -------------------------------------------------------------------------------------------
@dataclass
class Checked:
    annotated: str | None  # the validated annotation with real token counts, or None when rejected
    reasons: list[str]  # why it was rejected (empty when kept)
    promises: int = 0


def bucketed(n: int, bucket: int) -> int:
    return max(1, math.ceil(n / bucket) * bucket) if bucket > 1 else max(1, n)


def check(annotated: str, original: str, tokenizer, bucket: int = 0) -> Checked:
    """Validate an annotation against the original answer and rewrite its `tokens` attributes."""
    rep = validate(annotated, original=original)
    if not rep.ok:
        return Checked(None, sorted(set(rep.reasons)))
    segs = segments(annotated)
    out = []
    for i, seg in enumerate(segs):
        if seg.kind != PROMISE:
            out.append(seg.text)
            continue
        chunk = segs[i + 2] if i + 2 < len(segs) and segs[i + 1].kind == OPEN else None
        if chunk is None or chunk.kind != CHUNK or i + 3 >= len(segs) or segs[i + 3].kind != CLOSE:
            return Checked(None, ["empty-block"])
        n = len(tokenizer.encode(chunk.text, add_special_tokens=False))
        topic, _ = parse_promise(seg.text)
        out.append(promise_tag(topic, bucketed(n, bucket)))
    fixed = "".join(out)
    assert validate(fixed, original=original).ok  # rewriting a count cannot break an annotation
    return Checked(fixed, [], rep.promises)


def annotate_records(records: list[dict], annotator: Annotator, tokenizer, bucket: int = 0,
                     progress: bool = True) -> tuple[list[dict], Counter]:
    """Annotate and check every record (`prompt`, `answer`); returns the kept records and counts by outcome.

    A kept record gains `annotated` and `promises`. An answer left without promises is kept as a serial
    example (counted as 'kept-serial'): it teaches the model when not to fork. Rejected ones are counted by
    reason, and an annotator error is counted as 'annotator-error'."""
    kept, counts = [], Counter()
    for rec in tqdm(records, desc=f"annotate ({annotator.name})", unit="answer", disable=not progress):
        try:
            annotated = annotator.annotate(rec["prompt"], rec["answer"])
        except Exception as e:  # noqa: BLE001 - a failing teacher call drops one answer, not the run
            if not counts:  # the very first call failed: a wrong URL or key, not a bad answer; stop here
                raise
            counts["annotator-error"] += 1
            counts[f"annotator-error: {type(e).__name__}"] += 1
            continue
        res = check(annotated, rec["answer"], tokenizer, bucket)
        if res.annotated is None:
            for r in res.reasons:
                counts["rejected: " + r] += 1
            counts["rejected"] += 1
            continue
        counts["kept-parallel" if res.promises else "kept-serial"] += 1
        kept.append({**rec, "annotated": res.annotated, "promises": res.promises})
    return kept, counts
