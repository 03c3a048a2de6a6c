"""Wire models: strict requests, lenient responses, and agreement with HubSpot's official specs."""

from __future__ import annotations

import json
from enum import Enum

import pytest
from conftest import SPEC_DIR
from pydantic import ValidationError

from hubspot_provider import models
from hubspot_provider.models import (
    BatchResponsePublicStatus,
    Channel,
    ErrorBody,
    LegalBasis,
    PublicStatus,
    PublicStatusRequest,
    RateLimitBody,
    SetStatusSuccessReason,
    StatusState,
)

GOOD = {"subscriberIdString": "ada@example.com", "subscriptionId": 1001, "statusState": "SUBSCRIBED"}


def test_request_round_trips_camel_and_snake_case():
    camel = PublicStatusRequest.model_validate(GOOD)
    snake = PublicStatusRequest(subscriber_id_string="ada@example.com", subscription_id=1001, status_state="SUBSCRIBED")
    assert camel == snake
    assert camel.to_wire() == {**GOOD, "channel": "EMAIL"}
    assert camel.key == ("ada@example.com", 1001, "EMAIL")


@pytest.mark.parametrize(
    "email",
    ["ada@example.com", "a.b+tag@sub.example.co.uk", "o'hara@example.ie", "x_y-z@a-b.io", "UPPER@EXAMPLE.COM"],
)
def test_valid_emails(email):
    assert PublicStatusRequest.model_validate({**GOOD, "subscriberIdString": email})


@pytest.mark.parametrize(
    "email",
    ["", "plain", "@example.com", "ada@", "ada@example", "ada@@example.com", "ada example@x.com", "ada@-x.com",
     "ada@x..com", "a" * 65 + "@example.com", "ada@" + "a" * 250 + ".com", "ada@exa_mple.com"],
)
def test_invalid_emails_name_the_field_and_fix(email):
    with pytest.raises(ValidationError) as caught:
        PublicStatusRequest.model_validate({**GOOD, "subscriberIdString": email})
    assert "contact's email address" in str(caught.value)


def test_whitespace_is_trimmed_but_case_kept_on_the_wire():
    request = PublicStatusRequest.model_validate({**GOOD, "subscriberIdString": "  Ada@Example.com\n"})
    assert request.subscriber_id_string == "Ada@Example.com"
    assert request.key[0] == "ada@example.com"


def test_legal_basis_required_on_request():
    with_basis = {**GOOD, "legalBasis": "NON_GDPR", "legalBasisExplanation": "Outside the EU"}
    assert PublicStatusRequest.model_validate(with_basis, context={"require_legal_basis": True})
    for partial in (GOOD, {**GOOD, "legalBasis": "NON_GDPR"}, {**GOOD, "legalBasisExplanation": "why"}):
        with pytest.raises(ValidationError, match="requires legalBasis and legalBasisExplanation"):
            PublicStatusRequest.model_validate(partial, context={"require_legal_basis": True})


def test_responses_keep_unknown_enum_values_and_tolerate_missing_fields():
    parsed = BatchResponsePublicStatus.model_validate(
        {
            "status": "SUCCESS",
            "results": [
                {"status": "PAUSED", "channel": "WHATSAPP", "setStatusSuccessReason": None, "legalBasis": None,
                 "subscriberIdString": "a@b.co", "subscriptionId": 7, "timestamp": "not-a-date", "brandNew": 1},
                {"status": "SUBSCRIBED", "channel": "EMAIL", "setStatusSuccessReason": "RESUBSCRIBE_OCCURRED",
                 "subscriberIdString": "c@d.co", "subscriptionId": 8, "timestamp": "2026-03-10T12:00:00.5Z"},
            ],
            "errors": [{"message": "only a message"}],
        }
    )
    first, second = parsed.results
    assert parsed.status == "SUCCESS"
    assert (first.status, first.channel, first.timestamp) == ("PAUSED", "WHATSAPP", "not-a-date")
    assert first.source is None and first.set_status_success_reason is None
    assert second.status is StatusState.SUBSCRIBED
    assert second.set_status_success_reason is SetStatusSuccessReason.RESUBSCRIBE_OCCURRED
    assert second.timestamp.year == 2026
    assert parsed.errors[0].category is None and parsed.errors[0].links is None


def test_error_and_rate_limit_bodies():
    forbidden = ErrorBody.model_validate(
        {"status": "error", "message": "This app hasn't been granted all required scopes", "category": "MISSING_SCOPES",
         "correlationId": "c0", "errors": [{"message": "One or more of the following scopes are required.",
                                            "context": {"requiredScopes": ["a.scope", "b.scope"]}}]}
    )
    assert forbidden.required_scopes() == ["a.scope", "b.scope"]
    as_text = ErrorBody.model_validate({"errors": [{"message": "m", "context": "{missingScopes=[scope1, scope2]}"}]})
    assert as_text.required_scopes() == ["scope1", "scope2"]
    daily = RateLimitBody.model_validate(
        {"status": "error", "message": "You have reached your daily limit.", "errorType": "RATE_LIMIT",
         "correlationId": "c1", "policyName": "DAILY", "requestId": "r1"}
    )
    assert (daily.policy_name, daily.correlation_id) == ("DAILY", "c1")


# --------------------------------------------------------------------------- against the official specs

SPEC_FILES = ["communication-preferences-v4.openapi.json", "communication-preferences-2026-03.openapi.json"]


@pytest.fixture(params=SPEC_FILES)
def spec(request):
    path = SPEC_DIR / request.param
    if not path.exists():
        pytest.skip(f"HubSpot's official spec {path} is absent (it ships in ../shared/hubspot-spec beside the repo)")
    return json.loads(path.read_text())


def _schema(spec: dict, name: str) -> dict:
    return spec["components"]["schemas"][name]


@pytest.mark.parametrize(
    ("schema_name", "field", "enum_type"),
    [
        ("PublicStatusRequest", "channel", Channel),
        ("PublicStatusRequest", "statusState", StatusState),
        ("PublicStatusRequest", "legalBasis", LegalBasis),
        ("PublicStatus", "status", StatusState),
        ("PublicStatus", "setStatusSuccessReason", SetStatusSuccessReason),
        ("BatchResponsePublicStatus", "status", models.BatchStatus),
    ],
)
def test_enums_match_the_spec(spec, schema_name, field, enum_type: type[Enum]):
    assert {m.value for m in enum_type} == set(_schema(spec, schema_name)["properties"][field]["enum"])


def test_request_fields_and_required_match_the_spec(spec):
    schema = _schema(spec, "PublicStatusRequest")
    fields = {f.alias for f in PublicStatusRequest.model_fields.values()}
    assert fields == set(schema["properties"])
    required_here = {f.alias for f in PublicStatusRequest.model_fields.values() if f.is_required()}
    # channel is required by HubSpot; the model defaults it to EMAIL (the only channel) and always sends it.
    assert required_here | {"channel"} == set(schema["required"])
    assert "channel" in PublicStatusRequest.model_validate(GOOD).to_wire()
    assert schema["properties"]["subscriptionId"]["format"] == "int64"
    batch = _schema(spec, "BatchInputPublicStatusRequest")
    assert set(batch["properties"]) == {"inputs"}


@pytest.mark.parametrize(
    ("model", "schema_name"),
    [
        (PublicStatus, "PublicStatus"),
        (BatchResponsePublicStatus, "BatchResponsePublicStatus"),
        (models.StandardError, "StandardError"),
        (models.ErrorDetail, "ErrorDetail"),
        (ErrorBody, "Error"),
        (models.SubscriptionDefinition, "SubscriptionDefinition"),
        (models.PublicStatusBulkResponse, "PublicStatusBulkResponse"),
        (models.BatchResponsePublicStatusBulkResponse, "BatchResponsePublicStatusBulkResponseWithErrors"),
        (models.ActionResponseWithResultsSubscriptionDefinition, "ActionResponseWithResultsSubscriptionDefinition"),
    ],
)
def test_response_models_cover_every_spec_property(spec, model, schema_name):
    aliases = {f.alias or name for name, f in model.model_fields.items()}
    assert set(_schema(spec, schema_name)["properties"]) <= aliases


def test_spec_examples_parse_and_survive_a_round_trip(spec):
    example = {
        "completedAt": "2023-11-07T05:31:56Z", "startedAt": "2023-11-07T05:31:56Z", "status": "CANCELED",
        "results": [{"channel": "EMAIL", "source": "<string>", "status": "NOT_SPECIFIED", "subscriberIdString": "<string>",
                     "subscriptionId": 123, "timestamp": "2023-11-07T05:31:56Z", "businessUnitId": 123,
                     "legalBasis": "CONSENT_WITH_NOTICE", "legalBasisExplanation": "<string>",
                     "setStatusSuccessReason": "NO_STATUS_CHANGE", "subscriptionName": "<string>"}],
        "errors": [{"category": "<string>", "context": {}, "errors": [{"message": "<string>", "code": "<string>",
                    "context": "{missingScopes=[scope1, scope2]}", "in": "<string>", "subCategory": "<string>"}],
                    "links": {}, "message": "<string>", "status": "<string>", "id": "<string>", "subCategory": {}}],
        "links": {}, "numErrors": 123, "requestedAt": "2023-11-07T05:31:56Z",
    }
    parsed = BatchResponsePublicStatus.model_validate(example)
    assert parsed.results[0].set_status_success_reason is SetStatusSuccessReason.NO_STATUS_CHANGE
    dumped = parsed.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert set(dumped) <= set(_schema(spec, "BatchResponsePublicStatus")["properties"])
