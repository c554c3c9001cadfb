"""The OpenAPI 3.1 description of the API, served at ``/api/openapi.json`` (docs/SERVER.md says
the same in prose)."""

from __future__ import annotations

from typing import Any

from . import protocol

_ERR = {"description": "refused: {\"error\": \"one line\"}",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_IDS = {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Ids"}}}}
_STREAM = {"application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                                   "description": "object records, see docs/SERVER.md"}}}

# What the database integrations recorded (``consistency``), as server.service ``_consistency`` checks it.
_SCALAR = {"oneOf": [{"type": "string", "maxLength": 4096}, {"type": "number"}, {"type": "boolean"}, {"type": "null"}]}
_CONSISTENCY = {"type": "object", "maxProperties": 64, "additionalProperties": {
    "type": "object", "maxProperties": 64,
    "additionalProperties": {"oneOf": [_SCALAR, {"type": "array", "maxItems": 100000, "items": _SCALAR}]}}}
# The point's ``snapshot`` record, as server.service ``_snapshot`` checks it.
_SNAPSHOT = {"oneOf": [
    {"const": "none"},
    {"type": "object", "additionalProperties": False, "required": ["method", "taken_at", "held_s"],
     "properties": {"method": {"enum": ["btrfs", "lvm", "reflink"]}, "taken_at": {"type": "string"},
                    "held_s": {"type": "number", "minimum": 0}, "path": {"type": "string", "maxLength": 4096},
                    "subvol": {"type": "object", "additionalProperties": False,
                               "required": ["uuid", "parent_uuid", "ctransid"],
                               "properties": {"uuid": {"type": "string", "maxLength": 64},
                                              "parent_uuid": {"type": "string", "maxLength": 64},
                                              "ctransid": {"type": "integer"}}}}},
]}


def _op(summary: str, ok: dict[str, Any], body: dict[str, Any] | None = None, errors: tuple[int, ...] = (400, 401)) -> dict:
    op: dict[str, Any] = {"summary": summary, "security": [{"token": []}],
                          "responses": {"200": ok, **{str(c): _ERR for c in (*errors, 429)}}}
    if body is not None:
        op["requestBody"] = body
    return op


def _json(desc: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": desc, "content": {"application/json": {"schema": schema}}}


def document() -> dict[str, Any]:
    """The OpenAPI document (a fresh dict)."""
    hexid = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
    return {
        "openapi": "3.1.0",
        "info": {"title": "pointsafe safe server", "version": "1",
                 "description": "Agents back up into, and restore their own points from, one safe. See docs/SERVER.md."},
        "components": {
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer",
                                          "description": "an agent token from 'pointsafe agent add'"}},
            "schemas": {
                "Error": {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]},
                "Ids": {"type": "object", "properties": {"ids": {"type": "array", "items": hexid,
                                                                  "maxItems": protocol.MAX_IDS}},
                        "required": ["ids"]},
                "Point": {"type": "object", "description": "a point record (docs/FORMAT.md), root as the agent's id",
                          "properties": {"name": {"type": "string"}, "kind": {"enum": ["tree", "volume"]},
                                         "block_size": {"type": "integer"},
                                         "source_stat": {"type": "array", "items": {"type": "integer"}},
                                         "source": {"type": "string"}, "root": {"oneOf": [hexid, {"type": "null"}]},
                                         "host": {"type": "string"}, "started": {"type": "string"},
                                         "finished": {"type": "string"}, "size": {"type": "integer"},
                                         "root_meta": {"type": "object"}, "stats": {"type": "object"},
                                         "labels": {"type": "object"}, "warnings": {"type": "array"},
                                         "snapshot": _SNAPSHOT, "consistency": _CONSISTENCY,
                                         "change_source": {"type": "object", "additionalProperties": False,
                                                           "required": ["kind", "detail", "fallback"],
                                                           "properties": {
                                                               "kind": {"enum": ["full", "ranges-file", "qemu-bitmap",
                                                                                 "btrfs-send"]},
                                                               "detail": {"type": "string", "maxLength": 4096},
                                                               "fallback": {"type": ["string", "null"],
                                                                            "maxLength": 4096}}},
                                         "qemu_bitmap": {"type": "object", "additionalProperties": False,
                                                         "required": ["base", "name", "generation"],
                                                         "properties": {"base": {"type": "string"},
                                                                        "name": {"type": "string"},
                                                                        "generation": {"type": "integer"}}},
                                         "source_format": {"const": "qcow2"},
                                         "walk": {"type": "object", "additionalProperties": False,
                                                  "required": ["excludes", "one_file_system"],
                                                  "properties": {
                                                      "excludes": {"type": "array", "items": {"type": "string"}},
                                                      "one_file_system": {"type": "boolean"}}}},
                          "required": ["name", "kind", "source", "root"]},
            },
        },
        "paths": {
            "/api/v1/info": {"get": _op("the safe's chunking settings and what this agent may do",
                                        _json("settings", {"type": "object"}), errors=(401,))},
            "/api/v1/objects/missing": {"post": _op(
                "which of these ids this agent has not uploaded (others' objects read as missing)",
                _json("the missing ids", {"type": "object", "properties": {"missing": {"type": "array", "items": hexid}}}),
                _IDS)},
            "/api/v1/objects": {"post": _op(
                "upload objects (verified, then stored all or none)",
                _json("counts", {"type": "object", "properties": {"received": {"type": "integer"}}}),
                {"required": True, "content": _STREAM}, errors=(400, 401, 413, 422, 503, 507))},
            "/api/v1/objects/fetch": {"post": _op(
                "read this agent's objects, chunks as stored (zstd frames: the agent decompresses and checks "
                "each against its id; file contents need --can-restore); may return fewer than asked",
                {"description": "object records", "content": _STREAM}, _IDS, errors=(400, 401, 403, 404))},
            "/api/v1/points": {
                "get": _op("this agent's points, oldest first",
                           _json("points", {"type": "object", "properties": {
                               "points": {"type": "array", "items": {"$ref": "#/components/schemas/Point"}}}}),
                           errors=(401,)),
                "post": _op("commit a point (atomically)", _json("the point", {"$ref": "#/components/schemas/Point"}),
                            {"required": True, "content": {"application/json": {
                                "schema": {"$ref": "#/components/schemas/Point"}}}},
                            errors=(400, 401, 403, 409, 413, 503)),
            },
            "/api/v1/admin/agents": {"get": _op(
                "every agent: sources, rights, last contact, points, bytes stored and quotas (admin tokens only)",
                _json("agents", {"type": "object", "properties": {"agents": {"type": "array",
                                                                             "items": {"type": "object"}}}}),
                errors=(401, 403))},
            "/api/v1/admin/forget": {"post": _op(
                "forget points by id (admin tokens only; gc, run on the server, reclaims their space)",
                _json("the points forgotten", {"type": "object"}),
                {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "properties": {"points": {"type": "array", "items": hexid}}}}}},
                errors=(400, 401, 403, 404, 503))},
        },
    }
