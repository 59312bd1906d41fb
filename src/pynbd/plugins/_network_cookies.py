"""Cookie processing for the curl plugin's cookiefile= and cookiejar= (libcurl's cookie
engine: Netscape-format files), through the standard library's http.cookiejar."""

from __future__ import annotations

import http.cookiejar
import threading
import urllib.request
from typing import Any

from pynbd.errors import ConfigError

__all__ = ["cookie_header", "load_jar", "remember", "save_jar"]

_lock = threading.Lock()


def load_jar(cookiefile: str | None, cookiejar: str | None) -> http.cookiejar.CookieJar:
    """A jar holding the cookies of ``cookiefile`` (none when it is empty), then of
    ``cookiejar`` if that file exists."""
    jar = http.cookiejar.MozillaCookieJar()
    for path in (cookiefile, cookiejar):
        if not path:
            continue
        try:
            jar.load(path, ignore_discard=True, ignore_expires=False)
        except FileNotFoundError:
            if path == cookiefile:
                raise ConfigError(f"cookiefile: {path}: No such file or directory") from None
        except (OSError, http.cookiejar.LoadError) as e:
            raise ConfigError(f"cookie file {path}: {e}") from None
    return jar


def cookie_header(jar: http.cookiejar.CookieJar, url: str) -> str | None:
    """The Cookie header the jar sends to ``url``."""
    req = urllib.request.Request(url)
    with _lock:
        jar.add_cookie_header(req)
    return req.get_header("Cookie")


class _Info:
    """What CookieJar.extract_cookies wants of a response: ``info().get_all(name)``."""

    def __init__(self, headers: Any) -> None:
        self.headers = headers

    def info(self) -> _Info:
        return self

    def get_all(self, name: str, default: Any = None) -> Any:
        return self.headers.getlist(name) or default


def remember(jar: http.cookiejar.CookieJar, url: str, resp: Any) -> None:
    """Keep the cookies a response set."""
    if not resp.headers.get("Set-Cookie"):
        return
    with _lock:
        jar.extract_cookies(_Info(resp.headers), urllib.request.Request(url))  # type: ignore[arg-type]


def save_jar(jar: http.cookiejar.CookieJar, path: str) -> None:
    with _lock:
        if isinstance(jar, http.cookiejar.MozillaCookieJar):
            jar.save(path, ignore_discard=True, ignore_expires=True)
