"""The server keeps its OpenAPI contract: schemathesis generates requests from /openapi.json (valid ones, and
invalid ones near the schema's edges) and checks every answer: no 5xx, only documented statuses and content
types, errors as documented, schema-valid requests accepted, schema-invalid ones refused, 405 with `Allow`."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from test_serve import start, stop


@pytest.fixture(scope="module")
def api(folder):
    # small answers: the contract, not the decoding, is under test (tests/test_serve.py checks the answers)
    proc, url, _ = start(folder, "--max-tokens-limit", "8", "--max-new-tokens", "4", "--max-queue", "64")
    try:
        yield schemathesis.openapi.from_url(url + "/openapi.json")
    finally:
        stop(proc)


def test_every_answer_keeps_the_contract(api):
    """Generated requests (valid and invalid) for every operation; each answer checked against the schema."""
    from hypothesis import given

    operations = [op.ok() for op in api.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {"POST /v1/chat/completions",
                                                                       "POST /v1/completions", "GET /v1/models"}
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  derandomize=True)  # the same cases every run: a CI result that does not depend on luck
        def check(case):
            case.call_and_validate()

        check()
