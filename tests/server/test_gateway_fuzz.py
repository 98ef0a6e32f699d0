"""Schemathesis over every operation of the gateway's OpenAPI schema, against the real
gateway and Triton: no input drawn from the schema (positive and negative cases) may get a
5xx, and every response must match what the schema documents (status, content type, body).

Driven through Hypothesis directly (schemathesis's pytest plugin does not run on pytest 9).
A fixed example budget and `derandomize` keep it to seconds and the same cases every run.
Left out: schemathesis's "positive data acceptance" check, which wants a 2xx for anything the
schema allows. The schema cannot know the served model's limits (its sizes, step and image
caps, samplers: `GET /v1/config`), so a schema-valid request beyond them gets the documented
400 with a message, which is what that check would flag.
"""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

EXAMPLES = 25  # per operation and mode
KEY = "fuzz-key"


@pytest.fixture(scope="module")
def keyed_gateway(triton):
    """The gateway with API keys on, as an operator runs it in the open (schemathesis also
    checks that missing or wrong keys are refused)."""
    from server.gateway import GatewaySettings
    from tests.server.serving import running_gateway

    settings_ = GatewaySettings(triton_url=triton.grpc_url, timeout=60,
                                api_keys=frozenset({KEY}))
    with running_gateway(settings_) as url:
        yield url


def test_every_operation_keeps_its_schema(keyed_gateway):
    schema = schemathesis.openapi.from_url(f"{keyed_gateway}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/images/generations",
                                             "/v1/images/generations/stream", "/readyz"}
    seen = []
    for operation in operations:
        # Negative cases need inputs to break: the POST bodies (the GETs take none).
        modes = [GenerationMode.POSITIVE] + [GenerationMode.NEGATIVE] * (
            operation.method.upper() == "POST")
        for mode in modes:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def check(case):
                response = case.call(timeout=120, headers={"Authorization": f"Bearer {KEY}"})
                seen.append(response.status_code)
                assert response.status_code < 500, (case.method, case.path, case.body,
                                                    response.text[:300])
                case.validate_response(response, excluded_checks=[positive_data_acceptance])

            check()
    assert any(s == 200 for s in seen) and any(400 <= s < 500 for s in seen)
