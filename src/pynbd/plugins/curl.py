"""The curl plugin: a disk image served by a web server (HTTP or HTTPS range requests). Its
manual page is :class:`CurlPlugin`'s docstring."""

from __future__ import annotations

import asyncio
import errno
import logging
import ssl
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

from pynbd.errors import CommandError, ConfigError
from pynbd.filters._params import parse_bool, parse_unsigned
from pynbd.plugin import Plugin, ThreadModel
from pynbd.plugins._network_common import ScriptRunner, log_open_error, read_password

__all__ = ["CurlPlugin"]

log = logging.getLogger("pynbd.server")

#: The protocols nbdkit's protocols= knows (libcurl's names); this plugin speaks two of them.
KNOWN_PROTOCOLS = frozenset((
    "dict", "file", "ftp", "ftps", "gopher", "http", "https", "imap", "imaps", "ldap", "ldaps",
    "mqtt", "pop3", "pop3s", "rtmp", "rtmpe", "rtmps", "rtmpt", "rtmpte", "rtmpts", "rtsp",
    "scp", "sftp", "smb", "smbs", "smtp", "smtps", "telnet", "tftp"))
SUPPORTED_PROTOCOLS = ("http", "https")
#: Redirects followed at most (libcurl's default is unlimited; a loop must end somewhere).
MAX_REDIRECTS = 30
_REDIRECTS = (301, 302, 303, 307, 308)


class _Handle:
    __slots__ = ("readonly", "scheme_ok", "size", "url")

    def __init__(self, url: str, size: int, readonly: bool) -> None:
        self.url = url  # the URL after redirects: every range request goes straight there
        self.size = size
        self.readonly = readonly
        #: The protocols= check passed for ``url`` (READs may skip urllib3).
        self.scheme_ok = False


class CurlPlugin(Plugin):
    """NAME
        curl - pynbd curl plugin (a disk image on a web server, over HTTP or HTTPS)

    SYNOPSIS
        pynbd serve -r curl [url=]http://example.com/disk.img [PARAMETERS...]

    DESCRIPTION
        curl serves a file from a web server as a disk: the size comes from a HEAD request,
        and every read is an HTTP range request for exactly the bytes asked for. The server
        must support ranges ("Accept-Ranges: bytes"); one that does not is refused with
        nbdkit's error ("server does not support 'range' (byte range) requests").

        HTTP is done with urllib3: a pool of connections kept alive and shared by every
        client, so requests do not pay for a new TCP (and TLS) connection each, and up to
        the server's thread count (-t, default 16) range requests travel in parallel. When
        a client connects, the URL's redirects are followed once (HEAD) and every request
        of that client goes straight to the final URL. Read-only exports advertise
        multi-conn, so clients such as nbdcopy may open several connections.

        Reads skip urllib3 when they can (no proxy=, no cookie jar): a plain HTTP/1.1 range
        GET on a kept-alive connection (TLS for https), the body received straight into
        the buffer sent to the client. Without header-script=, cookie-script= and
        timeout=, and with no filter in front, they are made from the server's event loop
        rather than worker threads (up to the thread count of connections to the web
        server). Any answer but the 206 asked for is asked again through urllib3, so
        errors read as they always do.

        Writes (without -r) are sent as HTTP PUT requests with a Content-Range header; most
        web servers refuse them (the client gets EIO). Serve read-only with -r.

        This is nbdkit-curl-plugin(1) for pynbd, with the same parameters and messages. It
        speaks HTTP and HTTPS only (libcurl's other protocols are refused), and
        tls13-ciphers= is accepted but has no effect (Python's ssl module cannot set TLS 1.3
        cipher suites).

    PARAMETERS
        [url=]URL
            The disk image's URL (http:// or https://; user:password@ in the URL is used for
            basic authentication). Required; "url=" may be omitted.

        header=HEADER
            Send "Name: value" with every request (repeatable); "Name:" removes a header the
            plugin would send, "Name;" sends one with an empty value.

        header-script=SCRIPT
        header-script-renew=SECS
            Run SCRIPT (sh -c, with $iteration and $url set) and send each line it prints as
            a header; run it again when SECS seconds have passed since it last ran.

        cookie=COOKIE
        cookie=+FILENAME
        cookie=-
        cookie=-FD
            Send "Cookie: COOKIE" with every request (read from a file, the terminal or a
            file descriptor as passwords are).

        cookie-script=SCRIPT
        cookie-script-renew=SECS
            As header-script, for the cookie (one line).

        cookiefile=FILENAME
        cookiejar=FILENAME
            Cookies from a Netscape-format cookie file (cookiefile= with no name: start with
            none) sent with the requests they match; cookies the server sets are kept, and
            with cookiejar= saved to FILENAME when the client disconnects.

        user=USERNAME
        password=PASSWORD|-|+FILENAME|-FD
            Basic authentication.

        user-agent=USER-AGENT
            The User-Agent header (by default none is sent).

        proxy=PROXY
        proxy-user=USERNAME
        proxy-password=PASSWORD|-|+FILENAME|-FD
            An HTTP proxy (host:port or http://host:port) and its credentials.

        sslverify=false
            Do not verify the server's certificate and host name.

        cainfo=FILENAME
        capath=PATH
            CA certificates (a bundle, or a directory hashed by openssl rehash) to verify
            the server with; cainfo= (empty) uses no CA bundle at all.

        ssl-version=VERSION
        ssl-cipher-list=CIPHER[:CIPHER...]
        tls13-ciphers=CIPHER[:CIPHER...]
            The lowest TLS version allowed (tlsv1.0, tlsv1.1, tlsv1.2, tlsv1.3), the TLS 1.2
            ciphers (OpenSSL's syntax).

        timeout=SECS
            A deadline for each request (0, the default: none).

        followlocation=false
            Do not follow redirects.

        protocols=PROTO,PROTO,...
            Only allow these protocols, in the URL and in redirects (curl's names).

        tcp-keepalive=true
        tcp-nodelay=false
            TCP keepalives; Nagle's algorithm (off by default).

        unix-socket-path=PATH
            Connect to the web server on this Unix socket instead of the URL's host.

    EXAMPLES
        Serve a disk image from a web server:

            pynbd serve -r curl https://example.com/disk.img

        A compressed image, decompressed on the fly:

            pynbd serve -r --filter=xz curl https://example.com/disk.img.xz

        With a token from a login service, renewed every 50 seconds:

            pynbd serve -r curl https://service.example.com/disk.img \\
                header-script='printf "Authorization: Bearer "; get-token' \\
                header-script-renew=50
    """

    name = "curl"
    version = "1.0"
    magic_config_key = "url"
    thread_model = ThreadModel.PARALLEL
    nonblocking = False
    config_help = (
        "cainfo=<CAINFO>            Path to Certificate Authority file.\n"
        "capath=<CAPATH>            Path to directory with CA certificates.\n"
        "cookie=<COOKIE>            Set HTTP/HTTPS cookies.\n"
        "cookiefile=                Enable cookie processing.\n"
        "cookiefile=<FILENAME>      Read cookies from file.\n"
        "cookiejar=<FILENAME>       Read and write cookies to jar.\n"
        "cookie-script=<SCRIPT>     Script to set HTTP/HTTPS cookies.\n"
        "cookie-script-renew=<SECS> Time to renew HTTP/HTTPS cookies.\n"
        "followlocation=false       Do not follow redirects.\n"
        "header=<HEADER>            Set HTTP/HTTPS header.\n"
        "header-script=<SCRIPT>     Script to set HTTP/HTTPS headers.\n"
        "header-script-renew=<SECS> Time to renew HTTP/HTTPS headers.\n"
        "password=<PASSWORD>        The password for the user account.\n"
        "protocols=PROTO,PROTO,..   Limit protocols allowed.\n"
        "proxy=<PROXY>              Set proxy URL.\n"
        "proxy-password=<PASSWORD>  The proxy password.\n"
        "proxy-user=<USER>          The proxy user.\n"
        "timeout=<TIMEOUT>          Set the timeout for requests (seconds).\n"
        "sslverify=false            Do not verify SSL certificate of remote host.\n"
        "ssl-version=<VERSION>      Specify preferred TLS/SSL version.\n"
        "ssl-cipher-list=C1:C2:..   Specify TLS/SSL cipher suites to be used.\n"
        "tls13-ciphers=C1:C2:..     Specify TLS 1.3 cipher suites to be used.\n"
        "tcp-keepalive=true         Enable TCP keepalives.\n"
        "tcp-nodelay=false          Disable Nagle’s algorithm.\n"
        "unix-socket-path=<PATH>    Open Unix domain socket instead of TCP/IP.\n"
        "url=<URL>       (required) The disk image URL to serve.\n"
        "user=<USER>                The user to log in as.\n"
        "user-agent=<USER-AGENT>    Send user-agent header for HTTP/HTTPS."
    )

    def __init__(self) -> None:
        from pynbd.plugins._network_http import HttpSettings

        self.url: str | None = None
        self.http = HttpSettings()
        self.headers: list[str] = []
        self.header_script: str | None = None
        self.header_script_renew = 0
        self.cookie: str | None = None
        self.cookie_script: str | None = None
        self.cookie_script_renew = 0
        self.cookiefile: str | None = None
        self.cookiejar: str | None = None
        self.followlocation = True
        self.protocols: tuple[str, ...] | None = None
        self.user: str | None = None
        self.password: str | None = None
        self.user_agent: str | None = None
        self._pool: Any = None
        self._base: dict[str, Any] = {}
        self._scripts: dict[str, ScriptRunner] = {}
        self._jar: Any = None
        self._pool_error: CommandError | None = None
        self._ranges: Any = None  # the READ path without urllib3 (_network_ranges)
        self._loop_ranges: Any = None  # the same on the event loop (_network_loopranges)

    # Configuration ---------------------------------------------------------------------
    def config(self, key: str, value: str) -> None:
        if not self._config_http(key, value):
            self._config_request(key, value)

    def _config_http(self, key: str, value: str) -> bool:
        """Parameters about connections; False if ``key`` is not one of them."""
        h = self.http
        if key == "cainfo":
            h.cainfo = value
        elif key == "capath":
            h.capath = value
        elif key == "sslverify":
            h.sslverify = parse_bool(value)
        elif key == "ssl-version":
            h.ssl_version = value
        elif key == "ssl-cipher-list":
            h.ssl_cipher_list = value
        elif key == "tls13-ciphers":
            pass  # see DESCRIPTION
        elif key == "tcp-keepalive":
            h.tcp_keepalive = parse_bool(value)
        elif key == "tcp-nodelay":
            h.tcp_nodelay = parse_bool(value)
        elif key == "timeout":
            h.timeout = parse_unsigned("timeout", value)
        elif key in ("unix-socket-path", "unix_socket_path"):
            h.unix_socket_path = value
        elif key == "proxy":
            h.proxy = value
        elif key == "proxy-user":
            h.proxy_user = value
        elif key == "proxy-password":
            h.proxy_password = read_password(value)
        else:
            return False
        return True

    def _config_request(self, key: str, value: str) -> None:
        if key == "url":
            self.url = value
        elif key == "header":
            self.headers.append(value)
        elif key == "header-script":
            self.header_script = value
        elif key == "header-script-renew":
            self.header_script_renew = parse_unsigned("header-script-renew", value)
        elif key == "cookie":
            self.cookie = read_password(value)
        elif key == "cookie-script":
            self.cookie_script = value
        elif key == "cookie-script-renew":
            self.cookie_script_renew = parse_unsigned("cookie-script-renew", value)
        elif key == "cookiefile":
            if value == "-":
                raise ConfigError('cookiefile parameter cannot be "-"')
            self.cookiefile = value
        elif key == "cookiejar":
            if value == "-":
                raise ConfigError('cookiejar parameter cannot be "-"')
            self.cookiejar = value
        elif key == "followlocation":
            self.followlocation = parse_bool(value)
        elif key == "protocols":
            self.protocols = _parse_protocols(value)
        elif key == "user":
            self.user = value
        elif key == "password":
            self.password = read_password(value)
        elif key == "user-agent":
            self.user_agent = value
        else:
            raise ConfigError(f"unknown parameter '{key}'")

    def config_complete(self) -> None:
        if self.url is None:
            raise ConfigError("you must supply the url=<URL> parameter "
                              "after the plugin name on the command line")
        if self.headers and self.header_script:
            raise ConfigError("header and header-script cannot be used at the same time")
        if not self.header_script and self.header_script_renew:
            raise ConfigError("header-script-renew cannot be used without header-script")
        if self.cookie and self.cookie_script:
            raise ConfigError("cookie and cookie-script cannot be used at the same time")
        if not self.cookie_script and self.cookie_script_renew:
            raise ConfigError("cookie-script-renew cannot be used without cookie-script")

    def get_ready(self) -> None:
        from pynbd.plugin import connection  # noqa: F401 - (imported for the type only)
        from pynbd.plugins._network_http import make_pool

        self._base = self._base_headers()
        if self.header_script:
            self._scripts["header"] = ScriptRunner("header-script", self.header_script,
                                                   self.header_script_renew, self.url or "")
        if self.cookie_script:
            self._scripts["cookie"] = ScriptRunner("cookie-script", self.cookie_script,
                                                   self.cookie_script_renew, self.url or "")
        if self.cookiefile is not None or self.cookiejar is not None:
            from pynbd.plugins._network_cookies import load_jar

            self._jar = load_jar(self.cookiefile, self.cookiejar)
        self.http.maxsize = max(1, _threads())
        try:
            self._pool = make_pool(self.http)
        except CommandError as e:
            self._pool_error = e  # as libcurl: each client's open fails, saying why
            return
        if not self.http.proxy and self._jar is None:
            from pynbd.plugins._network_http import tls_context
            from pynbd.plugins._network_ranges import RangeReader

            tls = tls_context(self.http)
            self._ranges = RangeReader(self.http, tls, self.http.maxsize)
            if not self._scripts and self.http.timeout <= 0:
                from pynbd.plugins._network_loopranges import LoopRangeReader

                # READs on the event loop (pynbd.server.coroutines): no worker thread each
                self._loop_ranges = LoopRangeReader(self.http.unix_socket_path, tls,
                                                    self.http.maxsize, self._fallback)
                self.start_pread = self._start_pread

    def cleanup(self) -> None:
        if self._pool is not None:
            self._pool.clear()
            self._pool = None
        if self._ranges is not None:
            self._ranges.close()
            self._ranges = None
        if self._loop_ranges is not None:
            try:
                self._loop_ranges.close()
            except RuntimeError:  # the event loop is gone, and its connections with it
                pass
            self._loop_ranges = None

    # Requests --------------------------------------------------------------------------
    def _base_headers(self) -> dict[str, Any]:
        """The headers every request carries: the parameters' (Host, Accept and so on are
        urllib3's). Values None mean "leave out"."""
        import urllib3

        from pynbd.plugins._network_http import SKIP, split_header

        hdrs: dict[str, Any] = {"User-Agent": self.user_agent or SKIP, "Accept": "*/*"}
        user, password = self.user, self.password
        url_user = urlsplit(self.url or "").username
        if url_user is not None and user is None:
            user = unquote(url_user)
            password = password or unquote(urlsplit(self.url or "").password or "")
        if user is not None or password is not None:
            hdrs.update(urllib3.make_headers(basic_auth=f"{user or ''}:{password or ''}"))
        if self.cookie:
            hdrs["Cookie"] = self.cookie
        for line in self.headers:
            hv = split_header(line)
            if hv is not None:
                _set_header(hdrs, hv[0], hv[1])
        return hdrs

    def _headers(self, url: str) -> dict[str, Any]:
        from pynbd.plugins._network_http import split_header

        hdrs = dict(self._base)
        script = self._scripts.get("header")
        if script is not None:
            for line in script.output().splitlines():
                hv = split_header(line)
                if hv is not None:
                    _set_header(hdrs, hv[0], hv[1])
        script = self._scripts.get("cookie")
        if script is not None:
            lines = script.output().splitlines()
            if lines and lines[0].strip():
                hdrs["Cookie"] = lines[0].strip()
        if self._jar is not None:
            from pynbd.plugins._network_cookies import cookie_header

            cookie = cookie_header(self._jar, url)
            if cookie:
                hdrs["Cookie"] = "; ".join(filter(None, (hdrs.get("Cookie"), cookie)))
        return hdrs

    def _check_protocol(self, url: str) -> None:
        scheme = urlsplit(url).scheme.lower()
        allowed = self.protocols if self.protocols is not None else SUPPORTED_PROTOCOLS
        if scheme not in allowed or scheme not in SUPPORTED_PROTOCOLS:
            raise CommandError(errno.EPROTONOSUPPORT,
                               f"Unsupported protocol: Protocol \"{scheme}\" not supported "
                               f"or disabled in libcurl")

    def _request(self, method: str, url: str, headers: dict[str, Any],
                 body: Any = None, preload: bool = True) -> Any:
        """One HTTP request (no redirects followed); CommandError with libcurl's words for
        what went wrong on the way."""
        import urllib3

        self._check_protocol(url)
        try:
            resp = self._pool.request(method, _strip_auth(url), headers=headers, body=body,
                                      redirect=False, preload_content=preload,
                                      assert_same_host=False)
        except urllib3.exceptions.HTTPError as e:
            raise _http_error(url, e) from None
        if self._jar is not None:
            from pynbd.plugins._network_cookies import remember

            remember(self._jar, url, resp)
        return resp

    def _resolve(self) -> tuple[str, Any]:
        """HEAD the URL, following its redirects (once per client): the final URL and the
        response."""
        url = self.url or ""
        referer: str | None = None
        for _ in range(MAX_REDIRECTS + 1):
            hdrs = self._headers(url)
            if referer is not None:
                hdrs.setdefault("Referer", referer)
            resp = self._request("HEAD", url, hdrs)
            if resp.status in _REDIRECTS and self.followlocation and \
                    resp.headers.get("Location"):
                referer = url
                url = urljoin(url, resp.headers["Location"])
                continue
            return url, resp
        raise CommandError(errno.EIO, f"Number of redirects hit maximum amount: "
                                      f"Maximum ({MAX_REDIRECTS}) redirects followed")

    # Connection ------------------------------------------------------------------------
    def open(self, readonly: bool, export_name: str, is_tls: bool) -> _Handle:
        try:
            return self._open(readonly, export_name)
        except CommandError as e:
            log_open_error(self.name, e)
            raise

    def _open(self, readonly: bool, export_name: str) -> _Handle:
        what = f"problem doing HEAD request to fetch size of URL [{self.url}]"
        if self._pool_error is not None:
            raise CommandError(self._pool_error.errno, f"{what}: {self._pool_error.message}")
        try:
            url, resp = self._resolve()
        except CommandError as e:
            raise CommandError(e.errno, f"{what}: {e.message}") from None
        if resp.status >= 400:
            raise CommandError(errno.EIO, f"{what}: HTTP response code said error: "
                                          f"The requested URL returned error: {resp.status}")
        length = resp.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            raise CommandError(errno.EIO, f"could not get length of remote file [{self.url}], "
                                          f"is the URL correct?")
        if not _accepts_ranges(resp.headers.get_all("Accept-Ranges") or []):
            raise CommandError(errno.EIO,
                               "server does not support 'range' (byte range) requests")
        log.debug("curl: content length: %s", length)
        h = _Handle(url, int(length), readonly)
        try:
            self._check_protocol(url)
            h.scheme_ok = True
        except CommandError:
            pass
        return h

    def close(self, h: _Handle) -> None:
        if self._jar is not None and self.cookiejar:
            from pynbd.plugins._network_cookies import save_jar

            save_jar(self._jar, self.cookiejar)

    # Export properties -----------------------------------------------------------------
    def get_size(self, h: _Handle) -> int:
        return h.size

    def can_multi_conn(self, h: _Handle) -> bool:
        # Every connection reads the same file; with writes HTTP has no flush to order them.
        return h.readonly

    # Data ------------------------------------------------------------------------------
    def pread(self, h: _Handle, count: int, offset: int, flags: int) -> Any:
        hdrs = self._headers(h.url)
        if self._ranges is not None and h.scheme_ok:
            data = self._ranges.get(h.url, hdrs, offset, count)
            if data is not None:
                return data
        return self._pread_urllib3(h.url, hdrs, count, offset)

    def _start_pread(self, h: _Handle, count: int, offset: int, flags: int,
                     done: Callable[[BaseException | None, Any], None]) -> None:
        """pread on the event loop (only without scripts, whose headers may block)."""
        if not h.scheme_ok:
            self._fallback(h.url, offset, count, done)
            return
        self._loop_ranges.start(h.url, self._headers(h.url), offset, count, done)

    def _fallback(self, url: str, offset: int, count: int,
                  done: Callable[[BaseException | None, Any], None]) -> None:
        """A READ the loop could not do: urllib3 in a worker thread, ``done`` on the loop."""
        def slow() -> Any:
            return self._pread_urllib3(url, self._headers(url), count, offset)

        def finished(f: asyncio.Future[Any]) -> None:
            if f.cancelled():
                done(CommandError(errno.EIO, "pread: cancelled"), None)
            elif f.exception() is not None:
                done(f.exception(), None)
            else:
                done(None, f.result())

        asyncio.get_running_loop().run_in_executor(None, slow).add_done_callback(finished)

    def _pread_urllib3(self, url: str, hdrs: dict[str, Any], count: int, offset: int) -> Any:
        hdrs["Range"] = f"bytes={offset}-{offset + count - 1}"
        resp = self._request("GET", url, hdrs)
        if resp.status >= 400:
            raise CommandError(errno.EIO, f"pread: curl_easy_perform: HTTP response code said "
                                          f"error: The requested URL returned error: "
                                          f"{resp.status}")
        data = resp.data
        if resp.status != 206:
            # A server that ignored the range sent the whole file (or a redirect page).
            if resp.status == 200 and len(data) >= offset + count:
                return memoryview(data)[offset:offset + count]
            raise CommandError(errno.EIO, f"pread: the server answered a range request with "
                                          f"HTTP status {resp.status}")
        if len(data) < count:
            raise CommandError(errno.EIO, f"pread: the server sent {len(data)} bytes where "
                                          f"{count} were asked for")
        return data if len(data) == count else memoryview(data)[:count]

    def pwrite(self, h: _Handle, buf: memoryview, offset: int, flags: int) -> None:
        hdrs = self._headers(h.url)
        hdrs["Content-Range"] = f"bytes {offset}-{offset + len(buf) - 1}/*"
        resp = self._request("PUT", h.url, hdrs, body=bytes(buf))
        if resp.status >= 300:
            raise CommandError(errno.EIO, f"pwrite: curl_easy_perform: HTTP response code "
                                          f"said error: The requested URL returned error: "
                                          f"{resp.status}")


def _threads() -> int:
    """The server's thread count (-t): how many range requests may be in flight at once."""
    from pynbd.plugin import _servers

    for server in list(_servers):
        n = getattr(getattr(server, "config", None), "threads", None)
        if isinstance(n, int) and n > 0:
            return n
    return 16


def _parse_protocols(value: str) -> tuple[str, ...]:
    names = []
    for name in value.split(","):
        if not name:
            continue
        if name not in KNOWN_PROTOCOLS:
            raise ConfigError(f"protocols: protocol name not found: {name}")
        names.append(name)
    if not names:
        raise ConfigError("protocols: empty list of protocols is not allowed")
    return tuple(names)


def _set_header(hdrs: dict[str, Any], name: str, value: str | None) -> None:
    from pynbd.plugins._network_http import SKIP

    for k in list(hdrs):
        if k.lower() == name.lower():
            del hdrs[k]
    if value is None:
        if name.lower() in ("user-agent", "accept"):
            hdrs[name] = SKIP
        return
    hdrs[name] = value


def _accepts_ranges(values: list[str]) -> bool:
    """libcurl's test, as nbdkit does it: an Accept-Ranges header whose value is exactly
    ``bytes`` (blanks around it allowed)."""
    return any(v.strip() == "bytes" for v in values)


def _strip_auth(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _http_error(url: str, e: BaseException) -> CommandError:
    """A urllib3 failure in libcurl's words (curl_easy_strerror: detail)."""
    import urllib3

    parts = urlsplit(url)
    cause = e
    if isinstance(e, urllib3.exceptions.MaxRetryError) and e.reason is not None:
        cause = e.reason
    if isinstance(cause, (urllib3.exceptions.SSLError, ssl.SSLError)):
        return CommandError(errno.EIO, f"SSL peer certificate or SSH remote key was not OK: "
                                       f"{_reason(cause)}")
    if isinstance(cause, urllib3.exceptions.NewConnectionError | ConnectionError):
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return CommandError(errno.EIO, f"Couldn't connect to server: Failed to connect to "
                                       f"{parts.hostname} port {port}: {_reason(cause)}")
    if isinstance(cause, urllib3.exceptions.NameResolutionError):
        return CommandError(errno.EIO, f"Couldn't resolve host name: Could not resolve host: "
                                       f"{parts.hostname}")
    if isinstance(cause, urllib3.exceptions.TimeoutError):
        return CommandError(errno.ETIMEDOUT, f"Timeout was reached: {_reason(cause)}")
    return CommandError(errno.EIO, f"Failure when receiving data from the peer: "
                                   f"{_reason(cause)}")


def _reason(e: BaseException) -> str:
    text = str(e)
    for sep in ("Failed to establish a new connection: ", "): "):
        if sep in text:
            text = text.split(sep, 1)[1]
    return text.strip().rstrip(")") or type(e).__name__
