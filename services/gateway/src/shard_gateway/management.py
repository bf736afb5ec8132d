"""The management REST API, derived from the protos' `google.api.http` annotations.

Every unary RPC of the registry's services with an HTTP rule gets a route, as grpc-gateway would
serve it:

- The rule's path template becomes the route's path, each wildcard a path parameter named after
  the resource it stands for: `/v1/{name=models/*/versions/*}` is served at
  `/v1/models/{model}/versions/{version}` (the names come from the resource's
  `google.api.resource` pattern). A variable sets its request field, nested ones too
  (`{model.name=models/*}`), to the whole name, `models/simple/versions/1`.
- `body: "*"` reads the JSON body as the request, `body: "field"` as that field; the other fields
  come from the query string (`?page_size=10&page_token=...`), a repeated field from the
  parameter repeated, a `FieldMask` as comma-separated paths (`?update_mask=description,labels`).
- Requests and answers are proto3 JSON: camelCase out, either spelling in, unknown fields
  refused. Answers print every field, defaults included (`"nextPageToken": ""` on the last
  page), as grpc-gateway does. A request that does not fit its message is INVALID_ARGUMENT (400)
  naming the field; the registry's own refusals keep their status and reason
  (`rest.grpc_errors`).

Streaming RPCs have no plain JSON form and get no route: UploadBlob and Connect (client
streaming), ReadBlob and WatchNodes (server streaming); gRPC clients have them all.

`GET /openapi.json` describes the same routes (`openapi`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web
from google.api import annotations_pb2, http_pb2, resource_pb2
from google.protobuf import field_mask_pb2, json_format, message_factory
from google.protobuf.descriptor import (
    Descriptor,
    FieldDescriptor,
    FileDescriptor,
    MethodDescriptor,
    ServiceDescriptor,
)
from google.protobuf.message import Message
from multidict import MultiMapping

from shard.artifact.v1 import artifact_service_pb2
from shard.auth.v1 import key_service_pb2
from shard.deployment.v1 import deployment_service_pb2
from shard.model.v1 import model_service_pb2
from shard.node.v1 import node_service_pb2
from shard.task.v1 import task_service_pb2
from shard_core.errors import InvalidArgumentError
from shard_gateway import openapi
from shard_gateway.callers import upstream_metadata

# The registry's services, whose annotated RPCs the gateway serves over REST.
SERVICES: tuple[ServiceDescriptor, ...] = (
    node_service_pb2.DESCRIPTOR.services_by_name["NodeService"],
    artifact_service_pb2.DESCRIPTOR.services_by_name["ArtifactService"],
    model_service_pb2.DESCRIPTOR.services_by_name["ModelService"],
    deployment_service_pb2.DESCRIPTOR.services_by_name["DeploymentService"],
    key_service_pb2.DESCRIPTOR.services_by_name["KeyService"],
    task_service_pb2.DESCRIPTOR.services_by_name["TaskService"],
)
UPSTREAM_TIMEOUT_S = 10.0
# A path variable: `{field}` or `{field=segments}`.
_VARIABLE = re.compile(r"\{([^}=]+)(?:=([^}]*))?\}")
_RESOURCE_ID = re.compile(r"\{(\w+)\}")

Handler = Callable[[web.Request], Awaitable[web.Response]]


@dataclass(frozen=True, kw_only=True)
class PathVariable:
    """A variable of a path template: the request field it sets (`("model", "name")`) and the
    field's value, a pattern with a path parameter for each wildcard (`models/{model}`)."""

    field: tuple[str, ...]
    pattern: str
    parameters: tuple[str, ...]

    def value(self, path: Mapping[str, str]) -> str:
        """The field's value, from the route's matched path parameters."""
        return self.pattern.format_map(path)


@dataclass(frozen=True, kw_only=True)
class Binding:
    """One RPC's REST face, from one HTTP rule of it."""

    rpc: MethodDescriptor
    operation_id: str  # unique among every binding: `ModelService_GetModel`
    http_method: str  # GET, POST, PATCH, DELETE...
    path: str  # the route, as aiohttp and OpenAPI write it: `/v1/models/{model}`
    variables: tuple[PathVariable, ...]
    body: str  # "" for none, "*" for the whole request, or the request field the body is

    @property
    def path_fields(self) -> set[str]:
        """The request's fields the path sets, or sets a field of."""
        return {variable.field[0] for variable in self.variables}


def bindings(services: Sequence[ServiceDescriptor] = SERVICES) -> list[Binding]:
    """Every HTTP binding of the services' unary RPCs, additional bindings included."""
    files = [service.file for service in services]
    resources = _resource_patterns(files)
    found = []
    for service in services:
        for rpc in service.methods:
            options = rpc.GetOptions()
            if rpc.client_streaming or rpc.server_streaming:
                continue
            if not options.HasExtension(annotations_pb2.http):
                continue
            rule = options.Extensions[annotations_pb2.http]
            for index, binding in enumerate([rule, *rule.additional_bindings]):
                suffix = f"_{index}" if index else ""
                found.append(
                    _binding(rpc, binding, resources, f"{service.name}_{rpc.name}{suffix}")
                )
    return found


def _resource_patterns(files: Iterable[FileDescriptor]) -> dict[str, tuple[str, ...]]:
    """Every resource name pattern the files and their imports declare, with its ids replaced by
    wildcards (`models/*/versions/*`), and the ids' names (`model`, `version`)."""
    patterns: dict[str, tuple[str, ...]] = {}
    seen: set[str] = set()
    pending = list(files)
    while pending:
        file = pending.pop()
        if file.name in seen:
            continue
        seen.add(file.name)
        pending.extend(file.dependencies)
        for message in file.message_types_by_name.values():
            for pattern in message.GetOptions().Extensions[resource_pb2.resource].pattern:
                patterns[_RESOURCE_ID.sub("*", pattern)] = tuple(_RESOURCE_ID.findall(pattern))
    return patterns


def _binding(
    rpc: MethodDescriptor,
    rule: http_pb2.HttpRule,
    resources: Mapping[str, tuple[str, ...]],
    operation_id: str,
) -> Binding:
    kind = rule.WhichOneof("pattern")
    if kind == "custom":
        http_method, template = rule.custom.kind.upper(), rule.custom.path
    else:
        http_method, template = kind.upper(), getattr(rule, kind)
    variables: list[PathVariable] = []

    def expand(match: re.Match[str]) -> str:
        field, segments = match[1], match[2] or "*"
        names = resources.get(segments)
        wildcards = segments.split("/").count("*")
        if names is None:
            stem = field.replace(".", "_")
            names = (stem,) if wildcards == 1 else tuple(f"{stem}_{i}" for i in range(wildcards))
        parts = iter(names)
        pattern = "/".join(
            f"{{{next(parts)}}}" if part == "*" else part for part in segments.split("/")
        )
        variables.append(
            PathVariable(field=tuple(field.split(".")), pattern=pattern, parameters=names)
        )
        return pattern

    path = _VARIABLE.sub(expand, template)
    if "*" in path or rule.response_body:
        raise ValueError(
            f"{rpc.full_name}: the gateway does not serve {template!r} "
            "(wildcards outside a variable, '**' and response_body are not supported)"
        )
    return Binding(
        rpc=rpc,
        operation_id=operation_id,
        http_method=http_method,
        path=path,
        variables=tuple(variables),
        body=rule.body,
    )


def parse_request(
    binding: Binding, *, path: Mapping[str, str], query: MultiMapping[str], body: bytes
) -> Message:
    """The RPC's request from an HTTP request's parts: the query string, then the body, then the
    path variables. A part that does not fit the request is INVALID_ARGUMENT naming the field."""
    fields = _query_json(binding.rpc.input_type, query)
    if binding.body and body.strip():
        content = _body_json(body)
        if binding.body != "*":
            fields[binding.body] = content
        elif isinstance(content, dict):
            fields.update(content)
        else:
            raise InvalidArgumentError(
                "the request body must be a JSON object", metadata={"field": "body"}
            )
    request = message_factory.GetMessageClass(binding.rpc.input_type)()
    # ParseDict lets out the OverflowError of a JSON integer too large for a float field.
    try:
        json_format.ParseDict(fields, request)
    except (json_format.ParseError, OverflowError) as error:
        raise InvalidArgumentError(str(error)) from None
    for variable in binding.variables:
        *parents, leaf = variable.field
        target = request
        for name in parents:
            target = getattr(target, name)
        setattr(target, leaf, variable.value(path))
    if binding.http_method == "PATCH":
        _mask_from_body(binding, request, fields.get(binding.body))
    return request


# Fields that name or version a resource: never "updated", so never in an inferred mask.
_NOT_UPDATED = {"name", "etag"}


def _mask_from_body(binding: Binding, request: Message, content: Any) -> None:
    """A PATCH without `update_mask` updates the fields its body carries, as grpc-gateway does,
    rather than every updatable field."""
    descriptor = binding.rpc.input_type
    mask_field = descriptor.fields_by_name.get("update_mask")
    body_field = descriptor.fields_by_name.get(binding.body)
    if mask_field is None or body_field is None or not isinstance(content, dict):
        return
    mask = getattr(request, "update_mask")  # noqa: B009
    if mask.paths:
        return
    known = {**_json_fields(body_field.message_type), **body_field.message_type.fields_by_name}
    mask.paths.extend(
        known[key].name for key in content if key in known and known[key].name not in _NOT_UPDATED
    )
    if not mask.paths:
        raise InvalidArgumentError(
            f"the body names no field of {binding.body} to update",
            metadata={"field": "update_mask"},
        )


def _query_json(message: Descriptor, query: MultiMapping[str]) -> dict[str, Any]:
    """The query string as the request's proto3 JSON."""
    fields: dict[str, Any] = {}
    for key in dict.fromkeys(query):
        field = message.fields_by_name.get(key) or _json_fields(message).get(key)
        if field is None:
            raise InvalidArgumentError(
                f"unknown query parameter {key!r}: {message.name} has no such field",
                metadata={"field": key},
            )
        values = [_query_value(field, value) for value in query.getall(key)]
        if field.is_repeated:
            fields[field.name] = values
        elif len(values) == 1:
            fields[field.name] = values[0]
        else:
            raise InvalidArgumentError(
                f"{field.name} is given more than once", metadata={"field": field.name}
            )
    return fields


def _json_fields(message: Descriptor) -> dict[str, FieldDescriptor]:
    return {field.json_name: field for field in message.fields}


def _query_value(field: FieldDescriptor, value: str) -> Any:
    """A query parameter's value as proto3 JSON: JSON's own booleans, and field masks as
    grpc-gateway takes them (proto field names) or as JSON writes them (camelCase)."""
    if field.type == FieldDescriptor.TYPE_BOOL:
        return {"true": True, "false": False}.get(value, value)
    if field.message_type is field_mask_pb2.FieldMask.DESCRIPTOR and "_" in value:
        try:
            return field_mask_pb2.FieldMask(paths=value.split(",")).ToJsonString()
        except ValueError as error:
            raise InvalidArgumentError(
                f"{field.name}: {error}", metadata={"field": field.name}
            ) from None
    return value


def _body_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as error:
        raise InvalidArgumentError(
            f"the request body is not valid JSON: {error}", metadata={"field": "body"}
        ) from None


def _route(binding: Binding, registry: grpc.aio.Channel, timeout_s: float) -> Handler:
    """The aiohttp handler of one binding: a generic unary call over the registry's channel."""
    rpc = binding.rpc
    call: grpc.aio.UnaryUnaryMultiCallable[Message, Message] = registry.unary_unary(
        f"/{rpc.containing_service.full_name}/{rpc.name}",
        request_serializer=message_factory.GetMessageClass(rpc.input_type).SerializeToString,
        response_deserializer=message_factory.GetMessageClass(rpc.output_type).FromString,
    )

    async def handle(request: web.Request) -> web.Response:
        message = parse_request(
            binding,
            path=request.match_info,
            query=request.query,
            body=await request.read() if binding.body else b"",
        )
        reply = await call(message, timeout=timeout_s, metadata=upstream_metadata(request))
        return web.json_response(
            json_format.MessageToDict(reply, always_print_fields_with_no_presence=True)
        )

    return handle


def add_routes(
    app: web.Application, registry: grpc.aio.Channel, *, timeout_s: float = UPSTREAM_TIMEOUT_S
) -> None:
    """Add a REST route for every annotated RPC of the registry's services, and
    `GET /openapi.json` describing them."""
    found = bindings()
    # Longer paths first: `/v1/deployments/{deployment}:explain` before the plain
    # `/v1/deployments/{deployment}`, whose parameter would otherwise take `d:explain`.
    for binding in sorted(found, key=lambda binding: binding.path, reverse=True):
        app.router.add_route(
            binding.http_method, binding.path, _route(binding, registry, timeout_s)
        )
    document = openapi.document(found)

    async def serve_document(request: web.Request) -> web.Response:
        return web.json_response(document)

    app.router.add_get("/openapi.json", serve_document)
