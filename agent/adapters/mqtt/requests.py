"""The cloudlet dispatcher: Kura request/response over MQTT, independent of which resources exist.

A request arrives on ``{prefix}/{account}/{device}/{app}/{METHOD}/{resource...}`` with STRING metrics
``request.id`` and ``requester.client.id``; the answer goes (QoS 0) to
``{prefix}/{account}/{requester}/{app}/REPLY/{request.id}`` with INT32 ``response.code`` and, on error,
STRING ``response.exception.message`` (kura-model.md section 2). The reply uses the request's encoding.

Routing is a table given by the caller: ``{("GET", ("allowlist", "{digest}")): handler}``. A ``{name}``
segment matches any one non-empty level and is passed in ``Request.params``; literal segments win over
placeholders, left to right. Status mapping:

* handler returns a :class:`Response` -> its status (default 200)
* ``ControlError(status, msg)`` -> that status; ``NotFound`` -> 404; ``InputError`` (incl. ``SchemaError``
  with its JSON pointer) -> 400; anything else -> 500 with a generic message (details only in the log)
* no route for the resource -> 404; a method word that is not GET/PUT/POST/DEL/EXEC, or a method the
  resource does not support -> 400; undecodable or oversized payload -> 400 when the ids can be read
* no readable ``request.id`` / ``requester.client.id`` -> no reply is possible: logged and counted as dropped

:meth:`Dispatcher.handle` never raises.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.adapters.mqtt.codec import Encoding, PayloadCodec, detect_encoding
from agent.adapters.mqtt.kurapayload import KuraMessage, MetricValue, peek_string_metrics
from agent.adapters.mqtt.topics import METHODS, Topics, valid_level
from agent.errors import ControlError, InputError, NotFound, PayloadError, PayloadTooLarge

log = logging.getLogger(__name__)

REQUEST_ID = "request.id"
REQUESTER = "requester.client.id"
RESPONSE_CODE = "response.code"
RESPONSE_MESSAGE = "response.exception.message"
_MAX_MESSAGE = 2000


@dataclass(frozen=True)
class Request:
    method: str
    resource: tuple[str, ...]
    #: values of the route's ``{name}`` segments
    params: Mapping[str, str]
    body: bytes | None
    #: the body parsed as JSON, or None when there is no body or it is not JSON (see :meth:`require_json`)
    json: Any
    metrics: Mapping[str, MetricValue]
    request_id: str
    requester: str
    json_error: str | None = None

    def require_json(self) -> Any:
        """The JSON body, or InputError (-> 400) saying why there is none."""
        if self.json_error is not None:
            raise InputError(self.json_error)
        return self.json


@dataclass(frozen=True)
class Response:
    status: int = 200
    body: bytes | None = None
    metrics: Mapping[str, MetricValue] = field(default_factory=dict)

    @classmethod
    def of_json(cls, document: Any, status: int = 200) -> Response:
        text = json.dumps(document, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
        return cls(status=status, body=text.encode("utf-8"))


Handler = Callable[[Request], Response]
Route = tuple[str, tuple[str, ...]]
Publish = Callable[[str, bytes], object]


@dataclass
class DispatchStats:
    received: int = 0
    replied: int = 0
    #: requests we could not answer (no ids): Kura drops them silently; we log and count
    dropped: int = 0
    errors: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)


def _is_param(segment: str) -> bool:
    return len(segment) > 2 and segment[0] == "{" and segment[-1] == "}"


def _match(pattern: tuple[str, ...], resource: tuple[str, ...]) -> dict[str, str] | None:
    if len(pattern) != len(resource):
        return None
    params: dict[str, str] = {}
    for want, got in zip(pattern, resource, strict=True):
        if _is_param(want):
            if not got:
                return None
            params[want[1:-1]] = got
        elif want != got:
            return None
    return params


def _specificity(pattern: tuple[str, ...]) -> tuple[bool, ...]:
    return tuple(not _is_param(s) for s in pattern)


def _reply_message(status: int, message: str | None, response: Response | None) -> KuraMessage:
    metrics: dict[str, MetricValue] = {}
    if response is not None:
        metrics.update(response.metrics)
    metrics[RESPONSE_CODE] = MetricValue.int32(status)
    if message is not None:
        metrics[RESPONSE_MESSAGE] = MetricValue.string(message[:_MAX_MESSAGE])
    return KuraMessage(
        timestamp_ms=int(time.time() * 1000),
        metrics=metrics,
        body=response.body if response is not None else None,
    )


class Dispatcher:
    """Routes control requests to handlers and publishes their replies through ``publish(topic, payload)``
    (the caller publishes QoS 0, retain false)."""

    def __init__(
        self,
        topics: Topics,
        routes: Mapping[Route, Handler],
        publish: Publish,
        *,
        codec: PayloadCodec | None = None,
    ) -> None:
        for (method, pattern), _ in routes.items():
            if method not in METHODS:
                raise ValueError(f"route {method} {'/'.join(pattern)}: unknown method")
            if any(not valid_level(s) for s in pattern):
                raise ValueError(f"route {method} {'/'.join(pattern)}: bad segment")
        self.topics = topics
        # most specific first, so ("allowlist", "_all") wins over ("allowlist", "{digest}")
        self._routes = sorted(routes.items(), key=lambda item: _specificity(item[0][1]), reverse=True)
        self._publish = publish
        self.codec = codec or PayloadCodec()
        self.stats = DispatchStats()

    def handle(self, topic: str, payload: bytes) -> None:
        """Serve one inbound control message. Never raises."""
        try:
            self._handle(topic, payload)
        except Exception:  # last line of defence: the callback thread must survive anything
            self.stats.add("errors")
            log.exception("control: unexpected failure handling a message on %s", topic)

    def _handle(self, topic: str, payload: bytes) -> None:
        parsed = self.topics.parse_control(topic)
        if parsed is None or parsed.is_reply_traffic:
            return  # not ours, or replies/notifications on our own subscription
        self.stats.add("received")
        encoding = detect_encoding(payload)
        try:
            message = self.codec.decode(payload)
        except PayloadError as exc:
            ids = self._peek_ids(payload, encoding)
            if ids is None:
                self._drop(topic, f"undecodable payload ({exc.message})")
                return
            status_text = "payload too large" if isinstance(exc, PayloadTooLarge) else "bad payload"
            log.warning("control: %s on %s: %s", status_text, topic, exc.message)
            self._reply(ids[0], ids[1], 400, exc.message, None, encoding)
            return
        request_id, requester = message.string(REQUEST_ID), message.string(REQUESTER)
        if request_id is None or requester is None:
            self._drop(topic, f"no STRING metrics {REQUEST_ID} and {REQUESTER}")
            return
        if not valid_level(request_id) or not valid_level(requester):
            self._drop(topic, f"{REQUEST_ID} / {REQUESTER} cannot be topic levels")
            return
        status, text, response = self._serve(parsed.word, parsed.method, parsed.resource, message)
        self._reply(requester, request_id, status, text, response, encoding)

    def _peek_ids(self, payload: bytes, encoding: Encoding) -> tuple[str, str] | None:
        if encoding != "kura-protobuf":
            return None  # an invalid or oversized JSON document is not parsed at all
        found = peek_string_metrics(payload, (REQUEST_ID, REQUESTER), max_bytes=self.codec.max_payload_bytes)
        rid, who = found.get(REQUEST_ID), found.get(REQUESTER)
        if rid is None or who is None or not valid_level(rid) or not valid_level(who):
            return None
        return who, rid

    def _drop(self, topic: str, why: str) -> None:
        self.stats.add("dropped")
        log.warning("control: request on %s dropped, no reply possible: %s", topic, why)

    def _serve(
        self, word: str, method: str | None, resource: tuple[str, ...], message: KuraMessage
    ) -> tuple[int, str | None, Response | None]:
        where = "/".join(resource)
        if method is None:
            return 400, f"unknown method {word!r}: use one of {', '.join(METHODS)}", None
        candidates = [(m, route, h) for (m, route), h in self._routes if _match(route, resource) is not None]
        if not candidates:
            return 404, f"no resource {where!r}", None
        chosen = next(((route, h) for m, route, h in candidates if m == method), None)
        if chosen is None:
            allowed = sorted({m for m, _, _ in candidates})
            return 400, f"{method} is not supported on {where!r}; use {', '.join(allowed)}", None
        route, handler = chosen
        request = self._request(method, resource, _match(route, resource) or {}, message)
        try:
            response = handler(request)
        except ControlError as exc:
            log.info("control: %s %s -> %d %s", method, where, exc.status, exc.message)
            return exc.status, exc.message, None
        except NotFound as exc:
            log.info("control: %s %s -> 404 %s", method, where, exc.message)
            return 404, exc.message, None
        except InputError as exc:
            log.info("control: %s %s -> 400 %s", method, where, exc.message)
            return 400, exc.message, None
        except Exception:
            self.stats.add("errors")
            log.exception("control: %s %s failed", method, where)
            return 500, "internal error; see the device log", None
        if not isinstance(response, Response):
            log.error("control: handler for %s %s returned %r, not a Response", method, where, response)
            return 500, "internal error; see the device log", None
        return response.status, None, response

    @staticmethod
    def _request(
        method: str, resource: tuple[str, ...], params: dict[str, str], message: KuraMessage
    ) -> Request:
        parsed: Any = None
        error: str | None = None
        body = message.body
        if not body:
            error = "the request has no body; a JSON document is required"
        else:
            try:
                parsed = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
            except (UnicodeDecodeError, ValueError, RecursionError) as exc:
                error = f"the request body is not JSON: {str(exc)[:200]}"
        return Request(
            method=method,
            resource=resource,
            params=params,
            body=body,
            json=parsed,
            metrics=message.metrics,
            request_id=message.string(REQUEST_ID) or "",
            requester=message.string(REQUESTER) or "",
            json_error=error,
        )

    def _reply(
        self,
        requester: str,
        request_id: str,
        status: int,
        text: str | None,
        response: Response | None,
        encoding: Encoding,
    ) -> None:
        if not -(2**31) <= status < 2**31:
            status, text, response = 500, "internal error; see the device log", None
        reply = _reply_message(status, text, response)
        try:
            payload = self.codec.encode(reply, encoding)
        except PayloadError as exc:  # a handler put something unencodable into its response
            log.error("control: reply cannot be encoded: %s", exc.message)
            payload = self.codec.encode(
                _reply_message(500, "internal error; see the device log", None), encoding
            )
        self._publish(self.topics.reply(requester, request_id), payload)
        self.stats.add("replied")


def _no_constant(word: str) -> Any:
    raise ValueError(f"{word} is not JSON")
