"""What every registry resource shares: ids, resource names, timestamps, etags, update masks."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from google.api import field_behavior_pb2
from google.protobuf import field_mask_pb2, timestamp_pb2
from google.protobuf.message import Message

from shard_core.errors import AbortedError, InvalidArgumentError, require

RESOURCE_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
VERSION_ID = re.compile(r"[1-9][0-9]{0,8}")


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def seconds(stamp: timestamp_pb2.Timestamp) -> float:
    return stamp.ToNanoseconds() / 1e9


def clear_output_only(message: Message) -> None:
    """Clear every field the proto marks OUTPUT_ONLY: what the registry sets, never a caller."""
    for field in message.DESCRIPTOR.fields:
        behaviour = field.GetOptions().Extensions[field_behavior_pb2.field_behavior]
        if field_behavior_pb2.OUTPUT_ONLY in behaviour:
            message.ClearField(field.name)


def check_id(value: str, field: str) -> str:
    require(value, field)
    if not RESOURCE_ID.fullmatch(value):
        raise InvalidArgumentError(
            f"{field} {value!r} must be lowercase letters, digits, '_' or '-', starting with a "
            "letter or digit, at most 63 characters",
            metadata={"field": field},
        )
    return value


def parse_name(name: str, pattern: str, field: str = "name") -> list[str]:
    """The ids in a resource name that follows `pattern`, such as `models/{}/versions/{}`."""
    require(name, field)
    literal = pattern.split("/")
    parts = name.split("/")
    if len(parts) != len(literal) or any(
        want not in ("{}", got) for want, got in zip(literal, parts, strict=True)
    ):
        raise InvalidArgumentError(
            f"{field} must look like {pattern.replace('{}', '{id}')}, got {name!r}",
            metadata={"field": field},
        )
    ids = [got for want, got in zip(literal, parts, strict=True) if want == "{}"]
    if not all(ids):
        raise InvalidArgumentError(f"{field} {name!r} has an empty id", metadata={"field": field})
    return ids


def filter_terms(text: str) -> list[tuple[str, str]]:
    """The `key=value` terms of a list filter, joined by AND (`state=ACTIVE AND labels.a=b`)."""
    terms = []
    for part in filter(None, (p.strip() for p in re.split(r"\s+AND\s+", text.strip()))):
        key, sep, value = (piece.strip() for piece in part.partition("="))
        if not sep or not value:
            raise InvalidArgumentError(
                f"filter term {part!r} must be key=value", metadata={"field": "filter"}
            )
        terms.append((key, value))
    return terms


def enum_value(enum: Any, prefix: str, value: str, what: str, field: str) -> int:
    """The value of `{prefix}{VALUE}` in a proto enum, or INVALID_ARGUMENT naming `field`."""
    wanted = f"{prefix}{value.upper()}"
    if wanted not in enum.keys():  # noqa: SIM118 (an enum wrapper)
        raise InvalidArgumentError(f"{field}: {value!r} is not a {what}", metadata={"field": field})
    return int(enum.Value(wanted))


def check_etag(etag: str, revision: int, name: str) -> None:
    if etag and etag != str(revision):
        raise AbortedError(
            f"{name} changed since etag {etag} was read (now {revision}); read it again",
            reason="ETAG_MISMATCH",
            metadata={"name": name},
        )


def apply_mask(
    target: object, source: object, mask: field_mask_pb2.FieldMask, allowed: Sequence[str]
) -> None:
    """Copy the masked fields from `source` to `target`; an empty mask means every allowed one."""
    paths = list(mask.paths) or list(allowed)
    for path in paths:
        if path not in allowed:
            raise InvalidArgumentError(
                f"update_mask path {path!r} cannot be updated; allowed: {', '.join(allowed)}",
                metadata={"field": "update_mask"},
            )
    for path in paths:
        target.ClearField(path)  # type: ignore[attr-defined]
        if path in {"labels"}:
            getattr(target, path).update(getattr(source, path))
        elif hasattr(getattr(source, path), "CopyFrom"):
            getattr(target, path).CopyFrom(getattr(source, path))
        elif isinstance(getattr(source, path), str | int | bool | float | bytes):
            setattr(target, path, getattr(source, path))
        else:
            getattr(target, path).extend(getattr(source, path))
