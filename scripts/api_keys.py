#!/usr/bin/env python3
"""Manage client API keys from the command line.

Through the admin API of a running gateway (the admin token is read from ADMIN_API_TOKEN, never
from the command line, where other users of the machine could see it):

    ADMIN_API_TOKEN=... scripts/api_keys.py --url https://gateway.example create --owner acme

Or straight against the keys' Redis, to bootstrap the first key before anything is deployed:

    scripts/api_keys.py --redis redis://127.0.0.1:6379/0 create --owner ops --label smoke

Commands: create, list, show KEY_ID, revoke KEY_ID, activate KEY_ID, delete KEY_ID. Output is
JSON on stdout; the raw key appears once, in the answer to ``create``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EXIT_USAGE = 2
EXIT_FAILED = 1


class CommandFailed(Exception):
    pass


class AdminApi:
    def __init__(self, base_url: str, token: str) -> None:
        import requests

        self._session = requests.Session()
        self._session.headers["Authorization"] = f"Bearer {token}"
        self._session.headers["X-Admin-Actor"] = os.environ.get("USER", "cli")
        self._base = base_url.rstrip("/") + "/internal/api-keys"

    def _call(self, method: str, path: str = "", body: dict[str, Any] | None = None) -> Any:
        import requests

        try:
            response = self._session.request(method, self._base + path, json=body, timeout=15)
        except requests.exceptions.RequestException as exc:
            raise CommandFailed(f"the gateway could not be reached: {type(exc).__name__}") from None
        if response.status_code >= 400:
            try:
                detail = response.json()
            except ValueError:
                detail = {"message": response.text[:200]}
            raise CommandFailed(f"{response.status_code}: {json.dumps(detail)}")
        return response.json()

    def create(self, fields: dict[str, Any]) -> Any:
        return self._call("POST", "", {k: v for k, v in fields.items() if v is not None})

    def list(self) -> Any:
        return self._call("GET")

    def show(self, key_id: str) -> Any:
        return self._call("GET", f"/{key_id}")

    def change(self, action: str, key_id: str) -> Any:
        if action == "delete":
            return self._call("DELETE", f"/{key_id}")
        return self._call("POST", f"/{key_id}/{action}")


class DirectRedis:
    def __init__(self, url: str, prefix: str) -> None:
        from proxy_app.access.keys import KeyRegistry
        from proxy_app.redis import RedisService

        self._registry = KeyRegistry(RedisService(url, timeout_ms=2000, name="keys"), prefix)

    def create(self, fields: dict[str, Any]) -> Any:
        expires_at = None
        if fields["expiresAt"]:
            expires_at = dt.datetime.fromisoformat(fields["expiresAt"])
            if expires_at.tzinfo is None:
                expires_at = expires_at.replace(tzinfo=dt.UTC)
            if expires_at <= dt.datetime.now(dt.UTC):
                raise CommandFailed("--expires-at must be in the future")
        record, raw_key = self._registry.create(
            owner=fields["owner"],
            label=fields["label"],
            contact=fields["contact"],
            expires_at=expires_at,
            created_by=fields["createdBy"],
        )
        return {**record.to_json(), "apiKey": raw_key}

    def list(self) -> Any:
        return {"items": [record.to_json() for record in self._registry.list()]}

    def show(self, key_id: str) -> Any:
        record = self._registry.get(key_id)
        if record is None:
            raise CommandFailed(f"no API key with id {key_id!r}")
        return record.to_json()

    def change(self, action: str, key_id: str) -> Any:
        changed = getattr(self._registry, action)(key_id)
        if not changed:
            raise CommandFailed(f"no API key with id {key_id!r}")
        return {"ok": True}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="base URL of the gateway (admin API)")
    where.add_argument("--redis", help="Redis URL holding the keys (API_KEYS_REDIS_URL)")
    parser.add_argument(
        "--prefix",
        default=os.environ.get("API_KEYS_REDIS_PREFIX", "api-keys"),
        help="with --redis: the keys' namespace (API_KEYS_REDIS_PREFIX)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="create a key and print it once")
    create.add_argument("--owner", required=True)
    create.add_argument("--label")
    create.add_argument("--contact")
    create.add_argument("--expires-at", help="ISO 8601, e.g. 2027-01-31T00:00:00Z")
    create.add_argument("--created-by", default=os.environ.get("USER"))
    commands.add_parser("list", help="list keys (metadata only)")
    for action in ("show", "revoke", "activate", "delete"):
        commands.add_parser(action, help=f"{action} a key").add_argument("key_id")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.url:
        token = os.environ.get("ADMIN_API_TOKEN", "")
        if not token:
            print("ADMIN_API_TOKEN must be set in the environment", file=sys.stderr)
            return EXIT_USAGE
        backend: AdminApi | DirectRedis = AdminApi(args.url, token)
    else:
        backend = DirectRedis(args.redis, args.prefix)
    try:
        if args.command == "create":
            result = backend.create(
                {
                    "owner": args.owner,
                    "label": args.label,
                    "contact": args.contact,
                    "expiresAt": args.expires_at,
                    "createdBy": args.created_by,
                }
            )
            print("The key is shown only now; store it safely.", file=sys.stderr)
        elif args.command == "list":
            result = backend.list()
        elif args.command == "show":
            result = backend.show(args.key_id)
        else:
            result = backend.change(args.command, args.key_id)
    except CommandFailed as exc:
        print(f"{args.command} failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except ValueError as exc:
        print(f"{args.command} failed: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        from proxy_app.redis import RedisUnavailable

        if isinstance(exc, RedisUnavailable):
            print(f"{args.command} failed: Redis is unavailable", file=sys.stderr)
            return EXIT_FAILED
        raise
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
