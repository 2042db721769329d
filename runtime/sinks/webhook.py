"""The `webhook` sink: each record POSTed as JSON to a URL (an MES, a historian, a ticketing
system), with the record's stable id as `Idempotency-Key` so the receiver can drop repeats.

A 2xx answer is delivered; any other answer or a connection error is retried with the
outbox's backoff. Only the standard library is used.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from musc_edge.runtime.sinks import register_sink
from musc_edge.runtime.sinks.network import NetworkOptions, NetworkSink, secret_from_env
from musc_edge.runtime.sinks.outbox import Message


class WebhookOptions(NetworkOptions):
    """`--sink webhook:url=https://mes/api/results,token_env=MES_TOKEN` or the line config."""

    url: str
    token_env: str | None = None  # the environment variable holding a bearer token
    headers: dict[str, str] = Field(default_factory=dict)  # extra headers (line config only)

    @field_validator("url")
    @classmethod
    def _http(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
        return url


class WebhookError(OSError):
    """A failed POST, said without the URL's query or credentials and without the token."""


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is a failure to retry, not followed: following it would hand the bearer
    token to another address, and a POST turned into a GET would lose the record."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


@register_sink("webhook")
class WebhookSink(NetworkSink):
    Options = WebhookOptions
    options: WebhookOptions

    def connect(self) -> None:
        options = self.options
        parts = urlsplit(options.url)
        port = f":{parts.port}" if parts.port else ""
        self.shown = f"{parts.scheme}://{parts.hostname}{port}{parts.path}"  # no query, no login
        self.headers = {**options.headers, "Content-Type": "application/json"}
        if options.token_env:
            token = secret_from_env(self.name, "token_env", options.token_env)
            self.headers["Authorization"] = f"Bearer {token}"
        self.opener = urllib.request.build_opener(_NoRedirects)

    def deliver(self, message: Message) -> None:
        headers = {
            **self.headers,
            "Idempotency-Key": message["id"],
            "X-Musc-Record-Id": message["id"],
        }
        request = urllib.request.Request(
            self.options.url, json.dumps(message).encode(), headers, method="POST"
        )
        try:
            with self.opener.open(request, timeout=self.options.timeout_s):
                pass  # urllib raises for every status outside 2xx
        except urllib.error.HTTPError as error:
            error.close()
            raise WebhookError(f"{self.shown}: HTTP {error.code} {error.reason}") from None
        except urllib.error.URLError as error:
            raise WebhookError(f"{self.shown}: {error.reason}") from None
        except OSError as error:  # a timeout or a connection reset while reading
            raise WebhookError(f"{self.shown}: {error}") from None
