"""Completion webhooks, signed with HMAC-SHA256.

The receiver checks ``X-ClusCa-Signature: sha256=<hex>``, computed over
``<X-ClusCa-Timestamp>.<raw body>`` with the shared ``CLUSCA_WEBHOOK_SECRET``; the
timestamp in the signed text lets it refuse replays. Targets on loopback, private,
link-local or otherwise non-public addresses are refused (they would let a client make
the service call into its own network) unless ``CLUSCA_WEBHOOK_ALLOW_PRIVATE`` is set.
The check runs when the request arrives and again right before sending, because DNS
answers can change in between; redirects are never followed.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger("clusca.webhooks")

SIGNATURE_HEADER = "X-ClusCa-Signature"
TIMESTAMP_HEADER = "X-ClusCa-Timestamp"


class WebhookError(ValueError):
    """The webhook URL is not acceptable."""


def _public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local)


def check_url(url: str, *, allow_private: bool, resolve: bool = True) -> None:
    """Raise :class:`WebhookError` if ``url`` may not be called."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise WebhookError("not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise WebhookError("must be an http or https URL")
    if not parts.hostname:
        raise WebhookError("has no host")
    if parts.username or parts.password:
        raise WebhookError("must not carry credentials")
    if allow_private:
        return
    host = parts.hostname
    try:
        addrs = [ipaddress.ip_address(host)]
    except ValueError:
        if not resolve:
            return
        try:
            infos = socket.getaddrinfo(host, port or (443 if parts.scheme == "https" else 80),
                                       proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError, ValueError):
            raise WebhookError(f"host {host!r} does not resolve") from None
        addrs = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    for ip in addrs:
        if not _public(ip):
            raise WebhookError("targets a loopback, private or reserved address; "
                               "set CLUSCA_WEBHOOK_ALLOW_PRIVATE=1 to allow it")


def sign(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str, *, max_age_s: float = 300) -> bool:
    """What a receiver does (also used by the tests)."""
    try:
        if abs(time.time() - float(timestamp)) > max_age_s:
            return False
    except ValueError:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def deliver(url: str, payload: dict[str, Any], *, secret: str | None, allow_private: bool,
            attempts: int = 3, timeout_s: float = 5.0) -> bool:
    """POST ``payload`` to ``url``; retries on network errors and 5xx. True when delivered."""
    try:
        check_url(url, allow_private=allow_private)
    except WebhookError as exc:
        log.warning("webhook for job %s refused: %s", payload.get("id"), exc)
        return False
    body = json.dumps(payload, separators=(",", ":")).encode()
    for attempt in range(attempts):
        ts = str(int(time.time()))
        headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: ts, "User-Agent": "clusca-serve"}
        if secret:
            headers[SIGNATURE_HEADER] = sign(secret, ts, body)
        req = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with _opener.open(req, timeout=timeout_s) as resp:
                if resp.status < 300:
                    return True
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                log.warning("webhook for job %s answered %s", payload.get("id"), exc.code)
                return False
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5 * 2 ** attempt)
    log.warning("webhook for job %s not delivered after %d attempts", payload.get("id"), attempts)
    return False
