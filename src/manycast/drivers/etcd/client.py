"""A small asyncio client of etcd's v3 API through its JSON gateway (`/v3/...` over
HTTP, keys and values base64), with `httpx`: leases, ranges, puts, transactions and
watches, which is all the pool's coordination asks of etcd.

Several endpoints may be given (the cluster's members); after a failed request the
next one is used. Every request has a timeout: a member cut off from its quorum, or
stopped, gives no answer, and the caller must learn that in time.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from manycast.errors import DriverError


class EtcdError(DriverError):
    """etcd did not answer, or answered with an error (the message says which)."""


class LeaseNotFound(EtcdError):
    """The lease named is not (or no longer) in etcd."""


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    lease: int


@dataclass(frozen=True)
class WatchEvent:
    kind: str  # "PUT" or "DELETE"
    item: KeyValue


def b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode()


def prefix_end(prefix: str) -> str:
    """The end of the key range that holds every key starting with `prefix`."""
    raw = prefix.encode()
    return b64(raw[:-1] + bytes([raw[-1] + 1]))


class EtcdClient:
    def __init__(self, endpoints: Sequence[str], timeout: float) -> None:
        if not endpoints:
            raise ValueError("etcd needs at least one endpoint")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout = timeout
        self._current = 0
        self._http = httpx.AsyncClient(timeout=timeout)

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._current]

    async def close(self) -> None:
        await self._http.aclose()

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        url = self.endpoint + path
        try:
            response = await self._http.post(url, json=body)
            answer = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            self._current = (self._current + 1) % len(self.endpoints)
            raise EtcdError(f"{url}: {type(exc).__name__}: {exc}") from None
        return _checked(url, response.status_code, answer)

    # -- leases -----------------------------------------------------------------
    async def grant(self, ttl: int) -> tuple[int, int]:
        """A new lease: (its id, its time to live in seconds)."""
        answer = await self._call("/v3/lease/grant", {"TTL": ttl})
        return int(answer["ID"]), int(answer.get("TTL", ttl))

    async def keep_alive(self, lease: int) -> int:
        """Renew `lease` once: its time to live from now, 0 when etcd has it no more."""
        answer = await self._call("/v3/lease/keepalive", {"ID": str(lease)})
        return int(answer.get("result", {}).get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        await self._call("/v3/lease/revoke", {"ID": str(lease)})

    # -- keys ---------------------------------------------------------------------
    async def range_prefix(self, prefix: str) -> tuple[int, list[KeyValue]]:
        """Every key under `prefix` (a linearizable read): (the store's revision, them)."""
        answer = await self._call(
            "/v3/kv/range", {"key": b64(prefix), "range_end": prefix_end(prefix)}
        )
        revision = int(answer.get("header", {}).get("revision", 0))
        return revision, [_key_value(kv) for kv in answer.get("kvs", [])]

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Write `key` (on `lease` if given): the store's revision after the write."""
        body: dict[str, Any] = {"key": b64(key), "value": b64(value)}
        if lease:
            body["lease"] = str(lease)
        answer = await self._call("/v3/kv/put", body)
        return int(answer.get("header", {}).get("revision", 0))

    async def txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]]) -> bool:
        """Carry out `success` if every comparison holds; whether it was carried out."""
        answer = await self._call("/v3/kv/txn", {"compare": compare, "success": success})
        return bool(answer.get("succeeded", False))

    async def watch(
        self, prefix: str, start_revision: int
    ) -> AsyncIterator[tuple[int, list[WatchEvent]]]:
        """Changes under `prefix` from `start_revision` on, as (revision, events); ends
        with EtcdError when the stream breaks (the caller reads again and watches anew)."""
        body = {
            "create_request": {
                "key": b64(prefix),
                "range_end": prefix_end(prefix),
                "start_revision": str(start_revision),
            }
        }
        url = self.endpoint + "/v3/watch"
        try:
            async with self._http.stream(
                "POST", url, json=body, timeout=httpx.Timeout(self.timeout, read=None)
            ) as response:
                if response.status_code != 200:
                    raise EtcdError(f"{url}: HTTP {response.status_code}")
                async for line in response.aiter_lines():
                    if not line.strip():
                        continue
                    message = _checked(url, 200, json.loads(line))
                    result = message.get("result", {})
                    if result.get("canceled"):
                        raise EtcdError(f"{url}: watch canceled: {result.get('cancel_reason', '')}")
                    revision = int(result.get("header", {}).get("revision", 0))
                    events = [
                        WatchEvent(e.get("type", "PUT"), _key_value(e.get("kv", {})))
                        for e in result.get("events", [])
                    ]
                    if events:
                        yield revision, events
        except (httpx.HTTPError, ValueError) as exc:
            self._current = (self._current + 1) % len(self.endpoints)
            raise EtcdError(f"{url}: {type(exc).__name__}: {exc}") from None
        raise EtcdError(f"{url}: the watch ended")


def _checked(url: str, status: int, answer: object) -> dict[str, Any]:
    if not isinstance(answer, dict):
        raise EtcdError(f"{url}: an answer that is not a JSON object")
    error = answer.get("error")
    if status != 200 or error is not None:
        message = answer.get("message") or (
            error.get("message") if isinstance(error, dict) else error
        )
        text = f"{url}: {message or f'HTTP {status}'}"
        if "lease not found" in str(message):
            raise LeaseNotFound(text)
        raise EtcdError(text)
    return answer


def _key_value(kv: dict[str, Any]) -> KeyValue:
    return KeyValue(
        base64.b64decode(kv.get("key", "")).decode(errors="replace"),
        base64.b64decode(kv.get("value", "")),
        int(kv.get("mod_revision", 0)),
        int(kv.get("lease", 0)),
    )
