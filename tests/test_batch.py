"""Continuous batching: requests that share one cache and one forward pass per step decode exactly as they
would alone, join and leave between steps, and a cancelled request's slots are freed."""

import pytest
import torch

from pastalm.engine import Engine, GenerateConfig
from pastalm.engine.engine import scripts_for
from pastalm.models import chat_prompt

P = '<promise topic="{}" tokens="{}"/>'
FORCED = "Three ways.\n" + P.format("a", 8) + "<async>1. Keep a schedule.</async>\n" + P.format("b", 5) \
    + "<async>2. Avoid screens.</async>\n<sync/>Together they help."
FORCED2 = "Go: " + P.format("p", 6) + "<async>first, second</async> and " + P.format("q", 20) + "<async>third</async> end"


def jobs(tokenizer):
    """(prompt ids, config, force) of a mix of requests: free greedy, forced with forks, sequential, sampled."""
    p = lambda s: chat_prompt(tokenizer, s)  # noqa: E731
    return [
        (p("Give me some tips."), GenerateConfig(max_new_tokens=300, record_logits=True), FORCED),
        (p("What is 2+2?"), GenerateConfig(max_new_tokens=25, record_logits=True), None),
        (p("Compare apples and oranges, please, in detail."), GenerateConfig(max_new_tokens=300, reserve_scale=0,
                                                                             record_logits=True), FORCED2),
        (p("A poem."), GenerateConfig(max_new_tokens=20, sequential=True, record_logits=True), None),
        (p("Sample something."), GenerateConfig(max_new_tokens=20, temperature=0.9, seed=3, record_logits=True), None),
    ]


def same(a, b):
    assert a.text == b.text and a.raw == b.raw and a.token_ids == b.token_ids
    assert (a.threads, a.tokens, a.tag_tokens, a.limits_hit, a.finish) == (b.threads, b.tokens, b.tag_tokens,
                                                                           b.limits_hit, b.finish)
    assert a.logits.keys() == b.logits.keys()
    for k in a.logits:
        torch.testing.assert_close(a.logits[k], b.logits[k], atol=2e-5, rtol=1e-4)


def add(batcher, tokenizer, job):
    ids, cfg, force = job
    scripts = scripts_for(tokenizer, force, cfg.sequential) if force else None
    return batcher.add(ids, cfg, scripts, forced=force is not None)


def test_batched_requests_decode_as_they_would_alone(model, tokenizer):
    eng = Engine(model, tokenizer, "tiny", stop_ids={tokenizer.eos_token_id})
    js = jobs(tokenizer)
    alone = [eng.generate(ids, cfg, force=force) for ids, cfg, force in js]
    assert alone[0].threads == 2 and alone[2].threads == 2
    b = eng.batcher()
    reqs = [add(b, tokenizer, j) for j in js[:3]]
    for _ in range(4):  # the last two join while the first three are mid-flight
        b.step()
    reqs += [add(b, tokenizer, j) for j in js[3:]]
    max_live = 0
    while b.active:
        max_live = max(max_live, len(b.active))
        b.step()
    assert max_live == 5
    for r, a in zip(reqs, alone):
        same(r.result, a)
    # one forward pass per step for all of them: fewer steps than the requests took one after another
    assert b.steps < sum(a.decode_steps for a in alone)


def test_cancel_frees_the_cache_and_the_others_go_on(model, tokenizer):
    eng = Engine(model, tokenizer, "tiny", stop_ids={tokenizer.eos_token_id})
    js = jobs(tokenizer)[:3]
    alone = [eng.generate(ids, cfg, force=force) for ids, cfg, force in js]
    b = eng.batcher()
    reqs = [add(b, tokenizer, j) for j in js]
    for _ in range(6):
        b.step()
    slots_before = b.runner.cache.num_slots
    cancelled_slots = sum(t.num_fed for t in reqs[1].interp.threads)
    b.cancel(reqs[1])
    assert reqs[1].result.limits_hit == ["cancelled"] and reqs[1].result.text  # its text so far is kept
    assert b.runner.cache.num_slots == slots_before - cancelled_slots  # freed at once
    assert b.runner.cache.num_slots == sum(t.num_fed for r in b.active for t in r.interp.threads)
    assert b.runner.cache.cache.layers[0].keys.shape[-2] == b.runner.cache.num_slots
    live_cols = {c for r in b.active for c in r.columns.values()}
    assert set(b.runner.cache.slot_column.tolist()) <= live_cols and b.runner.cache.num_columns == len(live_cols)
    while b.active:
        b.step()
    same(reqs[0].result, alone[0])
    same(reqs[2].result, alone[2])
    assert not b.active and b.runner.cache.num_slots == 0  # nothing left behind once every request is done


def test_finished_requests_are_compacted_away_while_others_decode(model, tokenizer):
    """The batcher's own compaction (no cancel): once finished requests' slots outweigh the live ones (and 256),
    the runner drops them mid-flight; the long request that lives through it decodes exactly as alone."""
    eng = Engine(model, tokenizer, "tiny", stop_ids=set())  # no EOS: every request runs to its max_new_tokens
    long_job = (chat_prompt(tokenizer, "Give me some tips."), GenerateConfig(max_new_tokens=120, record_logits=True,
                                                                            layout="reserve"),
                FORCED)  # the reserve layout: no re-laid copies, so the live request's slots are its fed tokens
    short = [(chat_prompt(tokenizer, f"Compare apples and oranges {i} " + "in detail " * 60),
              GenerateConfig(max_new_tokens=4), None) for i in range(6)]
    alone = eng.generate(long_job[0], long_job[1], force=long_job[2])
    b = eng.batcher()
    req = add(b, tokenizer, long_job)
    for j in short:
        add(b, tokenizer, j)
    sizes = []
    while b.active:
        b.step()
        sizes.append(b.runner.cache.num_slots)
        if len(b.active) == 1:
            assert b.runner.cache.num_slots == sum(t.num_fed for t in req.interp.threads)  # only the live one
    dead = sum(len(ids) + 4 for ids, _, _ in short)
    assert dead > 256 and max(sizes) > 256 + 120
    drop = [i for i in range(1, len(sizes)) if sizes[i] < sizes[i - 1] - 256]
    assert drop and drop[0] < len(sizes) - 1  # finished ones were dropped at once, while the long one still ran
    same(req.result, alone)


def test_a_request_that_fails_on_its_own_leaves_the_others_exact(model, tokenizer, monkeypatch):
    """A failure that belongs to one request (here its sampling, then its interpreter) ends that request only:
    it leaves with `error` and its text so far; the others decode exactly as alone (tokens and logits)."""
    import pastalm.engine.runner as runner_module

    eng = Engine(model, tokenizer, "tiny", stop_ids={tokenizer.eos_token_id})
    js = jobs(tokenizer)
    alone = [eng.generate(ids, cfg, force=force) for ids, cfg, force in js[:3]]
    real = runner_module.sample
    poisoned = GenerateConfig(max_new_tokens=30, temperature=0.5, seed=11)

    def sample(logits, temperature, top_p, generator, banned=()):
        if temperature == 0.5:
            raise FloatingPointError("boom")
        return real(logits, temperature, top_p, generator, banned)

    monkeypatch.setattr(runner_module, "sample", sample)
    b = eng.batcher()
    reqs = [add(b, tokenizer, j) for j in js[:3]]
    for _ in range(3):
        b.step()
    bad = b.add(chat_prompt(tokenizer, "Fail me."), poisoned)
    finished = []
    while b.active:
        finished += b.step()
        if b.failures:
            failed = b.take_failures()
            assert [r for r, _ in failed] == [bad] and "FloatingPointError: boom" in failed[0][1]
    assert bad.done and bad.error and bad.result.limits_hit == ["error"] and bad not in finished
    for r, a in zip(reqs, alone):
        same(r.result, a)
    # an interpreter that raises: the same
    b = eng.batcher()
    reqs = [add(b, tokenizer, j) for j in js[:3]]
    b.step()
    broken = b.add(chat_prompt(tokenizer, "Break me."), GenerateConfig(max_new_tokens=10))
    broken.interp.schedule = lambda *a: (_ for _ in ()).throw(KeyError("no such view"))
    while b.active:
        b.step()
    assert broken.error == "KeyError: 'no such view'" and [r for r, _ in b.take_failures()] == [broken]
    for r, a in zip(reqs, alone):
        same(r.result, a)
    # Engine.generate raises what failed
    monkeypatch.setattr(runner_module, "sample", sample)
    with pytest.raises(RuntimeError, match="boom"):
        eng.generate(chat_prompt(tokenizer, "Fail me."), poisoned)


def test_chosen_tokens_never_exceed_max_new_tokens(model, tokenizer):
    """max_new_tokens bounds the tokens the model chose (tags included; a fork's forced <async> is free), and
    `Result.chosen` (the server's completion_tokens) is that count, also when a limit ends threads mid-step."""
    eng = Engine(model, tokenizer, "tiny", stop_ids={tokenizer.eos_token_id})
    forced_open = len(tokenizer.encode("<async>", add_special_tokens=False))
    for limit in (5, 17, 30, 41, 1000):
        for force in (FORCED, FORCED2):
            res = eng.generate(chat_prompt(tokenizer, "Tips?"), GenerateConfig(max_new_tokens=limit), force=force)
            assert res.chosen <= limit
            written = sum(len(t) for t in res.token_ids)
            assert res.chosen == written - res.threads * forced_open
            if limit < 41:
                assert res.chosen == limit and "max_new_tokens" in res.limits_hit


def test_bf16_is_reproducible_alone_and_close_in_a_batch(model, tokenizer):
    """The default dtype (bf16): the same request alone gives the same tokens and logits on every run; decoded
    in a batch, its logits differ only by bf16 rounding (the batch changes the kernels' reduction order), which can
    flip a near-tie and so part greedy answers: docs/serving.md, "Reproducibility"."""
    import copy

    m16 = copy.deepcopy(model).to(torch.bfloat16)
    eng = Engine(m16, tokenizer, "tiny", stop_ids={tokenizer.eos_token_id})
    js = jobs(tokenizer)[:3]
    first = [eng.generate(ids, cfg, force=force) for ids, cfg, force in js]
    again = [eng.generate(ids, cfg, force=force) for ids, cfg, force in js]
    for a, b in zip(first, again):
        same(a, b)
    b = eng.batcher()
    reqs = [add(b, tokenizer, j) for j in js]
    while b.active:
        b.step()
    for r, a in zip(reqs, first):  # forced replays: the same tokens by construction; logits within bf16 rounding
        assert r.result.token_ids == a.token_ids
        for k in a.logits:
            scale = a.logits[k].abs().max().item()
            assert (r.result.logits[k] - a.logits[k]).abs().max().item() <= 0.05 * scale + 0.05


def test_chunked_prefill_is_exact_and_keeps_others_decoding(model, tokenizer, monkeypatch):
    """A long prompt goes in pieces of at most the runner's step budget: the answer equals the one-piece prefill
    (tokens, logits), and a short request decoding beside it gets a token every step meanwhile."""
    from pastalm.engine.runner import HFRunner

    eng = Engine(model, tokenizer, "tiny", stop_ids={tokenizer.eos_token_id})
    long_ids = chat_prompt(tokenizer, "Tell me everything about " + "rivers and lakes " * 60)
    assert len(long_ids) > 600
    cfg = GenerateConfig(max_new_tokens=12, record_logits=True)
    monkeypatch.setattr(HFRunner, "step_tokens", None)
    whole = eng.generate(long_ids, cfg)
    short_alone = eng.generate(chat_prompt(tokenizer, "Hi"), GenerateConfig(max_new_tokens=40, record_logits=True))
    monkeypatch.setattr(HFRunner, "step_tokens", 64)
    b = eng.batcher()
    short = b.add(chat_prompt(tokenizer, "Hi"), GenerateConfig(max_new_tokens=40, record_logits=True))
    b.step()
    b.step()
    big = b.add(long_ids, cfg)
    widths = []
    real = b.runner.cache.forward

    def forward(feeds):
        widths.append(sum(len(f.ids) for _, f in feeds))
        return real(feeds)

    b.runner.cache.forward = forward
    before = len(short.interp.threads[0].tokens)
    steps = 0
    while not big.interp.threads[0].num_fed >= len(long_ids):
        b.step()
        steps += 1
    assert steps >= len(long_ids) // 64  # in pieces ...
    assert max(widths) <= 64 + 1  # ... of at most the budget (plus the short request's one token)
    assert len(short.interp.threads[0].tokens) - before == min(steps, 40 - 2) or short.done
    while b.active:
        b.step()
    assert big.result.token_ids == whole.token_ids and short.result.token_ids == short_alone.token_ids
    for k in whole.logits:
        if k in big.result.logits:
            torch.testing.assert_close(big.result.logits[k], whole.logits[k], atol=2e-4, rtol=1e-4)
    last = (0, len(long_ids) - 1)
    torch.testing.assert_close(big.result.logits[last], whole.logits[last], atol=2e-4, rtol=1e-4)


def test_a_short_prompt_is_not_held_behind_a_long_prefill(model, tokenizer, monkeypatch):
    """While something decodes, a step feeds at most `busy_tokens` prompt tokens, and the requests with the least
    to feed go first: a short prompt that arrives while a long one is in pieces is fed whole at its first step and
    gets its first token there, ahead of the long prompt's next piece."""
    from pastalm.engine.runner import HFRunner

    monkeypatch.setattr(HFRunner, "busy_tokens", 64)
    eng = Engine(model, tokenizer, "tiny", stop_ids=set())
    b = eng.batcher()
    b.add(chat_prompt(tokenizer, "Hi"), GenerateConfig(max_new_tokens=60))
    b.step()
    long_ids = chat_prompt(tokenizer, "Tell me everything about " + "rivers and lakes " * 60)
    big = b.add(long_ids, GenerateConfig(max_new_tokens=4))
    b.step()
    assert 0 < big.interp.main.num_fed <= 64  # the busy budget, not step_tokens (512)
    late_ids = chat_prompt(tokenizer, "Tell me about rivers, please, in a few words.")
    assert 30 < len(late_ids) < 64
    late = b.add(late_ids, GenerateConfig(max_new_tokens=4))
    fed_before = big.interp.main.num_fed
    b.step()
    assert late.interp.main.num_fed == len(late_ids) and len(late.interp.main.tokens) == len(late_ids) + 1
    from pastalm.engine.batch import MIN_CHUNK

    # the long one has what is left (but never less than MIN_CHUNK: it always advances)
    assert big.interp.main.num_fed - fed_before == max(MIN_CHUNK, 64 - (len(late_ids) - 1))


def test_long_prompts_are_fed_one_at_a_time(model, tokenizer, monkeypatch):
    """Two long prompts that arrive together while something decodes: the one with less to feed goes in pieces, the
    other waits (holds no cache) until the first is in; both answer as they would alone."""
    from pastalm.engine.runner import HFRunner

    monkeypatch.setattr(HFRunner, "busy_tokens", 64)
    eng = Engine(model, tokenizer, "tiny", stop_ids=set())
    b = eng.batcher()
    b.add(chat_prompt(tokenizer, "Hi"), GenerateConfig(max_new_tokens=200))
    b.step()
    cfg = GenerateConfig(max_new_tokens=3)
    a_ids = chat_prompt(tokenizer, "Tell me about " + "rivers and lakes " * 40)
    c_ids = chat_prompt(tokenizer, "Tell me about " + "rivers and lakes " * 50)
    alone = [eng.generate(ids, cfg) for ids in (a_ids, c_ids)]
    a, c = b.add(a_ids, cfg), b.add(c_ids, cfg)
    steps = 0
    while a.interp.main.num_fed < len(a_ids):
        b.step()
        steps += 1
        if a.interp.main.num_fed < len(a_ids):  # (the step that feeds the last piece gives the rest to the next)
            assert c.interp.main.num_fed == 0 and c.interp.num_slots == 0
    assert steps >= 2 and c.interp.main.num_fed < len(c_ids)
    b.step()
    assert 0 < c.interp.main.num_fed < len(c_ids)  # its turn
    while b.active and not (a.done and c.done):
        b.step()
    assert a.result.token_ids == alone[0].token_ids and c.result.token_ids == alone[1].token_ids


def test_the_serving_loop_steps_on_the_thread_that_loaded_the_engine(model, tokenizer):
    """`pasta serve` loads its engine on a `ComputeThread` and runs the serving loop there: every runner step happens
    on that thread (not the caller's), and the served answer is the one `generate` gives."""
    import asyncio
    import threading

    from pastalm.serve.scheduler import ComputeThread, Job, Scheduler

    compute, loaded_on = ComputeThread(), []

    def load():
        loaded_on.append(threading.get_ident())
        return Engine(model, tokenizer, "tiny")

    engine = compute.call(load)
    with pytest.raises(ZeroDivisionError):  # a failure on the thread is raised to the caller
        compute.call(lambda: 1 / 0)
    sched = Scheduler(engine, compute=compute)
    stepped_on, step = set(), sched.batcher.runner.step

    def recording(work):
        stepped_on.add(threading.get_ident())
        return step(work)

    sched.batcher.runner.step = recording
    ids, cfg = chat_prompt(tokenizer, "Give me some tips."), GenerateConfig(max_new_tokens=30)

    async def serve_one():
        job = Job(ids, cfg, asyncio.get_running_loop())
        sched.submit(job)
        while True:
            _, kind, payload = await asyncio.wait_for(job.queue.get(), 60)
            if kind == "done":
                return payload
            assert kind != "error", payload

    sched.start()
    try:
        served = asyncio.run(serve_one())
    finally:
        sched.stop()
    assert stepped_on == {loaded_on[0]} and loaded_on[0] != threading.get_ident()
    assert served.text == engine.generate(ids, cfg).text and served.tokens > 0
    compute.close()
    compute.thread.join(10)
    own = Scheduler(engine)  # without a compute thread: a thread of its own, ended by stop()
    own.start()
    own.stop()
    own.own_compute.thread.join(10)
    assert not compute.thread.is_alive() and not own.own_compute.thread.is_alive()


def test_a_serving_loop_that_dies_says_why(model, tokenizer, capsys):
    """The serving loop runs as a job of its compute thread; if it ends on an exception (a step's own are caught
    inside it), the traceback is printed, as an uncaught exception in a thread would be, not kept in a future."""
    import time

    from pastalm.serve.scheduler import Scheduler

    sched = Scheduler(Engine(model, tokenizer, "tiny"))

    def broken():
        raise RuntimeError("the loop broke")

    sched._run = broken
    sched.start()
    for _ in range(100):
        if sched.running.done():
            break
        time.sleep(0.05)
    sched.stop()
    assert "RuntimeError: the loop broke" in capsys.readouterr().err
