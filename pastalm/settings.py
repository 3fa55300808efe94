"""Settings declared once: dataclass fields carry their command-line flag (help, parser, choices) in their
metadata, and `add_flags` / `from_args` turn them into argparse flags and back. Every command builds its flags
from these classes (`ModelSettings` here, `GenerateConfig` for decoding, the training configs for training), so a
flag's name, default and validation live in one place; a command that needs another default says so with
`defaults=` (for example `pasta answers` decodes 320 tokens, not 512)."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, Field, dataclass, field, fields


# -- argparse types -----------------------------------------------------------------------------------------------

def int_at_least(low: int):
    """argparse type: an integer >= low."""
    what = "a positive integer" if low == 1 else f"an integer >= {low}"

    def parse(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            n = low - 1
        if n < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v!r}")
        return n

    parse.__name__ = "int"
    return parse


positive_int, nonneg_int = int_at_least(1), int_at_least(0)


def nonneg_float(v: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {v!r}") from None
    if not x >= 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {v!r}")
    return x


def positive_float(v: str) -> float:
    """argparse type: a finite number > 0."""
    x = nonneg_float(v)
    if x == 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {v!r}")
    return x


def probability(v: str) -> float:
    """argparse type: a number in (0, 1]."""
    try:
        x = float(v)
    except ValueError:
        x = -1.0
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {v!r}")
    return x


# -- declaring and generating flags -------------------------------------------------------------------------------

def opt(default, help: str, *, type=None, choices=None, action=None, default_factory=None) -> Field:
    """A dataclass field that is also a command-line flag (`--name-with-dashes`)."""
    meta = {"help": help, "type": type, "choices": choices, "action": action}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _default(f: Field):
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def add_flags(parser, cls, only: list[str] | None = None, skip: tuple[str, ...] = (), defaults: dict | None = None,
              helps: dict | None = None):
    """Add a flag for every field of `cls` that declares one (`opt`), or only those named in `only`.
    `defaults` and `helps` change a flag's default or help text for this command."""
    defaults, helps = defaults or {}, helps or {}
    for f in fields(cls):
        m = f.metadata
        if "help" not in m or f.name in skip or (only is not None and f.name not in only):
            continue
        default = defaults.get(f.name, _default(f))
        kw = {"default": default, "help": helps.get(f.name, m["help"]), "dest": f.name}
        flag = "--" + f.name.replace("_", "-")
        if m["action"] == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif m["action"] == "store_true":
            parser.add_argument(flag, action="store_true", **kw)
        else:
            if m["type"] is not None:
                kw["type"] = m["type"]
            if m["choices"] is not None:
                kw["choices"] = m["choices"]
            parser.add_argument(flag, **kw)
    return parser


def from_args(cls, args, **overrides):
    """An instance of `cls` from parsed flags (fields without a flag keep their defaults unless overridden)."""
    kw = {f.name: getattr(args, f.name) for f in fields(cls) if f.init and hasattr(args, f.name)}
    kw.update(overrides)
    return cls(**kw)


# -- the model a command runs -------------------------------------------------------------------------------------

BACKENDS = ("hf", "vllm", "llamacpp")
ADAPTER_HELP = ("LoRA adapter: 'auto' (the shipped PASTA adapter of the layout decoded on the bundled model, none on "
                "others), 'pasta-linear' (v3 trained in the linear layout, every backend's default), 'pasta' (annotation v3, "
                "reserve layout), "
                "'pasta-v2', 'pasta-v1' (earlier defaults), 'pasta-stage1', 'baseline', 'none', or a folder from "
                "`pasta train sft` or `pasta train prefer`")


@dataclass
class ModelSettings:
    """Which model, weights, chat system message and backend a command runs."""

    model: str | None = opt(None, "HF model folder, .gguf file or hub id (default: bundled SmolLM2-135M-Instruct)")
    dtype: str = opt("bf16", "weights and compute dtype", choices=("bf16", "fp32"))
    adapter: str = opt("auto", ADAPTER_HELP)
    system: str | None = opt(None, "system message for the chat template")
    baseline_adapter: str = opt("auto", "adapter of the sequential reference (pasta eval's sequential and sot modes, "
                                "stage 2's quality reference): 'auto' (the shipped baseline adapter on the bundled "
                                "model, none on others), 'baseline', 'none' or a folder")
    backend: str = opt("hf", "decoding backend: 'hf' (transformers, in this process), 'vllm' (stock vLLM; needs "
                       "`scripts/setup.sh --vllm`; linear layout only) or 'llamacpp' (llama.cpp through "
                       "llama-cpp-python; needs `scripts/setup.sh --llamacpp`; linear layout only)", choices=BACKENDS)
    gguf_type: str = opt("q8_0", "llama.cpp: the type of the GGUF written from the model with its adapter merged: "
                         "q8_0 (the shipped adapters fork as in f32), q4_1 (the bundled model's own type; the "
                         "shipped PASTA adapter no longer forks there), f16, f32 (exact), or as-is (a .gguf --model "
                         "or the bundled file itself, --adapter none)",
                         choices=("q8_0", "q4_1", "f16", "f32", "as-is"))
    tensor_parallel_size: int = opt(1, "vLLM: GPUs per model replica (tensor parallelism)", type=positive_int)
    data_parallel_size: int = opt(1, "vLLM: model replicas (data parallelism)", type=positive_int)
    vllm_compile: bool = opt(True, "vLLM: compile the model (torch.compile, vLLM's default): on this CPU its steps are "
                             "25-30%% faster; the first start on a machine compiles for about a minute, later ones "
                             "load the compiled code, and the engine is ready about 11 s later than eager",
                             action="bool")

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend: unknown backend {self.backend!r}; use one of {', '.join(BACKENDS)}")
        if self.backend == "hf" and (self.tensor_parallel_size > 1 or self.data_parallel_size > 1):
            raise ValueError("--tensor-parallel-size and --data-parallel-size need --backend vllm")

    def check_layout(self, layout: str | None) -> None:
        """Refuse, before anything is loaded, a layout the chosen backend cannot decode."""
        if self.backend == "vllm":
            from .engine.vllm import VllmEngine as cls
        elif self.backend == "llamacpp":
            from .engine.llamacpp import LlamaCppEngine as cls
        else:
            from .engine import Engine as cls
        cls.check_layout(layout)

    def engine(self, adapter: str | None = None, layout: str | None = None):
        """Load the model (with `adapter` instead of the settings' one, if given) on the chosen backend; 'auto'
        takes the shipped adapter trained for `layout` (None: the backend's own), `models.auto_adapter`."""
        from .models import auto_adapter

        adapter = auto_adapter(self.adapter if adapter is None else adapter, self.model, layout, self.backend)
        if self.backend == "vllm":
            from .engine.vllm import load_vllm

            return load_vllm(self.model, self.dtype, adapter, tensor_parallel_size=self.tensor_parallel_size,
                             data_parallel_size=self.data_parallel_size, compile=self.vllm_compile)
        if self.backend == "llamacpp":
            from .engine.llamacpp import load_llamacpp

            return load_llamacpp(self.model, adapter, self.gguf_type)
        from .engine import Engine
        from .models import load

        m = load(self.model, self.dtype, adapter)
        return Engine(m.model, m.tokenizer, m.name)


@dataclass
class PromptSettings:
    """Which prompts a command answers."""

    prompts: str | None = opt(None, "'train', 'eval' (the shipped prompt sets) or a file: JSONL with a 'prompt' "
                              "field, or one prompt per line")
    limit: int | None = opt(None, "only the first N (after --per-category)", type=positive_int)
    per_category: int | None = opt(None, "only the first N prompts of each category, in file order",
                                   type=positive_int)


@dataclass
class TrainSettings:
    """The optimizer loop of both training stages (each stage's config sets its own defaults)."""

    epochs: float = opt(1.0, "passes over the data", type=positive_float)
    batch_size: int = opt(4, "examples (stage 2: pairs) per micro-batch", type=positive_int)
    grad_accum: int = opt(2, "micro-batches per optimizer step", type=positive_int)
    lr: float = opt(2e-4, "learning rate", type=positive_float)
    max_length: int = opt(640, "longest example in tokens (prompt + answer); longer ones are skipped and counted",
                          type=positive_int)
    seed: int = opt(0, "seed of the shuffling and of LoRA's initialisation", type=int)


def defaults_of(cls, names) -> dict:
    """The defaults a config dataclass gives to the fields in `names` (for `add_flags(defaults=...)`)."""
    return {f.name: _default(f) for f in fields(cls) if f.name in names}
