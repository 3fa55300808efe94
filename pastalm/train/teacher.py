"""Teacher-LLM annotator: asks a model behind any OpenAI-compatible endpoint to mark up an existing answer.

The teacher gets a description of PASTA-LANG v1 (`SYSTEM_PROMPT`, with worked examples) and one answer to
annotate. It must only insert tags, never change the answer's text, so that `render(annotation) == answer`.
This module does not check that: the caller validates every annotation
(`pastalm.lang.render.validate(annotation, original=answer)`) and drops and counts the invalid ones.

Usage from the command line:

    export PASTA_TEACHER_API_KEY=sk-...          # only if the endpoint wants a key
    pasta annotate --annotator teacher --teacher-url http://host:port/v1 --teacher-model NAME ...

and from Python:

    from pastalm.train.teacher import TeacherAnnotator
    teacher = TeacherAnnotator("http://localhost:8000/v1", "Qwen2.5-72B-Instruct")
    annotated = teacher.annotate(prompt, answer)

The URL is the API root that ends in `/v1` (vLLM, llama.cpp's server, Ollama, TGI, LM Studio, OpenAI itself, ...).
The API key is read from the environment variable named by `api_key_env` (default `PASTA_TEACHER_API_KEY`).
When that variable is unset or empty the key "EMPTY" is sent instead: local servers need no key and accept any,
and an endpoint that does need one answers 401/403, which is reported as a `TeacherError` naming the variable.

Requires the `openai` package (`pip install openai`); it is imported only when a `TeacherAnnotator` is built,
so `SYSTEM_PROMPT` and `build_messages` work without it.
"""

from __future__ import annotations

import os
import re

__all__ = [
    "ANSWER_BEGIN",
    "ANSWER_END",
    "EXAMPLES",
    "PROMPT_BEGIN",
    "PROMPT_END",
    "SYSTEM_PROMPT",
    "TeacherAnnotator",
    "TeacherError",
    "build_messages",
    "strip_fence",
]


class TeacherError(RuntimeError):
    """The teacher endpoint could not produce an annotation; the message says which endpoint, what failed and
    what to do about it."""


# --------------------------------------------------------------------------------------------------------------
# The prompt

# Worked examples: (user prompt, original answer, annotated answer). render(annotated) == answer for each one
# (tests/test_teacher.py checks it), so the teacher is never shown an example that breaks the rules.
EXAMPLES: list[tuple[str, str, str]] = [
    (
        "Give me three tips for staying focused while studying.",
        "Here are three tips for staying focused:\n"
        "\n"
        "1. Put your phone in another room so notifications cannot pull you away.\n"
        "2. Work in 25-minute blocks with a five-minute break after each one.\n"
        "3. Keep water and a snack at your desk so you do not have to get up.",
        "Here are three tips for staying focused:\n"
        "\n"
        '<promise topic="phone" tokens="20"/><async>1. Put your phone in another room so notifications cannot '
        "pull you away.</async>\n"
        '<promise topic="time blocks" tokens="20"/><async>2. Work in 25-minute blocks with a five-minute break '
        "after each one.</async>\n"
        '<promise topic="snacks" tokens="20"/><async>3. Keep water and a snack at your desk so you do not have '
        "to get up.</async>",
    ),
    (
        "Should I get a cat or a dog if I live in a small apartment?",
        "Both can be happy in an apartment, but they need different things.\n"
        "\n"
        "**Cats** are independent, use a litter box and are content indoors all day, even when you work "
        "long hours.\n"
        "\n"
        "**Dogs** need walks several times a day and a lot of company; some breeds get restless in small "
        "spaces.\n"
        "\n"
        "If you are away from home most of the day, a cat is usually the easier choice.",
        "Both can be happy in an apartment, but they need different things.\n"
        "\n"
        '<promise topic="cats" tokens="30"/><async>**Cats** are independent, use a litter box and are content '
        "indoors all day, even when you work long hours.</async>\n"
        "\n"
        '<promise topic="dogs" tokens="30"/><async>**Dogs** need walks several times a day and a lot of '
        "company; some breeds get restless in small spaces.</async>\n"
        "\n"
        "<sync/>If you are away from home most of the day, a cat is usually the easier choice.",
    ),
    (
        "What is 17 times 23?",
        "17 times 23 is 391.",
        "17 times 23 is 391.",
    ),
]

PROMPT_BEGIN = "=== BEGIN USER PROMPT ==="
PROMPT_END = "=== END USER PROMPT ==="
ANSWER_BEGIN = "=== BEGIN ANSWER ==="
ANSWER_END = "=== END ANSWER ==="


def _example_block(i: int, prompt: str, answer: str, annotated: str) -> str:
    return (
        f"Example {i}\n"
        f"User prompt: {prompt}\n"
        f"Answer to annotate:\n{ANSWER_BEGIN}\n{answer}\n{ANSWER_END}\n"
        f"Your output:\n{annotated}\n"
    )


_RULES = """\
You annotate answers for PASTA-LANG v1, a markup that lets a language model write the independent parts of an
answer in parallel. You receive a user's prompt and an EXISTING answer to it. Your job is to insert tags into that
answer. You must not change, add, remove or reorder a single character of the answer itself: no rewording, no
fixing typos, no reformatting, no added or removed spaces, blank lines or newlines. If every tag is deleted from
your output, the result must be exactly the answer you were given, whitespace and newlines included.

The three tags:

1. <promise topic="T" tokens="N"/>
   Marks the place where an independent chunk goes. T is a short topic of 1 to 3 words with no double quote
   character in it. N is a positive whole number: your rough guess of the chunk's length in tokens (about 4
   characters per token; it is recomputed later, so a rough guess is fine).

2. <async>...</async>
   Wraps the chunk that keeps the promise. It must come IMMEDIATELY after its promise, with nothing between them
   (not even a space or a newline). The chunk is a piece of the answer's original text, copied exactly.

3. <sync/>
   A barrier. Put it right before any text of the answer that depends on the chunks (a summary, a conclusion, a
   comparison of the items, anything that refers back to them). Text after the last chunk that does not depend on
   the chunks needs no <sync/>.

When to make chunks:
- Good chunks are list items, tips, steps that do not need each other's results, the sections of a comparison,
  the parts of a multi-part question: pieces that could be written at the same time by different writers.
- Each chunk must make sense on its own. Its writer sees only the prompt and the answer text that comes before its
  promise, never its sibling chunks. A chunk that refers to a sibling ("as in the previous point", "unlike the
  first option") or that needs a sibling's result (step 3 uses the number computed in step 2) must not be split
  off; leave such text untagged.
- Keep text that introduces the chunks (a heading, "Here are five ideas:") before the first promise, untagged.
- Keep the newlines and blank lines between items outside the <async> blocks, as in the examples.
- Never put a tag inside another chunk: no nesting. Never split a sentence, a word or a code block.
- Answers with nothing to parallelize (a single fact, a yes/no answer, arithmetic, a definition, a short poem or
  story, one short paragraph) are returned exactly as given, with no tags at all.

Output ONLY the annotated answer: no code fences, no explanations, no comments, no headers, nothing before or
after it. The answer you receive is the text between the line "{begin}" and the line "{end}";
those marker lines, the newline right after the first and the newline right before the second are not part of
the answer, and your output contains no marker lines.
""".format(begin=ANSWER_BEGIN, end=ANSWER_END)

SYSTEM_PROMPT: str = (
    _RULES
    + "\nWorked examples follow.\n\n"
    + "\n".join(_example_block(i, p, a, t) for i, (p, a, t) in enumerate(EXAMPLES, start=1))
)


def build_messages(prompt: str, answer: str) -> list[dict]:
    """The chat request for one annotation: the system prompt, then a user message holding the user's prompt
    and the answer, each between marker lines."""
    user = (
        "Annotate the answer below with PASTA-LANG v1 tags. Insert tags only; the answer's text must stay "
        "exactly as it is.\n\n"
        f"{PROMPT_BEGIN}\n{prompt}\n{PROMPT_END}\n\n"
        f"{ANSWER_BEGIN}\n{answer}\n{ANSWER_END}\n\n"
        "Output only the annotated answer."
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


# --------------------------------------------------------------------------------------------------------------
# Reply clean-up

# A fence of 3+ backticks (optional info string) on the first line, the same fence alone on the last line.
_FENCE_RE = re.compile(r"\A\s*(`{3,})[^\n`]*\n(.*?)\n?\1[ \t]*\s*\Z", re.DOTALL)


def strip_fence(reply: str, answer: str | None = None) -> str:
    """Unwrap a code fence that encloses the whole reply (```` ```lang\\n...\\n``` ````); anything else comes back
    unchanged. When `answer` is given and itself starts with a fence, nothing is stripped: the fence is then
    the answer's own text, not the teacher's wrapping."""
    if answer is not None and answer.lstrip().startswith("```"):
        return reply
    m = _FENCE_RE.match(reply)
    return m.group(2) if m else reply


# --------------------------------------------------------------------------------------------------------------
# The annotator


class TeacherAnnotator:
    """Annotates (prompt, answer) pairs with a teacher LLM behind an OpenAI-compatible chat endpoint.

    `base_url` is the API root (usually ending in `/v1`), `model` the model name the server knows. The key is
    read from the environment variable `api_key_env`; unset or empty means the placeholder key "EMPTY", which
    local servers accept. `timeout` is seconds per request; `max_retries` is how often the client retries a
    connection error, timeout, 408/409/429 or 5xx answer (with backoff) before a `TeacherError` is raised.
    """

    name = "teacher"

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "PASTA_TEACHER_API_KEY",
        temperature: float = 0.0,
        timeout: float = 120.0,
        max_retries: int = 2,
    ):
        if not base_url:
            raise TeacherError("no teacher URL: pass --teacher-url http://host:port/v1 (an OpenAI-compatible API)")
        if not model:
            raise TeacherError(f"no teacher model for {base_url}: pass --teacher-model NAME (a model it serves)")
        try:
            import openai
        except ImportError:
            raise TeacherError(
                "the teacher annotator needs the 'openai' package: pip install openai"
            ) from None
        self._openai = openai
        self.base_url = base_url
        self.model = model
        self.api_key_env = api_key_env
        self.temperature = temperature
        key = os.environ.get(api_key_env, "")
        self.key_from_env = bool(key)
        try:
            self.client = openai.OpenAI(
                base_url=base_url,
                api_key=key or "EMPTY",
                timeout=timeout,
                max_retries=max_retries,
            )
        except openai.OpenAIError as e:
            raise TeacherError(f"cannot set up a client for teacher endpoint {base_url}: {e}") from e

    def _where(self) -> str:
        return f"teacher endpoint {self.base_url} (model {self.model!r})"

    def _key_hint(self) -> str:
        if self.key_from_env:
            return f"the key in ${self.api_key_env} was refused; check it is valid for this endpoint"
        return f"${self.api_key_env} is not set, so no real key was sent; export it with the endpoint's API key"

    def annotate(self, prompt: str, answer: str) -> str:
        """The teacher's annotation of `answer`, with a code fence around the whole reply removed. Not validated:
        the caller checks it with `pastalm.lang.render.validate(result, original=answer)`."""
        oa = self._openai
        try:
            resp = self.client.chat.completions.create(
                model=self.model,
                messages=build_messages(prompt, answer),
                temperature=self.temperature,
            )
        except oa.APITimeoutError as e:
            raise TeacherError(
                f"{self._where()} did not answer in time ({e}); the server may be overloaded or the model slow: "
                "raise the timeout or check the server"
            ) from e
        except oa.APIConnectionError as e:
            cause = e.__cause__ or e
            raise TeacherError(
                f"cannot reach {self._where()}: {type(cause).__name__}: {cause}. Check that the server is "
                "running and that --teacher-url is its API root (for example http://host:8000/v1)"
            ) from e
        except oa.APIStatusError as e:
            body = (e.response.text if e.response is not None else "")[:300]
            if e.status_code in (401, 403):
                hint = self._key_hint()
            elif e.status_code == 404:
                hint = (
                    "check that --teacher-url ends with the API root (usually /v1) and that --teacher-model "
                    "names a model this server serves"
                )
            elif e.status_code in (400, 422):
                hint = "the server rejected the request; check --teacher-model and the server's log"
            else:
                hint = "check the server's log; retry later if it is overloaded"
            raise TeacherError(
                f"{self._where()} answered HTTP {e.status_code}: {body or e.message}. {hint}"
            ) from e
        except oa.OpenAIError as e:
            raise TeacherError(f"{self._where()} failed: {type(e).__name__}: {e}") from e

        choices = getattr(resp, "choices", None) or []
        content = choices[0].message.content if choices and choices[0].message is not None else None
        if not content:
            reason = choices[0].finish_reason if choices else "no choices in the reply"
            raise TeacherError(
                f"{self._where()} returned no content (finish reason: {reason}); check that the model is a chat "
                "model and that the server's max tokens / context length leave room for the whole answer"
            )
        return strip_fence(content, answer)
