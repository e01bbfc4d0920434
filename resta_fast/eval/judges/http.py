"""The judge's HTTP client: one JSON POST with retries, backoff and a shared rate limit.

Plain ``urllib`` from the standard library: the call is one JSON POST, so the eval
extra does not need the ``openai`` client (and its httpx/pydantic stack) for it.
429, 5xx, connection errors and malformed replies are retried; 401/403 and other 4xx
are not (asking again cannot help), and the error says which flag to fix.

Example:
    >>> HttpClient("http://127.0.0.1:8000/v1/chat/completions").calls
    0
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request

from resta_fast.errors import RestaError


class RateLimiter:
    """At most ``rps`` request starts per second, shared by all worker threads.

    Args:
        rps: requests per second; None or <= 0 means unlimited.
        sleep: the sleep function (tests pass a fake).

    Example:
        >>> RateLimiter(None).acquire()
    """

    def __init__(self, rps: float | None, sleep=time.sleep, clock=time.monotonic):
        self.interval = 1.0 / rps if rps and rps > 0 else 0.0
        self._next = 0.0
        self._lock = threading.Lock()
        self._sleep, self._clock = sleep, clock

    def acquire(self) -> None:
        """Block until the next request may start."""
        if not self.interval:
            return
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            self._sleep(start - now)


class HttpClient:
    """POSTs JSON to the judge endpoint, retrying with doubling backoff; safe to share between threads.

    Args:
        url: the full endpoint URL.
        key_env: environment variable holding the API key (no key sent when unset, for local servers).
        max_retries: extra attempts on 429/5xx, connection errors and malformed replies.
        backoff: first retry delay in seconds, doubled each retry (a 429's ``Retry-After`` wins).
        rps: rate limit, requests per second (None: unlimited).
        timeout: seconds per HTTP request.
        sleep: sleep function (tests pass a fake so retries do not wait).

    Example:
        >>> c = HttpClient("http://127.0.0.1:8000/v1/chat/completions", rps=2.0)
        >>> c.limiter.interval
        0.5
    """

    def __init__(
        self,
        url: str,
        *,
        key_env: str = "OPENAI_API_KEY",
        max_retries: int = 3,
        backoff: float = 1.0,
        rps: float | None = None,
        timeout: float = 60.0,
        sleep=time.sleep,
    ):
        self.url = url
        self.key_env = key_env
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.timeout = timeout
        self._sleep = sleep
        self.limiter = RateLimiter(rps, sleep=sleep)
        self.calls = 0  # HTTP requests made, for reports and tests
        self._lock = threading.Lock()

    def post(self, body: dict, read=lambda payload: payload):
        """POST ``body`` as JSON and return ``read(reply JSON)``.

        Args:
            body: the request; its ``model`` is named when the endpoint rejects it.
            read: picks the answer out of the decoded reply; a ``KeyError``, ``IndexError``
                or ``TypeError`` it raises counts as a malformed reply and is retried.

        Returns:
            What ``read`` returned.
        """
        data = json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        delay = self.backoff
        for attempt in range(self.max_retries + 1):
            self.limiter.acquire()
            with self._lock:
                self.calls += 1
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    payload = json.loads(resp.read().decode("utf-8"))
                return read(payload)
            except urllib.error.HTTPError as e:
                if e.code in (401, 403):
                    raise RestaError(
                        f"judge endpoint {self.url} refused the request (HTTP {e.code}): set the API key in "
                        f"${self.key_env} (or name another variable with --judge-key-env)"
                    ) from e
                if e.code != 429 and e.code < 500:
                    detail = e.read().decode("utf-8", "replace")[:300]
                    raise RestaError(
                        f"judge endpoint {self.url} rejected the request (HTTP {e.code}: {detail}); "
                        f"check --judge-model ({body.get('model')!r}) and --judge-url"
                    ) from e
                retry_after = e.headers.get("Retry-After") if e.headers else None
                wait = float(retry_after) if retry_after and retry_after.isdigit() else delay
                last = f"HTTP {e.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                wait, last = delay, f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
                wait, last = delay, f"malformed reply ({type(e).__name__})"
            if attempt < self.max_retries:
                self._sleep(wait)
                delay *= 2
        raise RestaError(
            f"judge endpoint {self.url} failed {self.max_retries + 1} times (last: {last}); check that the "
            "server is up and --judge-url is right; verdicts obtained so far are in the cache"
        )
