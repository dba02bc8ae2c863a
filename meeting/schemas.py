"""Marshmallow schemas: every request body and query, every response body.

The OpenAPI document is generated from these, so a schema here is the contract.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
from typing import Any, TypeVar

from marshmallow import Schema, ValidationError, fields, validate, validates_schema

MAX_ID = 2**63 - 1


def Id(**kwargs: Any) -> fields.Integer:
    """A database id: a JSON integer (not a string) within BIGINT range."""
    return fields.Integer(strict=True, validate=validate.Range(1, MAX_ID), **kwargs)


class QueryInt(fields.Integer):
    """An integer in a query string: 1-19 ASCII digits and nothing else. Python's int()
    also takes "+5", " 5", "5_000" and other scripts' digits."""

    _DIGITS = re.compile(r"[0-9]{1,19}")

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if not isinstance(value, str) or not self._DIGITS.fullmatch(value):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


def QueryId(**kwargs: Any) -> fields.Integer:
    return QueryInt(validate=validate.Range(1, MAX_ID), **kwargs)


def Limit(default: int) -> fields.Integer:
    return QueryInt(load_default=default, validate=validate.Range(1, 100))


class StrictBoolean(fields.Boolean):
    """JSON true or false only: marshmallow's Boolean also takes "yes", 1, "on"..."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


class UTCDateTime(fields.AwareDateTime):
    """An ISO-8601 time with an offset, returned in UTC, between 1970 and 9999: a year-1
    time with a positive offset has no UTC equivalent at all (OverflowError)."""

    EARLIEST = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    LATEST = dt.datetime(9999, 12, 31, tzinfo=dt.timezone.utc)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> dt.datetime:
        moment = super()._deserialize(value, attr, data, **kwargs)
        try:
            moment = moment.astimezone(dt.timezone.utc)
        except OverflowError:
            raise ValidationError("Out of range: between 1970 and 9999.") from None
        if not self.EARLIEST <= moment <= self.LATEST:
            raise ValidationError("Out of range: between 1970 and 9999.")
        return moment


#: Characters that make a name lie about itself or break a line: controls (C0, C1, DEL),
#: line/paragraph separators and the bidirectional overrides, embeddings, isolates and marks.
_BIDI = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _plain_text(value: str) -> None:
    if any(c in _BIDI or unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in value):
        raise ValidationError("Must not contain control or bidirectional-override characters.")


class Pattern(validate.Regexp):
    """A regular expression as the OpenAPI document means it: ECMA-262 syntax (no `\\Z`),
    searched, not matched at the start (`^...$` for a whole string). Python's `$` also
    matches before a final newline, so the check reads an ending `$` as `\\Z`: "alice\\n"
    is not the name "alice". The document shows the pattern as written."""

    def __init__(self, pattern: str, error: str):
        super().__init__(pattern, error=error)
        self._check = re.compile(pattern[:-1] + r"\Z" if pattern.endswith("$") else pattern)

    def __call__(self, value: str) -> str:
        if self._check.search(value) is None:
            raise ValidationError(self._format_error(value))
        return value


#: Not blank: at least one character that is not white space, anywhere.
NOT_BLANK = Pattern(r"\S", error="Must not be blank.")

USERNAME = Pattern(r"^[A-Za-z0-9_.-]{3,32}$", error="3-32 characters of letters, digits, '_', '.', '-'.")


class IdList(fields.List):
    """Output-only list of ids: dumped as it is, without one field call per id (a
    backlog of group messages carries thousands). The ids come from our own rows."""

    def __init__(self, **kwargs: Any):
        super().__init__(fields.Integer(), **kwargs)

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> list[int] | None:
        return None if value is None else list(value)


_S = TypeVar("_S", bound=type[Schema])


def output(cls: _S) -> _S:
    """A response body: each of its fields is always there (null where it may be), so the
    OpenAPI document lists them all as required and clients need not test for them; the
    fuzz test (tests/test_fuzz_api.py) then holds every response to it. Dumping ignores
    `required`: it only shapes the document."""
    for field in cls._declared_fields.values():
        field.required = True
    return cls


class RegisterSchema(Schema):
    username = fields.String(required=True, validate=USERNAME)
    password = fields.String(required=True, validate=validate.Length(8, 128))
    display_name = fields.String(load_default=None, allow_none=True, validate=[validate.Length(1, 64), _plain_text])


class LoginSchema(Schema):
    # The registration pattern: on MariaDB "alice " would match alice (PAD SPACE), and each
    # such variant would get its own count of failed logins.
    username = fields.String(required=True, validate=USERNAME)
    password = fields.String(required=True, validate=validate.Length(1, 256))


@output
class UserSchema(Schema):
    id = fields.Integer()
    username = fields.String()
    display_name = fields.String()
    created_at = fields.AwareDateTime()


@output
class TokensSchema(Schema):
    access_token = fields.String()
    token_type = fields.String()
    expires_in = fields.Integer()
    #: Opaque; POST /auth/refresh spends it for a new pair. Keep it out of reach of scripts.
    refresh_token = fields.String()
    refresh_expires_in = fields.Integer()


@output
class LoginResponseSchema(TokensSchema):
    user = fields.Nested(UserSchema)


class RefreshSchema(Schema):
    refresh_token = fields.String(required=True, validate=validate.Length(1, 200))


@output
class LogoutAllSchema(Schema):
    sessions = fields.Integer()


class UserSearchQuery(Schema):
    q = fields.String(load_default="", validate=validate.Length(max=32))
    limit = Limit(20)
    after = fields.String(load_default=None, validate=validate.Length(1, 32))


@output
class UserListSchema(Schema):
    users = fields.List(fields.Nested(UserSchema))
    next_after = fields.String(allow_none=True)


@output
class HealthSchema(Schema):
    status = fields.String()
    database = fields.String()
    redis = fields.String()


class ErrorBodySchema(Schema):
    code = fields.String(required=True)
    message = fields.String(required=True)
    details = fields.Dict()


class ErrorSchema(Schema):
    error = fields.Nested(ErrorBodySchema, required=True)


class PageQuery(Schema):
    limit = Limit(50)
    before = QueryId(load_default=None)


class LimitQuery(Schema):
    limit = Limit(50)


class SendMessageSchema(Schema):
    recipient_ids = fields.List(Id(), required=True, validate=validate.Length(max=10_000))
    content = fields.String(required=True)
    meeting_id = Id(load_default=None, allow_none=True)


class MessageBaseSchema(Schema):
    """What every view of a message shows. Who else received it is not part of it: a
    recipient sees how many (`recipient_count`), only the sender sees who (docs/api.md)."""
    id = fields.Integer()
    sender_id = fields.Integer()
    recipient_count = fields.Integer()
    content = fields.String()
    type = fields.String()
    meeting_id = fields.Integer(allow_none=True)
    created_at = fields.AwareDateTime()


@output
class SentMessageSchema(MessageBaseSchema):
    """The sender's view: the POST /messages answer, the sent box, `message.sent`."""
    recipient_ids = IdList()
    #: Recipients who marked it read (a counter, see storage.receipts).
    read_count = fields.Integer()


@output
class ReceivedMessageSchema(MessageBaseSchema):
    """A recipient's view: the message and the reader's own state, not the other recipients."""
    read_at = fields.AwareDateTime(allow_none=True)
    #: The recipient's own sequence number (1, 2, 3... in commit order): the resume cursor.
    seq = fields.Integer(allow_none=True)


@output
class ReceivedPageSchema(Schema):
    messages = fields.List(fields.Nested(ReceivedMessageSchema))
    next_before = fields.Integer(allow_none=True)
    next_after_seq = fields.Integer(allow_none=True)


class ReceivedQuery(PageQuery):
    #: `inbox` (received, the recipient's view) or `sent` (the sender's view, with read counts).
    box = fields.String(load_default="inbox", validate=validate.OneOf(["inbox", "sent"]))
    after_seq = QueryInt(load_default=None, validate=validate.Range(0, MAX_ID))

    @validates_schema
    def _one_cursor(self, data: dict[str, Any], **kwargs: Any) -> None:
        if data.get("after_seq") is not None and data.get("before") is not None:
            raise ValidationError("Use either before (newest first) or after_seq (oldest first).", "_schema")
        if data.get("after_seq") is not None and data.get("box") == "sent":
            raise ValidationError("after_seq pages the inbox; the sent box pages with before.", "after_seq")


@output
class SentPageSchema(Schema):
    messages = fields.List(fields.Nested(SentMessageSchema))
    next_before = fields.Integer(allow_none=True)


class QueryBool(fields.Boolean):
    """`true` or `false` in a query string, nothing else."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if value not in ("true", "false"):
            raise ValidationError("Must be true or false.")
        return value == "true"


class ReceiptsQuery(LimitQuery):
    limit = Limit(100)
    #: The previous page's `next_after` (a user id).
    after = QueryId(load_default=None)
    #: Only those who have not read it (whom to remind).
    unread = QueryBool(load_default=False)


@output
class ReceiptSchema(Schema):
    user_id = fields.Integer()
    #: null: not read yet.
    read_at = fields.AwareDateTime(allow_none=True)


@output
class ReceiptsSchema(Schema):
    message_id = fields.Integer()
    recipient_count = fields.Integer()
    read_count = fields.Integer()
    recipients = fields.List(fields.Nested(ReceiptSchema))
    next_after = fields.Integer(allow_none=True)


class UnreadQuery(LimitQuery):
    #: The previous page's `next_after_seq` (or the seq of the last backlog message on the WebSocket).
    after_seq = QueryInt(load_default=None, validate=validate.Range(0, MAX_ID))


@output
class UnreadSchema(Schema):
    messages = fields.List(fields.Nested(ReceivedMessageSchema))
    count = fields.Integer()
    next_after_seq = fields.Integer(allow_none=True)


@output
class CountSchema(Schema):
    count = fields.Integer()


@output
class ReadOneSchema(Schema):
    id = fields.Integer()
    read_at = fields.AwareDateTime()


class MarkReadSchema(Schema):
    ids = fields.List(Id(), validate=validate.Length(1, 1000))
    all = StrictBoolean()

    @validates_schema
    def _exactly_one(self, data: dict[str, Any], **kwargs: Any) -> None:
        if ("ids" in data) == bool(data.get("all")):
            raise ValidationError('Give either "ids" or "all": true.', "_schema")


@output
class MarkReadResultSchema(Schema):
    updated = fields.Integer()
    count = fields.Integer()


class CreateMeetingSchema(Schema):
    title = fields.String(required=True, validate=[validate.Length(1, 200), NOT_BLANK])
    participant_ids = fields.List(Id(), required=True, validate=validate.Length(max=1000))
    starts_at = UTCDateTime(load_default=None, allow_none=True)


@output
class MeetingSchema(Schema):
    id = fields.Integer()
    title = fields.String()
    organizer_id = fields.Integer()
    participant_ids = fields.List(fields.Integer())
    starts_at = fields.AwareDateTime(allow_none=True)
    created_at = fields.AwareDateTime()


@output
class MeetingPageSchema(Schema):
    meetings = fields.List(fields.Nested(MeetingSchema))
    next_before = fields.Integer(allow_none=True)


@output
class PresenceSchema(Schema):
    online = fields.Boolean()
    last_seen = fields.AwareDateTime(allow_none=True)
    devices = fields.Integer()


class PresenceQuery(Schema):
    ids = fields.String(required=True, validate=Pattern(r"^[0-9]{1,19}(,[0-9]{1,19}){0,99}$", error="1 to 100 comma-separated user ids."))


@output
class PresenceManySchema(Schema):
    users = fields.Dict(keys=fields.String(), values=fields.Nested(PresenceSchema))
