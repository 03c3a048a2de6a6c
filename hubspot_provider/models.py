"""Wire models for HubSpot's Communication Preferences API (v4 and the dated ``2026-03`` twin).

Two rules shape this module:

* **Requests are strict.** Anything we send must be exactly what HubSpot accepts, so a bad value is
  rejected here, with a message naming the field and the fix, before it can spoil a whole batch.
* **Responses are lenient.** HubSpot's own examples break its spec (``"status": "SUCCESS"``,
  missing "required" error fields), so an unknown enum value is kept as the raw string and a missing
  field becomes ``None`` instead of failing the parse.

Every model speaks camelCase on the wire and snake_case in Python, and accepts either as input::

    PublicStatusRequest.model_validate(
        {"subscriberIdString": "ada@example.com", "subscriptionId": 1001, "statusState": "SUBSCRIBED"}
    ).to_wire()
    # {'channel': 'EMAIL', 'statusState': 'SUBSCRIBED', 'subscriberIdString': 'ada@example.com',
    #  'subscriptionId': 1001}
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import Enum
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic.alias_generators import to_camel

__all__ = [
    "ActionResponseWithResultsSubscriptionDefinition",
    "BatchInputPublicStatusRequest",
    "BatchResponsePublicStatus",
    "BatchResponsePublicBulkOptOutFromAllResponse",
    "BatchResponsePublicStatusBulkResponse",
    "BatchResponsePublicWideStatusBulkResponse",
    "Channel",
    "ErrorBody",
    "ErrorDetail",
    "LegalBasis",
    "PublicStatus",
    "PublicStatusBulkResponse",
    "PublicStatusRequest",
    "PublicWideStatus",
    "UNSUBSCRIBE_ALL",
    "UnsubscribeAllRequest",
    "validate_consent_input",
    "RateLimitBody",
    "SetStatusSuccessReason",
    "StandardError",
    "StatusState",
    "SubscriptionDefinition",
    "StatusKey",
    "INT64_MAX",
    "describe_validation_error",
]

INT64_MAX = 2**63 - 1


class Channel(str, Enum):
    """Communication channel. HubSpot currently supports only ``EMAIL``."""

    EMAIL = "EMAIL"


class StatusState(str, Enum):
    """The subscription status to set (request) or the one held (response)."""

    SUBSCRIBED = "SUBSCRIBED"
    UNSUBSCRIBED = "UNSUBSCRIBED"
    NOT_SPECIFIED = "NOT_SPECIFIED"


class LegalBasis(str, Enum):
    """GDPR legal basis for processing a contact's data."""

    CONSENT_WITH_NOTICE = "CONSENT_WITH_NOTICE"
    LEGITIMATE_INTEREST_CLIENT = "LEGITIMATE_INTEREST_CLIENT"
    LEGITIMATE_INTEREST_OTHER = "LEGITIMATE_INTEREST_OTHER"
    LEGITIMATE_INTEREST_PQL = "LEGITIMATE_INTEREST_PQL"
    NON_GDPR = "NON_GDPR"
    PERFORMANCE_OF_CONTRACT = "PERFORMANCE_OF_CONTRACT"
    PROCESS_AND_STORE = "PROCESS_AND_STORE"


class SetStatusSuccessReason(str, Enum):
    """Why HubSpot reports a write as successful."""

    NO_STATUS_CHANGE = "NO_STATUS_CHANGE"
    REQUESTED_CHANGE_OCCURRED = "REQUESTED_CHANGE_OCCURRED"
    RESUBSCRIBE_OCCURRED = "RESUBSCRIBE_OCCURRED"
    UNSUBSCRIBE_FROM_ALL_OCCURRED = "UNSUBSCRIBE_FROM_ALL_OCCURRED"


class BatchStatus(str, Enum):
    """Status of a batch or action envelope."""

    PENDING = "PENDING"
    PROCESSING = "PROCESSING"
    CANCELED = "CANCELED"
    COMPLETE = "COMPLETE"


# The WHATWG HTML "valid e-mail address" grammar: the syntax browsers enforce on <input type=email>.
# email-validator (what pydantic's EmailStr uses) measured ~40 µs per address here, twice the whole
# per-record budget, so the syntax is checked with one compiled pattern plus RFC 5321 length limits.
_EMAIL_RE = re.compile(
    r"[a-zA-Z0-9.!#$%&'*+/=?^_`{|}~-]+@"
    r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
    r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)+"
)


def _check_email(value: str) -> str:
    if len(value) > 254 or not _EMAIL_RE.fullmatch(value) or len(value.partition("@")[0]) > 64:
        raise ValueError(
            "must be the contact's email address (e.g. ada@example.com); "
            "fix or drop this row at the source"
        )
    return value


def _check_explanation(value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise ValueError("legalBasisExplanation must not be blank; omit it or say why the basis applies")
    return value


EmailAddress = Annotated[str, AfterValidator(_check_email)]
SubscriptionId = Annotated[StrictInt, Field(gt=0, le=INT64_MAX)]

def describe_validation_error(error: ValidationError) -> str:
    """One line naming each bad field and what is wrong with it (no input values: they may be personal data)."""
    parts = []
    for item in error.errors(include_url=False, include_input=False):
        where = ".".join(str(p) for p in item["loc"]) or "input"
        parts.append(f"{where}: {item['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


StatusKey = tuple[str, int, str]
"""Identity of one subscription status: (lower-cased email, subscription id, channel)."""


class _Wire(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    def to_wire(self) -> dict[str, Any]:
        """Return the JSON-ready camelCase dict HubSpot expects (``None`` fields omitted)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def _require_legal_basis_pair(request: Any, info: ValidationInfo) -> None:
    context = info.context or {}
    if context.get("require_legal_basis") and (
        request.legal_basis is None or request.legal_basis_explanation is None
    ):
        raise ValueError(
            "this portal requires legalBasis and legalBasisExplanation on every input (GDPR); "
            "supply both at the source"
        )


class PublicStatusRequest(_Wire):
    """One input of a batch status write: set ``subscriber_id_string``'s status for a subscription.

    Strict: the email must be syntactically valid, ``subscription_id`` a positive int64 (not a
    string, float or bool), enums exact. ``channel`` defaults to ``EMAIL``, the only channel HubSpot
    supports. For GDPR-enabled portals HubSpot requires ``legal_basis`` *and*
    ``legal_basis_explanation``; validate with ``context={"require_legal_basis": True}`` to enforce it::

        PublicStatusRequest.model_validate(row, context={"require_legal_basis": True})
    """

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", str_strip_whitespace=True
    )

    subscriber_id_string: EmailAddress
    subscription_id: SubscriptionId
    status_state: StatusState
    channel: Channel = Channel.EMAIL
    legal_basis: LegalBasis | None = None
    legal_basis_explanation: Annotated[str | None, AfterValidator(_check_explanation)] = None

    @model_validator(mode="after")
    def _legal_basis_pair(self, info: ValidationInfo) -> PublicStatusRequest:
        _require_legal_basis_pair(self, info)
        return self

    @property
    def key(self) -> StatusKey:
        """The status this input sets; a later input with the same key supersedes it."""
        return (self.subscriber_id_string.lower(), self.subscription_id, self.channel.value)


UNSUBSCRIBE_ALL = "UNSUBSCRIBE_ALL"
"""The source contract's ``status`` for a contact who wants no email at all: sent through
``statuses/batch/unsubscribe-all``, not as a subscription status."""


class UnsubscribeAllRequest(_Wire):
    """One contact to opt out of all email (``statuses/batch/unsubscribe-all``).

    HubSpot's request carries only the email; ``legal_basis`` and its explanation are kept for the
    ledger when given. They are never required, even where status writes must carry them: HubSpot's
    endpoint takes none, and an opt-out must never be held back for want of a basis. Its key has no
    subscription (``None``): one contact-wide opt-out.
    """

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", str_strip_whitespace=True
    )

    subscriber_id_string: EmailAddress
    status_state: Literal["UNSUBSCRIBE_ALL"]
    channel: Channel = Channel.EMAIL
    subscription_id: None = None
    legal_basis: LegalBasis | None = None
    legal_basis_explanation: Annotated[str | None, AfterValidator(_check_explanation)] = None


    @property
    def key(self) -> tuple[str, None, str]:
        return (self.subscriber_id_string.lower(), None, self.channel.value)


def validate_consent_input(
    value: Any, *, require_legal_basis: bool = False
) -> PublicStatusRequest | UnsubscribeAllRequest:
    """The one validation of a consent input: a subscription status, or (``statusState``
    ``UNSUBSCRIBE_ALL``) an opt-out from all email. Raises pydantic's ``ValidationError``."""
    context = {"require_legal_basis": True} if require_legal_basis else None
    if isinstance(value, (PublicStatusRequest, UnsubscribeAllRequest)):
        return type(value).model_validate(value.model_dump(), context=context) if context else value
    if isinstance(value, dict) and (value.get("statusState") or value.get("status_state")) == UNSUBSCRIBE_ALL:
        # The source may carry a subscription id (or NULL); an opt-out from everything has none.
        value = {k: v for k, v in value.items() if k not in ("subscriptionId", "subscription_id")}
        return UnsubscribeAllRequest.model_validate(value, context=context)
    return PublicStatusRequest.model_validate(value, context=context)


class BatchInputPublicStatusRequest(_Wire):
    """Body of ``POST .../statuses/batch/write``."""

    inputs: list[PublicStatusRequest]


# ---------------------------------------------------------------------------------------------------
# Responses: lenient. Known enum values become enum members; anything else stays the raw string.


def _lenient(enum_type: type[Enum]) -> Any:
    return Annotated[Union[enum_type, str, None], Field(union_mode="left_to_right")]


# A timestamp HubSpot sends in an unexpected format is kept as the raw string rather than failing.
_Timestamp = Annotated[Union[datetime, str, None], Field(union_mode="left_to_right")]


def _parse_context(value: Any) -> Any:
    """HubSpot's own examples send ``context`` as a Java map rendering: ``"{missingScopes=[a, b]}"``."""
    if value is None or isinstance(value, dict):
        return value
    if not isinstance(value, str):
        return None  # lenient: a context of another shape names nothing we can use
    parsed: dict[str, Any] = {}
    for name, listed, single in re.findall(r"(\w+)=(?:\[([^\]]*)\]|([^,}]*))", value):
        parsed[name] = [v.strip() for v in listed.split(",") if v.strip()] if listed or not single else single.strip()
    return parsed


# ``context`` is a map of lists in the spec, a string in HubSpot's own examples: both become a dict.
_Context = Annotated[Union[dict[str, Any], None], BeforeValidator(_parse_context)]


def _none_as_empty(value: Any) -> Any:
    return [] if value is None else value


class _Response(_Wire):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")


class ErrorDetail(_Response):
    """One detail inside an error body."""

    message: str | None = None
    code: str | None = None
    in_: str | None = Field(default=None, alias="in")
    context: _Context = None
    sub_category: Any = None


class StandardError(_Response):
    """A per-item error inside a batch response. Every field is optional in practice."""

    status: str | None = None
    category: str | None = None
    message: str | None = None
    id: str | None = None
    context: _Context = None
    errors: list[ErrorDetail] | None = None
    links: dict[str, Any] | None = None
    sub_category: Any = None


class ErrorBody(_Response):
    """A top-level error body (HubSpot's ``Error``), e.g. a 400, 401, 403 or 5xx."""

    status: str | None = None
    message: str | None = None
    correlation_id: str | None = None
    category: str | None = None
    sub_category: Any = None
    context: _Context = None
    errors: list[ErrorDetail] | None = None
    links: dict[str, Any] | None = None

    def required_scopes(self) -> list[str]:
        """Scopes a 403 ``MISSING_SCOPES`` body says the token lacks (empty when it names none)."""
        scopes: list[str] = []
        for source in [self.context] + [d.context for d in self.errors or []]:
            for name in ("requiredScopes", "missingScopes", "requiredGranularScopes"):
                value = (source or {}).get(name)
                if isinstance(value, list):
                    scopes.extend(str(v) for v in value if str(v) not in scopes)
        return scopes


class RateLimitBody(_Response):
    """A 429 body. ``policy_name`` is ``TEN_SECONDLY_ROLLING``, ``DAILY``, or something new."""

    status: str | None = None
    message: str | None = None
    error_type: str | None = None
    correlation_id: str | None = None
    policy_name: str | None = None
    group_name: str | None = None
    request_id: str | None = None


class PublicStatus(_Response):
    """A contact's status for one subscription, as HubSpot reports it."""

    subscriber_id_string: str | None = None
    subscription_id: int | None = None
    channel: _lenient(Channel) = None
    status: _lenient(StatusState) = None
    source: str | None = None
    timestamp: _Timestamp = None
    business_unit_id: int | None = None
    legal_basis: _lenient(LegalBasis) = None
    legal_basis_explanation: str | None = None
    set_status_success_reason: _lenient(SetStatusSuccessReason) = None
    subscription_name: str | None = None

    @property
    def key(self) -> StatusKey | None:
        """Same identity as :attr:`PublicStatusRequest.key`; ``None`` when HubSpot omitted a part."""
        if self.subscriber_id_string is None or self.subscription_id is None:
            return None
        channel = self.channel.value if isinstance(self.channel, Enum) else (self.channel or "EMAIL")
        return (self.subscriber_id_string.lower(), self.subscription_id, channel)


class _BatchEnvelope(_Response):
    status: _lenient(BatchStatus) = None
    requested_at: _Timestamp = None
    started_at: _Timestamp = None
    completed_at: _Timestamp = None
    num_errors: int | None = None
    errors: Annotated[list[StandardError], BeforeValidator(_none_as_empty)] = Field(default_factory=list)
    links: dict[str, Any] | None = None


class BatchResponsePublicStatus(_BatchEnvelope):
    """Response of a batch status write (HTTP 200, or 207 when some inputs failed)."""

    results: Annotated[list[PublicStatus], BeforeValidator(_none_as_empty)] = Field(default_factory=list)


class PublicStatusBulkResponse(_Response):
    """All subscription statuses of one contact (batch read)."""

    subscriber_id_string: str | None = None
    statuses: list[PublicStatus] = Field(default_factory=list)


class BatchResponsePublicStatusBulkResponse(_BatchEnvelope):
    """Response of a batch status read (HTTP 200, or 207 with ``errors``)."""

    results: list[PublicStatusBulkResponse] = Field(default_factory=list)


class PublicWideStatus(_Response):
    """A contact's opt-out from all email of a channel (``wideStatusType`` ``PORTAL_WIDE`` or
    ``BUSINESS_UNIT_WIDE``)."""

    subscriber_id_string: str | None = None
    channel: _lenient(Channel) = None
    status: _lenient(StatusState) = None
    timestamp: _Timestamp = None
    wide_status_type: str | None = None
    business_unit_id: int | None = None


class PublicWideStatusBulkResponse(_Response):
    subscriber_id_string: str | None = None
    wide_statuses: Annotated[list[PublicWideStatus], BeforeValidator(_none_as_empty)] = Field(default_factory=list)


class BatchResponsePublicWideStatusBulkResponse(_BatchEnvelope):
    """Response of ``statuses/batch/unsubscribe-all/read`` (HTTP 200, or 207 with ``errors``)."""

    results: Annotated[list[PublicWideStatusBulkResponse], BeforeValidator(_none_as_empty)] = Field(
        default_factory=list)


class PublicBulkOptOutFromAllResponse(_Response):
    subscriber_id_string: str | None = None
    statuses: Annotated[list[PublicStatus], BeforeValidator(_none_as_empty)] = Field(default_factory=list)


class BatchResponsePublicBulkOptOutFromAllResponse(_BatchEnvelope):
    """Response of ``statuses/batch/unsubscribe-all``."""

    results: Annotated[list[PublicBulkOptOutFromAllResponse], BeforeValidator(_none_as_empty)] = Field(
        default_factory=list)


class SubscriptionDefinition(_Response):
    """A subscription type defined in the portal (what ``subscriptionId`` refers to)."""

    id: str | None = None
    name: str | None = None
    description: str | None = None
    purpose: str | None = None
    communication_method: str | None = None
    is_active: bool | None = None
    is_default: bool | None = None
    is_internal: bool | None = None
    business_unit_id: int | None = None
    created_at: _Timestamp = None
    updated_at: _Timestamp = None
    subscription_translations: list[dict[str, Any]] | None = None


class ActionResponseWithResultsSubscriptionDefinition(_BatchEnvelope):
    """Response of ``GET .../definitions``."""

    results: list[SubscriptionDefinition] = Field(default_factory=list)
