"""Tiny, download-free models and a tokenizer for tests and examples: random Llama / Qwen2 from a config."""

from __future__ import annotations

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "Here are three ways to sleep better. Keep a fixed schedule, avoid screens, and cut caffeine after noon.",
    '<promise topic="schedule" tokens="30"/><async>1. Keep a fixed schedule.</async><sync/> Together they help.',
    "The capital of France is Paris. 2 + 2 = 4. Steps: first, second, third. Compare apples and oranges.",
    "A short poem: the moon is bright, the night is long, the wind sings a quiet song.",
]


def tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained in memory (ChatML template, <|im_end|> as EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def tiny_model(arch: str = "llama", vocab_size: int = 384, seed: int = 0, head_dim: int = 16):
    """A randomly initialised 2-layer model of the given architecture ('llama' or 'qwen2'), fp32, eval mode, with
    4 query and 2 KV heads of `head_dim` (vLLM's CPU attention needs 32 or more)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kw = dict(vocab_size=vocab_size, hidden_size=4 * head_dim, intermediate_size=8 * head_dim, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kw, tie_word_embeddings=False))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**kw, tie_word_embeddings=True))
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; use 'llama' or 'qwen2'")
    return model.eval()


class local_server:
    """Serve an ASGI app (e.g. FastAPI) on 127.0.0.1 in a background thread, for tests that speak real HTTP:
    `with local_server(app) as base_url: ...` (needs uvicorn, in the `test` extra)."""

    def __init__(self, app, timeout: float = 10.0, lifespan: str = "off"):
        self.app = app
        self.timeout = timeout
        self.lifespan = lifespan  # "on" runs the app's start-up and shutdown (pasta serve's scheduler thread)

    def __enter__(self) -> str:
        import socket
        import threading
        import time

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan=self.lifespan))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + self.timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the local test server did not start")
            time.sleep(0.01)
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
        self.sock.close()


def replay_scripts(interp, on_step=None) -> None:
    """The engine's step loop without a model: every thread of `interp` (an `Interpreter` built with scripts)
    writes the next token of its script, one per step, until the request is finished; `on_step()` runs after each
    step. Tests and `bench/annotation.py` use it to measure the interpreter on a known workload."""
    from .engine.interpreter import STOP

    while not interp.finished:
        feeds = interp.schedule()
        if not feeds:
            interp.stop("stalled")
            break
        for tid in interp.fed(feeds):
            t = interp.scripted(tid)
            interp.write(tid, STOP if t is None else t)
        if on_step is not None:
            on_step()
