"""The admin API's OpenAPI document as tests use it: its paths and methods, and validation of a
real response against the schema the document gives for that operation and status."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from proxy_app.blueprints.admin_openapi import DOCUMENT_PATH

HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_BASE_URI = "urn:proxy-app:openapi"


def load_document() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DOCUMENT_PATH.read_text())
    return document


def path_shape(template: str) -> str:
    """``/a/<key_id>/b`` (werkzeug) and ``/a/{keyId}/b`` (OpenAPI) both become ``/a/{}/b``."""
    return re.sub(r"<[^>]+>|\{[^}]+\}", "{}", template)


def _pointer(*parts: str) -> str:
    return "/" + "/".join(part.replace("~", "~0").replace("/", "~1") for part in parts)


class OpenApiDocument:
    def __init__(self, document: dict[str, Any] | None = None) -> None:
        self.document = document if document is not None else load_document()
        resource = Resource.from_contents(self.document, default_specification=DRAFT202012)
        self.registry: Registry[Any] = Registry().with_resource(_BASE_URI, resource)

    def operations(self) -> set[tuple[str, str]]:
        """Every (path shape, METHOD) the document describes."""
        return {
            (path_shape(path), method.upper())
            for path, item in self.document["paths"].items()
            for method in item
            if method in HTTP_METHODS
        }

    def _resolve(self, node: dict[str, Any], pointer: str) -> tuple[dict[str, Any], str]:
        """Follow a local ``$ref`` (responses are referenced from components)."""
        while "$ref" in node:
            pointer = node["$ref"].removeprefix("#")
            node = self.document
            for part in pointer.strip("/").split("/"):
                node = node[part.replace("~1", "/").replace("~0", "~")]
        return node, pointer

    def validate_response(
        self,
        path: str,
        method: str,
        status: int,
        content_type: str,
        body: bytes,
        headers: dict[str, str],
    ) -> None:
        """Raise AssertionError or jsonschema.ValidationError unless the document describes this
        answer: its status, media type, required headers and (for JSON) body."""
        operation = self.document["paths"][path][method.lower()]
        responses = operation["responses"]
        assert str(status) in responses, f"{method} {path}: status {status} is not documented"
        response, pointer = self._resolve(
            responses[str(status)],
            _pointer("paths", path, method.lower(), "responses", str(status)),
        )
        lowered = {name.lower(): value for name, value in headers.items()}
        for name, header in response.get("headers", {}).items():
            header, _ = self._resolve(header, "")
            if name.lower() in lowered:
                jsonschema.Draft202012Validator(header["schema"]).validate(lowered[name.lower()])
            else:
                assert not header.get("required"), f"{method} {path} {status}: no {name} header"
        media_type = content_type.split(";")[0].strip()
        content = response.get("content", {})
        assert media_type in content, (
            f"{method} {path} {status}: {media_type} is not documented ({sorted(content)})"
        )
        if media_type == "application/json":
            schema_ref = {
                "$ref": _BASE_URI + "#" + pointer + _pointer("content", media_type, "schema")
            }
            validator = jsonschema.Draft202012Validator(
                schema_ref,
                registry=self.registry,
                format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
            )
            validator.validate(json.loads(body))
