"""The curl plugin against a real nginx (Debian's nginx-light) started on loopback, over
HTTP and HTTPS (a test CA and server certificate made with openssl), side by side with
nbdkit's curl plugin: the same bytes, the same errors (a server without range support, a
missing file), redirects, headers, cookies, scripts and basic authentication."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import PYNBD, free_tcp_port, peer_env, require, run_peer, wait_listening
from side_by_side import FLAG_NAMES, probe, serve_both

SIZE = 3 * 1000 * 1000 + 17  # not a multiple of anything


@dataclass
class Nginx:
    http: str  # http://127.0.0.1:PORT
    https: str
    root: Path
    ca: Path
    log: Path
    unix: Path

    def requests(self) -> list[str]:
        """The request lines nginx logged so far ("HEAD /disk.img", ...)."""
        return [line.split('"')[1].rsplit(" ", 1)[0] for line in
                self.log.read_text().splitlines() if '"' in line]


def _make_certs(d: Path) -> None:
    openssl = require("openssl")
    run = lambda *a: subprocess.run([openssl, *a], check=True, capture_output=True, cwd=d)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=pynbd test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=localhost")
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")


_CONF = """daemon off; master_process off; worker_processes 1;
pid {d}/nginx.pid; error_log {d}/error.log;
events {{ worker_connections 512; }}
http {{
  access_log {d}/access.log;
  client_body_temp_path {d}/t1; proxy_temp_path {d}/t2; fastcgi_temp_path {d}/t3;
  uwsgi_temp_path {d}/t4; scgi_temp_path {d}/t5;
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{port}; listen 127.0.0.1:{tls} ssl; listen unix:{d}/http.sock;
    ssl_certificate {d}/server.pem; ssl_certificate_key {d}/server.key;
    root {d}/www;
    location = /redirect.img {{ return 302 /disk.img; }}
    location = /loop.img {{ return 302 /loop.img; }}
    location /norange/ {{ alias {d}/www/; max_ranges 0; }}
    location /header/ {{
      alias {d}/www/;
      if ($http_x_token != "secret") {{ return 403; }}
      if ($http_user_agent != "") {{ return 400; }}
    }}
    location /cookie/ {{ alias {d}/www/; if ($cookie_session != "abc") {{ return 403; }} }}
    location /agent/ {{ alias {d}/www/; if ($http_user_agent != "pynbd-test") {{ return 403; }} }}
    location /auth/ {{ alias {d}/www/; auth_basic "test"; auth_basic_user_file {d}/htpasswd; }}
  }}
}}
"""


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    exe = require("nginx")
    d = tmp_path_factory.mktemp("nginx")
    (d / "www").mkdir()
    (d / "www" / "disk.img").write_bytes(bytes((i * 13 + i // 4096) & 0xFF
                                               for i in range(SIZE)))
    _make_certs(d)
    hashed = subprocess.run([require("openssl"), "passwd", "-apr1", "s3cret"], check=True,
                            capture_output=True, text=True).stdout.strip()
    (d / "htpasswd").write_text(f"alice:{hashed}\n")
    port, tls = free_tcp_port(), free_tcp_port()
    (d / "nginx.conf").write_text(_CONF.format(d=d, port=port, tls=tls))
    proc = subprocess.Popen([exe, "-c", str(d / "nginx.conf"), "-p", str(d)],
                            stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port=tls, proc=proc, describe="nginx")  # type: ignore[arg-type]
        yield Nginx(f"http://127.0.0.1:{port}", f"https://localhost:{tls}", d / "www",
                    d / "ca.pem", d / "access.log", d / "http.sock")
    finally:
        proc.terminate()
        proc.wait(10)


def both(pynbd_server, nbdkit_server, args, ops):  # type: ignore[no-untyped-def]
    """Both servers' views; every flag must match but multi-conn, which pynbd advertises
    for read-only exports (nbdkit 1.32's curl plugin does not)."""
    p, n = serve_both(pynbd_server, nbdkit_server, args)
    got, want = probe(p.uri, ops), probe(n.uri, ops)
    p.stop()
    n.stop()
    for k in ("connect_error", "size", "structured"):
        assert got.get(k) == want.get(k), (k, got, want)
    if "flags" in want:
        for f in FLAG_NAMES:
            if f != "can_multi_conn":
                assert got["flags"][f] == want["flags"][f], f
    assert got.get("results") == want.get("results")
    return got


OPS = [("pread", 4096, 0), ("pread", 65536, 12345), ("pread", 17, SIZE - 17),
       ("pread", 1 << 20, 1 << 20)]


def test_http_side_by_side(pynbd_server, nbdkit_server, nginx, tmp_path):
    got = both(pynbd_server, nbdkit_server, ["-r", "curl", f"{nginx.http}/disk.img"], OPS)
    data = (nginx.root / "disk.img").read_bytes()
    assert got["size"] == SIZE and got["results"][2][1] == data[-17:]
    assert got["flags"]["can_multi_conn"] is True
    p = pynbd_server("-r", "curl", f"url={nginx.http}/disk.img")
    out = tmp_path / "copy"
    run_peer("nbdcopy", p.uri, out)
    assert out.read_bytes() == data


def test_https_with_test_ca(pynbd_server, nbdkit_server, nginx):
    both(pynbd_server, nbdkit_server,
         ["-r", "curl", f"{nginx.https}/disk.img", f"cainfo={nginx.ca}"], OPS)
    both(pynbd_server, nbdkit_server,
         ["-r", "curl", f"{nginx.https}/disk.img", "sslverify=false"], OPS[:1])
    # Without the CA the certificate is refused: both fail to open, pynbd says why.
    got = both(pynbd_server, nbdkit_server,
               ["-r", "curl", f"{nginx.https}/disk.img", "cainfo=/etc/hostname"], [])
    assert "connect_error" in got


def test_no_range_support(pynbd_server, nbdkit_server, nginx):
    got = both(pynbd_server, nbdkit_server, ["-r", "curl", f"{nginx.http}/norange/disk.img"],
               [])
    assert "connect_error" in got
    p = pynbd_server("-r", "curl", f"{nginx.http}/norange/disk.img")
    probe(p.uri)
    assert "server does not support 'range' (byte range) requests" in p.stderr
    assert "Traceback" not in p.stderr


def test_missing_file(pynbd_server, nbdkit_server, nginx):
    url = f"{nginx.http}/nonexistent.img"
    assert "connect_error" in both(pynbd_server, nbdkit_server, ["-r", "curl", url], [])
    p = pynbd_server("-r", "curl", url)
    probe(p.uri)
    assert (f"problem doing HEAD request to fetch size of URL [{url}]: HTTP response code "
            f"said error: The requested URL returned error: 404") in p.stderr


def test_redirect_resolved_once(pynbd_server, nbdkit_server, nginx):
    """The redirect is followed by the HEAD of each client; its reads go straight to the
    final URL (nbdkit 1.32 asks the redirecting URL again for every read)."""
    before = len(nginx.requests())
    got = both(pynbd_server, nbdkit_server, ["-r", "curl", f"{nginx.http}/redirect.img"],
               OPS[:2])
    assert got["size"] == SIZE
    p = pynbd_server("-r", "curl", f"{nginx.http}/redirect.img")
    start = len(nginx.requests())
    probe(p.uri, [("pread", 512, i * 4096) for i in range(8)])
    mine = nginx.requests()[start:]
    assert mine.count("GET /disk.img") == 8 and "GET /redirect.img" not in mine, mine
    assert mine.count("HEAD /redirect.img") == 1
    assert len(nginx.requests()) > before
    # followlocation=false: the redirect page has no ranges, as nbdkit says.
    assert "connect_error" in both(
        pynbd_server, nbdkit_server,
        ["-r", "curl", f"{nginx.http}/redirect.img", "followlocation=false"], [])


def test_headers_cookies_agent_auth(pynbd_server, nbdkit_server, nginx, tmp_path):
    hdr = ["header=X-Token: secret", "header=User-Agent:"]
    both(pynbd_server, nbdkit_server, ["-r", "curl", f"{nginx.http}/header/disk.img", *hdr],
         OPS[:1])
    assert "connect_error" in both(pynbd_server, nbdkit_server,
                                   ["-r", "curl", f"{nginx.http}/header/disk.img"], [])
    script = "header-script=echo 'X-Token: secret'; echo 'User-Agent:'"
    both(pynbd_server, nbdkit_server,
         ["-r", "curl", f"{nginx.http}/header/disk.img", script, "header-script-renew=1"],
         OPS[:2])
    both(pynbd_server, nbdkit_server,
         ["-r", "curl", f"{nginx.http}/cookie/disk.img", "cookie=session=abc"], OPS[:1])
    cookie_file = tmp_path / "cookie"
    cookie_file.write_text("session=abc\n")
    both(pynbd_server, nbdkit_server,
         ["-r", "curl", f"{nginx.http}/cookie/disk.img", f"cookie=+{cookie_file}"], OPS[:1])
    both(pynbd_server, nbdkit_server,
         ["-r", "curl", f"{nginx.http}/cookie/disk.img", "cookie-script=echo session=abc"],
         OPS[:1])
    both(pynbd_server, nbdkit_server,
         ["-r", "curl", f"{nginx.http}/agent/disk.img", "user-agent=pynbd-test"], OPS[:1])
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    both(pynbd_server, nbdkit_server,
         ["-r", "curl", f"{nginx.http}/auth/disk.img", "user=alice", f"password=+{pw}"],
         OPS[:1])
    assert "connect_error" in both(
        pynbd_server, nbdkit_server,
        ["-r", "curl", f"{nginx.http}/auth/disk.img", "user=alice", "password=wrong"], [])


def test_unix_socket_path(pynbd_server, nbdkit_server, nginx):
    both(pynbd_server, nbdkit_server,
         ["-r", "curl", "http://localhost/disk.img", f"unix-socket-path={nginx.unix}"], OPS)


def test_protocols(pynbd_server, nbdkit_server, nginx):
    assert "connect_error" in both(pynbd_server, nbdkit_server,
                                   ["-r", "curl", f"{nginx.http}/disk.img", "protocols=https"],
                                   [])
    both(pynbd_server, nbdkit_server,
         ["-r", "curl", f"{nginx.http}/disk.img", "protocols=http,https"], OPS[:1])


def test_writes_are_refused_by_nginx(pynbd_server, nbdkit_server, nginx):
    """Without -r writes become PUT requests, which nginx refuses: EIO, as nbdkit."""
    got = both(pynbd_server, nbdkit_server, ["curl", f"{nginx.http}/disk.img"],
               [("pwrite", b"x" * 512, 0), ("pread", 512, 0)])
    assert got["results"][0] == ["error", 5]


BAD = [
    [],
    ["url=http://x", "header=a: b", "header-script=true"],
    ["url=http://x", "header-script-renew=5"],
    ["url=http://x", "cookie=a", "cookie-script=b"],
    ["url=http://x", "cookie-script-renew=5"],
    ["url=http://x", "cookie-script-renew=abc"],
    ["url=http://x", "protocols=http,foo"],
    ["url=http://x", "protocols="],
    ["url=http://x", "timeout=-1"],
    ["url=http://x", "sslverify=maybe"],
    ["url=http://x", "password=+/nonexistent"],
    ["url=http://x", "password=-1"],
    ["url=http://x", "password=-abc"],
    ["url=http://x", "cookiefile=-"],
    ["url=http://x", "connections=4"],
]


@pytest.mark.parametrize("params", BAD, ids=[" ".join(p) or "none" for p in BAD])
def test_bad_parameters(params, sockdir):
    """One line, nbdkit's message, exit 1."""
    run = []
    for cmd in ([*PYNBD, "serve"], [require("nbdkit")]):
        cp = subprocess.run([*cmd, "-U", str(sockdir / "x.sock"), "curl", *params, "--run",
                             "true"], capture_output=True, text=True, env=peer_env(),
                            stdin=subprocess.DEVNULL, timeout=60, check=False)
        run.append(cp)
    p, n = run
    assert n.returncode == 1 and p.returncode == 1, (p.stderr, n.stderr)
    assert p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.split("error: ", 1)[1] == n.stderr.split("error: ", 1)[1]
