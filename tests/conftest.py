"""Shared fixtures: tiny random Llama / Qwen2 models and an in-memory tokenizer (no downloads)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from pastalm.testing import tiny_model, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def smol():
    """The bundled SmolLM2 tokenizer (real merges across tag boundaries); skips when the model is not installed."""
    from pastalm.models import ModelError, load_tokenizer

    try:
        return load_tokenizer()
    except ModelError as e:  # the bundled model is installed by scripts/setup.sh
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def _test_model_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("pasta-cache")


@pytest.fixture(autouse=True)
def _model_cache(request, monkeypatch, _test_model_cache):
    """Fast tests convert their tiny models into a cache of the test session's own, never the user's
    ~/.cache/pastalm; the slow ones (the bundled model) share the user's cache, as `pasta` itself would."""
    if "PASTA_CACHE" not in os.environ and not any(request.node.get_closest_marker(m)
                                                   for m in ("slow", "vllm", "long")):
        monkeypatch.setenv("PASTA_CACHE", str(_test_model_cache))


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def model(request):
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    """A tiny random Llama and its tokenizer saved as a model folder (for the CLI, eval and the server)."""
    d = tmp_path_factory.mktemp("tiny-folder")
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d
