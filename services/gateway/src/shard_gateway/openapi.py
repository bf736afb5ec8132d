"""The OpenAPI 3 document of the management REST API, made from the bindings its routes are made
from (`management.bindings`).

Schemas follow the proto3 JSON mapping the gateway speaks: camelCase properties, 64-bit integers
as decimal strings, enums by name, Timestamp as an RFC 3339 date-time, Duration as seconds with an
`s`, FieldMask as comma-separated paths, bytes as base64, maps as objects and repeated fields as
arrays. Messages and enums are components referred to by `$ref`, so recursive messages need
nothing special. OUTPUT_ONLY fields are `readOnly`; REQUIRED marks parameters and request
bodies, not the properties of messages, which also serve partial updates. Every operation takes
an API key as a bearer token, and answers 200 with its response message or, with the HTTP status
of the gRPC code, the gateway's error object.

The generated descriptors carry no comments, so operations are described by their RPC's name.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from google.api import field_behavior_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from shard_core.errors import http_status

if TYPE_CHECKING:
    from shard_gateway.management import Binding

Schema = dict[str, Any]

JSON = "application/json"
ERROR = "Error"
SECURITY_SCHEME = "bearerAuth"
_F = FieldDescriptor
_INT32: Schema = {"type": "integer", "format": "int32"}
_UINT32: Schema = {"type": "integer", "format": "int64", "minimum": 0, "maximum": 2**32 - 1}
_INT64: Schema = {"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"}
_UINT64: Schema = {"type": "string", "format": "uint64", "pattern": "^[0-9]+$"}
SCALARS: Mapping[int, Schema] = {
    _F.TYPE_DOUBLE: {"type": "number", "format": "double"},
    _F.TYPE_FLOAT: {"type": "number", "format": "float"},
    _F.TYPE_INT32: _INT32,
    _F.TYPE_SINT32: _INT32,
    _F.TYPE_SFIXED32: _INT32,
    _F.TYPE_UINT32: _UINT32,
    _F.TYPE_FIXED32: _UINT32,
    _F.TYPE_INT64: _INT64,
    _F.TYPE_SINT64: _INT64,
    _F.TYPE_SFIXED64: _INT64,
    _F.TYPE_UINT64: _UINT64,
    _F.TYPE_FIXED64: _UINT64,
    _F.TYPE_BOOL: {"type": "boolean"},
    _F.TYPE_STRING: {"type": "string"},
    _F.TYPE_BYTES: {"type": "string", "format": "byte"},
}
# Well-known types with a JSON form of their own; wrappers take their value's.
WELL_KNOWN: Mapping[str, Schema] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$"},
    "google.protobuf.FieldMask": {"type": "string"},
    "google.protobuf.Struct": {"type": "object"},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Empty": {"type": "object"},
    "google.protobuf.Any": {"type": "object", "required": ["@type"]},
}
_WRAPPERS = "google/protobuf/wrappers.proto"
ERROR_SCHEMA: Schema = {
    "type": "object",
    "required": ["error", "code"],
    "properties": {
        "error": {"type": "string", "description": "What went wrong, for people."},
        "code": {"type": "string", "description": "The gRPC status code, such as `NOT_FOUND`."},
        "reason": {
            "type": "string",
            "description": "Why, as an UPPER_SNAKE reason to act on, such as `KEY_REVOKED`.",
        },
    },
}


def document(bindings: Sequence[Binding]) -> Schema:
    """The OpenAPI 3.0 document of the bindings' routes."""
    schemas = _Schemas()
    errors = _error_statuses()
    paths: dict[str, dict[str, Schema]] = {}
    for binding in bindings:
        operations = paths.setdefault(binding.path, {})
        operations[binding.http_method.lower()] = _operation(binding, schemas, errors.keys())
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "AI Shard management API",
            "version": "v1",
            "description": "Nodes, blobs, models, deployments and API keys, over REST.",
        },
        "paths": paths,
        "components": {
            "schemas": {ERROR: ERROR_SCHEMA, **schemas.components},
            "responses": {
                f"{ERROR}{status}": {
                    "description": ", ".join(codes),
                    "content": {JSON: {"schema": _ref(ERROR)}},
                }
                for status, codes in errors.items()
            },
            "securitySchemes": {
                SECURITY_SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key's secret, or the operator's admin token.",
                }
            },
        },
    }


def _operation(binding: Binding, schemas: _Schemas, errors: Collection[int]) -> Schema:
    rpc = binding.rpc
    parameters = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {"type": "string"},
            "description": f"The `{{{name}}}` of `{'.'.join(variable.field)}`, "
            f"`{variable.pattern}`.",
        }
        for variable in binding.variables
        for name in variable.parameters
    ]
    parameters += [
        {
            "name": field.name,
            "in": "query",
            "required": field_behavior_pb2.REQUIRED in _behaviour(field),
            "schema": schemas.field(field),
        }
        for field in _query_fields(binding)
    ]
    operation: Schema = {
        "operationId": binding.operation_id,
        "summary": rpc.name,
        "description": f"`{rpc.full_name}` over REST.",
        "tags": [rpc.containing_service.name],
        "security": [{SECURITY_SCHEME: []}],
        "parameters": parameters,
        "responses": {
            "200": {
                "description": f"The `{rpc.output_type.name}`.",
                "content": {JSON: {"schema": schemas.message(rpc.output_type)}},
            },
            **{
                str(status): {"$ref": f"#/components/responses/{ERROR}{status}"}
                for status in errors
            },
        },
    }
    body = _request_body(binding, schemas)
    if body is not None:
        operation["requestBody"] = body
    return operation


def _request_body(binding: Binding, schemas: _Schemas) -> Schema | None:
    if not binding.body:
        return None
    if binding.body == "*":
        schema = schemas.object(binding.rpc.input_type, leaving_out=binding.path_fields)
        required = False
    else:
        field = binding.rpc.input_type.fields_by_name[binding.body]
        schema, required = schemas.field(field), field_behavior_pb2.REQUIRED in _behaviour(field)
    return {"required": required, "content": {JSON: {"schema": schema}}}


def _query_fields(binding: Binding) -> list[FieldDescriptor]:
    """The request fields a query parameter sets: those neither in the path nor the body whose
    JSON is a single value, or a list of them."""
    if binding.body == "*":
        return []
    bound = binding.path_fields | {binding.body}
    return [
        field
        for field in binding.rpc.input_type.fields
        if field.name not in bound
        and (field.message_type is None or _is_one_value(field.message_type))
    ]


def _is_one_value(message: Descriptor) -> bool:
    """Whether a message's JSON is a single string, number or boolean (a well-known type)."""
    return (
        message.file.name == _WRAPPERS
        or WELL_KNOWN.get(message.full_name, {}).get("type") == "string"
    )


def _error_statuses() -> dict[int, list[str]]:
    """The HTTP statuses of errors, each with the gRPC codes that map to it."""
    statuses: dict[int, list[str]] = {}
    for code in grpc.StatusCode:
        if code is not grpc.StatusCode.OK:
            statuses.setdefault(http_status(code), []).append(code.name)
    return dict(sorted(statuses.items()))


def _behaviour(field: FieldDescriptor) -> Collection[int]:
    return list(field.GetOptions().Extensions[field_behavior_pb2.field_behavior])


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


class _Schemas:
    """JSON Schemas of fields, with the messages and enums they refer to collected as
    components."""

    def __init__(self) -> None:
        self.components: dict[str, Schema] = {}

    def field(self, field: FieldDescriptor) -> Schema:
        """A field's schema: its type's, in an array when repeated; an object when a map."""
        entry = field.message_type
        schema: Schema
        if entry is not None and entry.GetOptions().map_entry:
            schema = {"type": "object", "additionalProperties": self._value(entry.fields[1])}
        elif field.is_repeated:
            schema = {"type": "array", "items": self._value(field)}
        else:
            schema = self._value(field)
        if field_behavior_pb2.OUTPUT_ONLY in _behaviour(field):
            # OpenAPI 3.0 ignores keywords beside a `$ref`.
            schema = {"allOf": [schema]} if "$ref" in schema else schema
            schema["readOnly"] = True
        return schema

    def message(self, message: Descriptor) -> Schema:
        """A `$ref` to the message's component, or a well-known type's own schema."""
        if message.full_name in WELL_KNOWN:
            return dict(WELL_KNOWN[message.full_name])
        if message.file.name == _WRAPPERS:
            return self._value(message.fields_by_name["value"])
        if message.full_name not in self.components:
            self.components[message.full_name] = {}  # what a recursive reference finds
            self.components[message.full_name] = self.object(message)
        return _ref(message.full_name)

    def object(self, message: Descriptor, *, leaving_out: Collection[str] = ()) -> Schema:
        """A message's fields as an object's properties, but those `leaving_out` names; there
        are no others (the gateway refuses unknown fields)."""
        properties = {
            field.json_name: self.field(field)
            for field in message.fields
            if field.name not in leaving_out
        }
        return {"type": "object", "properties": properties, "additionalProperties": False}

    def _enum(self, enum: EnumDescriptor) -> Schema:
        self.components.setdefault(
            enum.full_name, {"type": "string", "enum": [value.name for value in enum.values]}
        )
        return _ref(enum.full_name)

    def _value(self, field: FieldDescriptor) -> Schema:
        """The schema of one of a field's values."""
        if field.message_type is not None:
            return self.message(field.message_type)
        if field.enum_type is not None:
            return self._enum(field.enum_type)
        return dict(SCALARS[field.type])
