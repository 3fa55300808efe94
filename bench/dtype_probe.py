"""bf16 against fp32 on this CPU: ms per decode step, rendered tokens per step and rendered tok/s of sequential and
PASTA decoding with the shipped `pasta-linear`, two parallelizable prompts, 160 tokens, one warm-up.

    .venv/bin/python bench/dtype_probe.py hf
    .venv-vllm/bin/python bench/dtype_probe.py vllm
"""
import sys
from pastalm.engine import GenerateConfig
from pastalm.models import chat_prompt
from pastalm.settings import ModelSettings
backend = sys.argv[1]
prompts = ["Give me tips on how to study for an exam.", "List some healthy breakfast ideas."]
out = {}
for dtype in ("bf16", "fp32"):
    eng = ModelSettings(dtype=dtype, backend=backend).engine("pasta-linear", layout="linear")
    tok = eng.tokenizer
    for kind, cfg in (("seq", GenerateConfig(max_new_tokens=160, layout="linear", sequential=True)),
                      ("pasta", GenerateConfig(max_new_tokens=160, layout="linear"))):
        rows = []
        for i, p in enumerate(prompts):
            ids = chat_prompt(tok, p)
            if i == 0:
                eng.generate(ids, cfg)  # warm-up
            r = eng.generate(ids, cfg)
            rows.append((1000 * r.wall_s / r.decode_steps, r.tokens / r.decode_steps, r.tokens / r.wall_s))
        out[(dtype, kind)] = rows
        print(backend, dtype, kind, [tuple(round(x, 2) for x in row) for row in rows], flush=True)
    del eng
