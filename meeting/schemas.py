"""Marshmallow schemas: every request body and query, every response body.

The OpenAPI document is generated from these, so a schema here is the contract.
"""

from __future__ import annotations

from marshmallow import Schema, fields, validate

USERNAME = validate.Regexp(r"^[A-Za-z0-9_.-]{3,32}$", error="3-32 characters of letters, digits, '_', '.', '-'.")


class RegisterSchema(Schema):
    username = fields.String(required=True, validate=USERNAME)
    password = fields.String(required=True, validate=validate.Length(8, 128))
    display_name = fields.String(load_default=None, allow_none=True, validate=validate.Length(1, 64))


class LoginSchema(Schema):
    username = fields.String(required=True, validate=validate.Length(1, 64))
    password = fields.String(required=True, validate=validate.Length(1, 256))


class UserSchema(Schema):
    id = fields.Integer()
    username = fields.String()
    display_name = fields.String()
    created_at = fields.AwareDateTime()


class LoginResponseSchema(Schema):
    access_token = fields.String()
    token_type = fields.String()
    expires_in = fields.Integer()
    user = fields.Nested(UserSchema)


class UserSearchQuery(Schema):
    q = fields.String(load_default="", validate=validate.Length(max=32))
    limit = fields.Integer(load_default=20, validate=validate.Range(1, 100))
    after = fields.String(load_default=None, validate=validate.Length(1, 32))


class UserListSchema(Schema):
    users = fields.List(fields.Nested(UserSchema))
    next_after = fields.String(allow_none=True)


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
