#!/usr/bin/env python3
"""Manage client API keys from the command line.

Through the admin API of a running gateway (the admin token is read from ADMIN_API_TOKEN, never
from the command line, where other users of the machine could see it):

    ADMIN_API_TOKEN=... scripts/api_keys.py --url https://gateway.example create --owner acme

Or straight against the keys' Redis, to bootstrap the first key before anything is deployed:

    scripts/api_keys.py --redis redis://127.0.0.1:6379/0 create --owner ops --label smoke

Commands: create, list, show KEY_ID, patch KEY_ID, roll KEY_ID, revoke KEY_ID, activate KEY_ID,
delete KEY_ID, and plans (list, show NAME, create NAME, update NAME, delete NAME). patch, roll
and plans go through the admin API (--url). Output is JSON on stdout; the raw key appears once,
in the answer to ``create`` or ``roll``. Limits, quotas, scopes and metadata are given as JSON:

    scripts/api_keys.py --url ... plans create pro --limits '[{"max":10,"windowSeconds":1}]' \
        --quota '{"max":100000,"period":"month"}' --cache-hits-free
    scripts/api_keys.py --url ... patch KEY_ID --plan pro --metadata '{"crm":"42"}'
    scripts/api_keys.py --url ... roll KEY_ID --grace-seconds 86400
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
        self._root = base_url.rstrip("/") + "/internal"
        self._base = self._root + "/api-keys"

    def _call(
        self,
        method: str,
        path: str = "",
        body: dict[str, Any] | None = None,
        *,
        root: str | None = None,
        params: dict[str, str] | None = None,
    ) -> Any:
        import requests

        url = (root or self._base) + path
        try:
            response = self._session.request(method, url, json=body, params=params, timeout=15)
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

    def list(self, filters: dict[str, str]) -> Any:
        """Every page: the API hands out keys a page at a time."""
        items: list[Any] = []
        params = {"limit": "500", **filters}
        while True:
            page = self._call("GET", params=params)
            items += page["items"]
            if not page.get("nextCursor"):
                return {"items": items}
            params["cursor"] = page["nextCursor"]

    def show(self, key_id: str) -> Any:
        return self._call("GET", f"/{key_id}")

    def patch(self, key_id: str, fields: dict[str, Any]) -> Any:
        return self._call("PATCH", f"/{key_id}", fields)

    def roll(self, key_id: str, grace_s: int) -> Any:
        return self._call("POST", f"/{key_id}/roll", {"gracePeriodSeconds": grace_s})

    def plans(self, action: str, name: str | None, body: dict[str, Any]) -> Any:
        root = self._root + "/plans"
        if action == "list":
            return self._call("GET", root=root)
        if action == "create":
            return self._call("POST", body={"name": name, **body}, root=root)
        if action == "update":
            return self._call("PUT", f"/{name}", body, root=root)
        return self._call("DELETE" if action == "delete" else "GET", f"/{name}", root=root)

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
            plan=fields.get("plan"),
        )
        return {**record.to_json(), "apiKey": raw_key}

    def list(self, filters: dict[str, str]) -> Any:
        records = self._registry.list()
        shown = [record.to_json() for record in records]
        return {
            "items": [item for item in shown if all(item.get(k) == v for k, v in filters.items())]
        }

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
    create.add_argument("--plan", help="the plan the key is on (default: 'default')")
    listing = commands.add_parser("list", help="list keys (metadata only)")
    listing.add_argument("--owner")
    listing.add_argument("--status", choices=("active", "revoked", "expired"))
    listing.add_argument("--plan")
    for action in ("show", "revoke", "activate", "delete"):
        commands.add_parser(action, help=f"{action} a key").add_argument("key_id")
    patch = commands.add_parser("patch", help="change fields of a key (--url)")
    patch.add_argument("key_id")
    # Left out: unchanged (SUPPRESS leaves no attribute), so that null can mean "clear it".
    for flag in ("--label", "--contact", "--expires-at", "--plan"):
        patch.add_argument(flag, default=argparse.SUPPRESS, help="'null' clears it")
    for flag in ("--limits", "--quota", "--metadata", "--scopes", "--allowed-ips"):
        patch.add_argument(
            flag, type=_json_arg, default=argparse.SUPPRESS, help="JSON; null clears it"
        )
    roll = commands.add_parser("roll", help="replace a key; the old one works for the grace")
    roll.add_argument("key_id")
    roll.add_argument("--grace-seconds", type=int, required=True)
    plans = commands.add_parser("plans", help="list, show, create, update or delete plans")
    plans.add_argument("action", choices=("list", "show", "create", "update", "delete"))
    plans.add_argument("name", nargs="?")
    plans.add_argument("--limits", type=_json_arg, help='JSON, e.g. [{"max":10,"windowSeconds":1}]')
    plans.add_argument("--quota", type=_json_arg, help='JSON, e.g. {"max":1000,"period":"day"}')
    plans.add_argument("--cache-hits-free", action="store_true")
    plans.add_argument("--share-by-owner", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "plans" and args.action != "list" and not args.name:
        parser.error(f"plans {args.action} needs a plan name")
    if args.command in ("patch", "roll", "plans") and not args.url:
        parser.error(f"{args.command} goes through the admin API: use --url")
    return args


def _json_arg(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not JSON: {value[:40]!r}") from None


def _patch_fields(args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, attribute in (
        ("label", "label"),
        ("contact", "contact"),
        ("expiresAt", "expires_at"),
        ("plan", "plan"),
    ):
        if hasattr(args, attribute):
            value = getattr(args, attribute)
            fields[name] = None if value == "null" else value
    for name, attribute in (
        ("limits", "limits"),
        ("quota", "quota"),
        ("metadata", "metadata"),
        ("scopes", "scopes"),
        ("allowedIps", "allowed_ips"),
    ):
        if hasattr(args, attribute):
            fields[name] = getattr(args, attribute)
    return fields


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
                    "plan": args.plan,
                }
            )
            print("The key is shown only now; store it safely.", file=sys.stderr)
        elif args.command == "list":
            filters = {
                name: value
                for name, value in (
                    ("owner", args.owner),
                    ("status", args.status),
                    ("plan", args.plan),
                )
                if value
            }
            result = backend.list(filters)
        elif args.command == "show":
            result = backend.show(args.key_id)
        elif isinstance(backend, AdminApi) and args.command == "patch":
            result = backend.patch(args.key_id, _patch_fields(args))
        elif isinstance(backend, AdminApi) and args.command == "roll":
            result = backend.roll(args.key_id, args.grace_seconds)
            print("The new key is shown only now; store it safely.", file=sys.stderr)
        elif isinstance(backend, AdminApi) and args.command == "plans":
            body: dict[str, Any] = {}
            if args.action in ("create", "update"):
                body = {
                    "limits": args.limits,
                    "quota": args.quota,
                    "cacheHitsFree": args.cache_hits_free,
                    "shareByOwner": args.share_by_owner,
                }
            result = backend.plans(args.action, args.name, body)
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
