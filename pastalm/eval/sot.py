"""Skeleton-of-Thought (Ning et al., 2024) as a baseline mode on pastalm's own engine.

Two stages, both timed:
1. skeleton: the model is asked for a short numbered outline of its answer (sequential decoding);
2. expansion: the points are parsed from that outline and expanded in parallel through the same fork machinery
   PASTA uses. Main's script is one promise per point (nothing else); each block's script is the point's own
   header ("2. Point text:"), a forced prefix after which the block decodes freely until EOS or its budget.
   The interpreter's visibility rules apply unchanged: block k sees the expansion prompt, main's promises up
   to its own, and its header, never another block.

The answer is the blocks' text joined in point order. When no point can be parsed from the skeleton, the mode
falls back to answering sequentially (reported as `fallback`), as the SoT paper's router would.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, replace

from ..engine import Engine, GenerateConfig
from ..lang.tags import promise_tag
from ..models import chat_prompt

SKELETON_PROMPT = (
    "Do not answer the question yet. Write only the skeleton of a good answer: a numbered list of 3 to 8 "
    "points, each point 3 to 6 words, one point per line, nothing else.\n\nQuestion: {question}"
)

EXPAND_PROMPT = (
    "Question: {question}\n\nThe answer is organised in these points:\n{skeleton}\n\n"
    "Write the point you are given in one or two short sentences. Write only that point."
)

# A point line: "1.", "1)", "(1)", "Step 1:", "Point 1 -", "-", "*", "•", optionally bolded.
_POINT_RE = re.compile(
    r"^\s*(?:\*\*)?\s*(?:(?:step|point)\s*\d+\s*[:.)-]|\(?\d{1,2}\s*[.):]|[-*•+])\s*(?:\*\*)?\s*(?P<text>.*\S)?\s*$",
    re.IGNORECASE,
)


def parse_points(skeleton: str, max_points: int = 10, max_words: int = 12) -> list[str]:
    """The points of a skeleton, in order, without their numbers or markup.

    Accepts numbered (`1.`, `1)`, `(1)`, `Step 1:`), bulleted and bolded lines; skips an intro line before the
    list, blank lines, empty items and repeats; trims a point to `max_words` words and stops at `max_points`.
    A skeleton without any list line gives no points."""
    points: list[str] = []
    seen: set[str] = set()
    for line in skeleton.splitlines():
        m = _POINT_RE.match(line)
        if m is None or not m.group("text"):
            continue
        text = m.group("text").replace("**", "").replace("__", "").strip(" :-–—*\t")
        text = re.sub(r"\s+", " ", text)
        if not text or not re.search(r"\w", text):
            continue
        words = text.split(" ")
        if len(words) > max_words:
            text = " ".join(words[:max_words])
        key = text.lower().rstrip(".")
        if key in seen:
            continue
        seen.add(key)
        points.append(text)
        if len(points) >= max_points:
            break
    return points


@dataclass
class SoTResult:
    """One Skeleton-of-Thought answer and its measures (the fields `Result.to_json` has, plus the stages)."""

    text: str
    raw: str
    skeleton: str
    points: list[str]
    fallback: bool
    prompt_tokens: int
    tokens: int
    tag_tokens: int
    decode_steps: int
    threads: int
    theoretical_speedup: float
    wall_s: float
    skeleton_wall_s: float
    limits_hit: list[str]
    finish: list[str] = field(default_factory=list)
    pieces: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def _header(i: int, point: str) -> str:
    return ("" if i == 0 else "\n") + f"{i + 1}. {point.rstrip('.:')}:"


def sot_generate(engine: Engine, question: str, config: GenerateConfig, system: str | None = None,
                 skeleton_tokens: int = 120, point_tokens: int = 60, max_points: int = 8) -> SoTResult:
    """Answer `question` with Skeleton-of-Thought on `engine` (see the module docstring).

    The skeleton has its own limit (`skeleton_tokens`); `config.max_new_tokens` bounds the answer (all points
    together, as it bounds the other modes' answers); each point may take `config.async_factor * point_tokens`
    tokens."""
    tok = engine.tokenizer
    t0 = time.perf_counter()
    sk_cfg = replace(config, sequential=True, max_new_tokens=skeleton_tokens)
    sk = engine.generate(chat_prompt(tok, SKELETON_PROMPT.format(question=question), system), sk_cfg)
    skeleton_wall = time.perf_counter() - t0
    points = parse_points(sk.text, max_points)
    left = config.max_new_tokens
    if not points:  # no usable skeleton: answer the question itself, sequentially
        res = engine.generate(chat_prompt(tok, question, system), replace(config, sequential=True, max_new_tokens=left))
        return SoTResult(res.text, res.raw, sk.text, [], True, res.prompt_tokens, res.tokens, 0,
                         sk.decode_steps + res.decode_steps, 0, 1.0, round(time.perf_counter() - t0, 4),
                         round(skeleton_wall, 4), sk.limits_hit + res.limits_hit, res.finish, res.pieces)
    listing = "\n".join(f"{i + 1}. {p}" for i, p in enumerate(points))
    prompt_ids = chat_prompt(tok, EXPAND_PROMPT.format(question=question, skeleton=listing), system)
    main_script = tok.encode("".join(promise_tag(f"point {i + 1}", point_tokens) for i in range(len(points))),
                             add_special_tokens=False)
    blocks = [tok.encode(_header(i, p), add_special_tokens=False) for i, p in enumerate(points)]
    ex_cfg = replace(config, sequential=False, max_new_tokens=left + len(main_script) + sum(map(len, blocks)),
                     max_threads=max(config.max_threads, len(points)))
    ex = engine.generate(prompt_ids, ex_cfg, scripts=[main_script] + blocks, scaffold=True)
    wall = time.perf_counter() - t0
    # Main's promises are scaffolding, not answer text: the answer is the blocks; its tags are main's script.
    main_tags = len(main_script)
    generated = sk.tokens + ex.tokens + ex.tag_tokens - main_tags
    critical = sk.tokens + (ex.tokens + ex.tag_tokens) / ex.theoretical_speedup - main_tags
    return SoTResult(
        text=ex.text.strip(), raw=ex.raw, skeleton=sk.text, points=points, fallback=False,
        prompt_tokens=sk.prompt_tokens + ex.prompt_tokens, tokens=ex.tokens, tag_tokens=ex.tag_tokens - main_tags,
        decode_steps=sk.decode_steps + ex.decode_steps, threads=ex.threads,
        theoretical_speedup=round(generated / critical, 4) if critical > 0 else 1.0,
        wall_s=round(wall, 4), skeleton_wall_s=round(skeleton_wall, 4), limits_hit=sk.limits_hit + ex.limits_hit,
        finish=ex.finish, pieces=[p for p in ex.pieces if p["thread"] != 0],
    )
