"""`pasta generate --show-threads`: a live view of the threads in the terminal (rich), one line per thread."""

from __future__ import annotations

from rich.console import Group
from rich.text import Text

COLORS = ["grey62", "red", "blue", "green", "yellow", "magenta", "cyan", "bright_red", "bright_blue"]
WIDTH = 72  # characters of a thread's latest text shown on its line


def color(tid: int) -> str:
    return COLORS[0] if tid == 0 else COLORS[1 + (tid - 1) % (len(COLORS) - 1)]


class ThreadsView:
    """Fed `batch.thread_view` after every step; renders one line per thread: its tokens so far (tag tokens
    apart), whether it is live or how it ended, and the end of its text."""

    def __init__(self):
        self.step = 0
        self.tokens: dict[int, int] = {0: 0}
        self.tags: dict[int, int] = {0: 0}
        self.texts: dict[int, str] = {0: ""}
        self.finish: dict[int, str] = {}
        self.live: set[int] = {0}
        self.max_live = 1

    def update(self, view: dict) -> None:
        self.step = view["step"]
        self.live = set(view["live"])
        self.max_live = max(self.max_live, len(self.live))
        for tid, shown in view["wrote"]:
            self.tokens[tid] = self.tokens.get(tid, 0) + 1
            if not shown:
                self.tags[tid] = self.tags.get(tid, 0) + 1
        texts: dict[int, str] = {}
        for p in view["pieces"]:
            texts[p["thread"]] = texts.get(p["thread"], "") + p["text"]
            if p["finish"]:
                self.finish[p["thread"]] = p["finish"]
        self.texts.update(texts)
        for tid in self.texts:
            self.tokens.setdefault(tid, 0)

    def __rich__(self) -> Group:
        lines = []
        for tid in sorted(self.texts):
            name = "main" if tid == 0 else f"thread {tid}"
            state = "live" if tid in self.live else f"done ({self.finish.get(tid) or 'ended'})"
            count = f"{self.tokens.get(tid, 0)} tok" + (f", {self.tags[tid]} tag" if self.tags.get(tid) else "")
            tail = self.texts[tid].replace("\n", " ")
            tail = tail if len(tail) <= WIDTH else "…" + tail[-(WIDTH - 1):]  # the latest text, cut at its start
            line = Text.assemble((f"{name:<10}", f"bold {color(tid)}"), (f"{count:<16}", ""),
                                 (f"{state:<15}", "dim"), (tail, color(tid)), no_wrap=True, overflow="ellipsis")
            lines.append(line)
        lines.append(Text(f"step {self.step}, {len(self.live)} live", style="dim"))
        return Group(*lines)
