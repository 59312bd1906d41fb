#!/usr/bin/env python3
"""Benchmark `pynbd serve` against nbdkit with fio's nbd engine, in ONE run.

Each job runs against a fresh `pynbd serve -f -U SOCK PLUGIN ...` and a fresh
`nbdkit -f -U SOCK PLUGIN ...` over a Unix socket, alternating which server
goes first from job to job (machines are noisy; only the ratio of two numbers
measured in the same minute means anything). fio's `--output-format=json`
gives IOPS and bandwidth; the table shows both servers and pynbd/nbdkit.

    python benchmarks/fio_server.py                   # all jobs, 8 s each
    python benchmarks/fio_server.py --runtime 5 --markdown   # for docs/performance.md
    python benchmarks/fio_server.py --only nbdkit      # check the set-up without pynbd
    python benchmarks/fio_server.py --jobs mem-randread-4k --repeat 3
    python benchmarks/fio_server.py --pynbd-cmd nbdkit   # A/A run: how noisy is this machine?

The two null-* jobs have no bar: against the null plugin the server does almost nothing, so
they show how many requests fio itself can send on this machine (its CPU is in "fio CPU").

After the timed part of every run, before the server stops, the data is checked once (not
timed, not in the CPU figures) with fio's own verification, so a fast wrong answer cannot
pass: memory write jobs write the whole disk and read it back (crc32c in every block); the
memory read jobs and the null jobs read the whole disk as zeros, which is what the timed part
read; the file job's image is written by fio with crc32c blocks and read back whole.

The default pynbd is this checkout's (src/ next to this script, under this Python).

Needs fio with the nbd engine (Debian's fio has it: `fio --enghelp=nbd`) and
nbdkit (Debian: nbdkit). Exit status: 0 when every bar that was measured
passes, 1 when one fails, 2 on an error (a server or fio failed, a data check failed,
a server did not stop cleanly): each failed run prints an ERROR line, the last line says so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

GiB = 1 << 30
#: How long a server may take from exec to listening.
START_TIMEOUT = 15.0
#: How long a server may take to exit after SIGTERM.
STOP_TIMEOUT = 10.0
SERVERS = ("pynbd", "nbdkit")
#: This checkout's sources: the default `pynbd serve` runs from here.
SRC = Path(__file__).resolve().parents[1] / "src"
#: Block size of the data checks (and of the file job's image, written by fio).
CHECK_BS = "1M"
#: Other processes using more than this many CPUs during a run make it suspect.
NOISE_CPU = 0.15


@dataclass(frozen=True)
class Job:
    name: str
    target: str  # "memory" or "file"
    rw: str
    bs: str
    iodepth: int
    metric: str  # "iops" or "bw": what the bar compares
    bar: float  # minimum pynbd/nbdkit ratio

    @property
    def title(self) -> str:
        return f"{self.target} {self.bs} {self.rw} qd{self.iodepth}"


#: The bars from the performance issue.
JOBS: tuple[Job, ...] = (
    Job("mem-randread-4k", "memory", "randread", "4k", 64, "iops", 1.25),
    Job("mem-randwrite-4k", "memory", "randwrite", "4k", 64, "iops", 1.25),
    Job("mem-read-256k", "memory", "read", "256k", 16, "bw", 1.2),
    Job("mem-write-256k", "memory", "write", "256k", 16, "bw", 1.2),
    Job("file-randread-4k", "file", "randread", "4k", 64, "iops", 1.0),
    # No bar: the null plugin does nothing, so these show how far fio itself can go here.
    Job("null-randwrite-4k", "null", "randwrite", "4k", 64, "iops", 0.0),
    Job("null-write-256k", "null", "write", "256k", 16, "bw", 0.0),
)


@dataclass
class Measurement:
    iops: float
    bw: float  # bytes/s
    lat_us: float  # mean completion latency
    server_cpu: float  # server CPU seconds / wall seconds during fio (1.0 = one core)
    fio_cpu: float  # fio's own CPU use (1.0 = one core), as fio reports it
    other_cpu: float  # CPUs busy with anything but this server and fio (noise)


@dataclass
class Result:
    job: Job
    runs: dict[str, list[Measurement]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def median(self, server: str, attr: str) -> float | None:
        ms = self.runs.get(server)
        if not ms:
            return None
        return statistics.median(getattr(m, attr) for m in ms)

    def ratio(self) -> float | None:
        p, n = self.median("pynbd", self.job.metric), self.median("nbdkit", self.job.metric)
        if p is None or n is None or n == 0:
            return None
        return p / n

    def verdict(self) -> str:
        if self.errors:
            return "ERROR"
        r = self.ratio()
        if r is None:
            return "n/a"
        if not self.job.bar:
            return "info"
        return "PASS" if r >= self.job.bar else "FAIL"


# --------------------------------------------------------------------------- servers


def server_env() -> dict[str, str]:
    """The servers' environment: ``python -m pynbd`` loads this checkout's pynbd."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    return env


def pynbd_location(python: str) -> str:
    """Where `python` loads pynbd from in the servers' environment."""
    cp = subprocess.run([python, "-c", "import pynbd; print(pynbd.__file__)"], env=server_env(),
                        check=False, capture_output=True, text=True)
    return cp.stdout.strip() if cp.returncode == 0 else f"unavailable: {cp.stderr.strip()}"


def _unix_listening(path: str) -> bool:
    """True once something listens on Unix socket `path` (read from /proc, no connection)."""
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                parts = line.split()
                if len(parts) >= 8 and parts[7] == path and int(parts[3], 16) & 0x10000:
                    return True
        return False
    except OSError:
        with socket.socket(socket.AF_UNIX) as s:
            return s.connect_ex(path) == 0


def _busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all CPUs, from /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
        return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def children_cpu() -> float:
    """User + system CPU of this process's reaped children so far (clients run to the end)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def cpu_seconds(pid: int) -> float:
    """User+system CPU time of process `pid` (all its threads), in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def minor_faults(pid: int) -> int:
    """Minor page faults of process `pid` so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


class ServerProcess:
    def __init__(self, name: str, argv: list[str], sock: str, logdir: Path) -> None:
        self.name = name
        self.argv = argv
        self.sock = sock
        self.stderr_path = logdir / f"{name}.stderr"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
                env=server_env(),
            )

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-4000:]

    def wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not (os.path.exists(self.sock) and _unix_listening(self.sock)):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{shlex.join(self.argv)} exited {self.proc.returncode} before listening:\n"
                    + self.stderr()
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"{shlex.join(self.argv)} not listening after {START_TIMEOUT}s")
            time.sleep(0.02)

    def stop(self) -> str | None:
        """SIGTERM and wait; returns a complaint if it misbehaved."""
        if self.proc.poll() is not None:
            return f"{self.name} had already exited with {self.proc.returncode}:\n{self.stderr()}"
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            return f"{self.name} did not exit within {STOP_TIMEOUT}s of SIGTERM (killed)"
        if rc not in (0, -signal.SIGTERM):
            return f"{self.name} exited {rc} after SIGTERM:\n{self.stderr()}"
        return None


# --------------------------------------------------------------------------- fio


def run_fio(
    args: argparse.Namespace, job: Job, uri: str, out: Path, server_pid: int
) -> Measurement:
    argv = [
        args.fio,
        f"--name={job.name}",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={job.rw}",
        f"--bs={job.bs}",
        f"--iodepth={job.iodepth}",
        f"--size={args.size}",
        "--numjobs=1",
        "--time_based",
        f"--runtime={args.runtime}",
        f"--ramp_time={args.ramp}",
        "--output-format=json",
        f"--output={out}",
    ]
    busy0, cpu0, t0 = _busy_seconds(), cpu_seconds(server_pid), time.monotonic()
    cp = subprocess.run(
        argv,
        check=False,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=args.runtime + args.ramp + 120,
    )
    busy1, cpu1, t1 = _busy_seconds(), cpu_seconds(server_pid), time.monotonic()
    if cp.returncode != 0:
        raise RuntimeError(
            f"fio exited {cp.returncode}: {shlex.join(argv)}\n{cp.stderr}{cp.stdout}"
        )
    text = out.read_text()
    data = json.loads(text[text.index("{") :])  # fio may print a line before the JSON
    j = data["jobs"][0]
    if j.get("error"):
        raise RuntimeError(f"fio job error {j['error']}: {shlex.join(argv)}\n{cp.stderr}")
    side = j["write" if "write" in job.rw else "read"]
    if side["io_bytes"] == 0:
        raise RuntimeError(f"fio did no I/O: {shlex.join(argv)}\n{cp.stderr}")
    wall = t1 - t0
    server_cpu = (cpu1 - cpu0) / wall
    # fio reports its own CPU use over its runtime, in percent of one CPU.
    fio_cpu = (float(j.get("usr_cpu", 0)) + float(j.get("sys_cpu", 0))) / 100
    fio_cpu *= (args.runtime + args.ramp) / wall
    return Measurement(
        iops=float(side["iops"]),
        bw=float(side["bw_bytes"]),
        lat_us=float(side["clat_ns"]["mean"]) / 1000,
        server_cpu=server_cpu,
        fio_cpu=fio_cpu,
        other_cpu=max(0.0, (busy1 - busy0) / wall - server_cpu - fio_cpu),
    )


def _fio_check(args: argparse.Namespace, uri: str, out: Path, *opts: str) -> dict:
    """An untimed fio job of CHECK_BS blocks over the whole disk; its JSON report."""
    argv = [args.fio, "--name=check", "--ioengine=nbd", f"--uri={uri}", f"--bs={CHECK_BS}",
            f"--size={args.size}", "--iodepth=8", "--verify_state_save=0",
            "--output-format=json", f"--output={out}", *opts]
    cp = subprocess.run(argv, check=False, stdin=subprocess.DEVNULL, capture_output=True,
                        text=True, timeout=600)
    try:
        text = out.read_text()
        job = json.loads(text[text.index("{"):])["jobs"][0]
    except (OSError, ValueError, KeyError, IndexError):
        job = None
    if cp.returncode != 0 or job is None or job["error"]:
        first = "\n".join(cp.stderr.strip().splitlines()[:4])
        raise RuntimeError(f"data check failed: fio exited {cp.returncode}: "
                           f"{shlex.join(argv)}\n{first}")
    return job


def check_data(args: argparse.Namespace, job: Job, uri: str, out: Path) -> str:
    """After the timed part: fio verifies what the server serves (see the module doc).
    RuntimeError if anything differs or is short; else what was checked."""
    size = parse_size(args.size)
    if job.target == "memory" and "write" in job.rw:
        r = _fio_check(args, uri, out, "--rw=write", "--verify=crc32c", "--do_verify=1")
        done = (r["write"]["io_bytes"], r["read"]["io_bytes"])
        what = "written and read back (crc32c)"
    elif job.target == "file":
        r = _fio_check(args, uri, out, "--rw=read", "--verify=crc32c")
        done = (size, r["read"]["io_bytes"])
        what = "read back (crc32c)"
    else:  # a fresh memory disk or the null plugin: zeros, as the timed part read
        r = _fio_check(args, uri, out, "--rw=read", "--verify=pattern", "--verify_pattern=0")
        done = (size, r["read"]["io_bytes"])
        what = "read as zeros"
    if done != (size, size):
        raise RuntimeError(f"data check failed: fio moved {done} bytes of {size}")
    return what


# --------------------------------------------------------------------------- set-up


def _fs_type(path: str) -> str:
    """The filesystem type of the mount holding `path` (from /proc/mounts)."""
    best, fstype = "", "?"
    real = os.path.realpath(path)
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1].replace("\\040", " ")
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, fstype = mnt, parts[2]
    except OSError:
        pass
    return fstype


def pick_file_dir(requested: str | None) -> Path:
    """A directory for the file job's image on a real disk (tmpfs would be memory)."""
    if requested:
        return Path(requested)
    for cand in ("/tmp", "/var/tmp", os.getcwd()):
        if os.path.isdir(cand) and os.access(cand, os.W_OK) and _fs_type(cand) != "tmpfs":
            return Path(cand)
    return Path(os.getcwd())


def make_image(fio: str, path: Path, size: int) -> None:
    """Fill `path` with `size` bytes of fio's random data, a crc32c header in every CHECK_BS
    block (no holes: reads hit real pages; check_data reads it back through the server)."""
    cp = subprocess.run([fio, "--name=image", f"--filename={path}", "--ioengine=psync",
                         "--rw=write", f"--bs={CHECK_BS}", f"--size={size}",
                         "--verify=crc32c", "--do_verify=0", "--verify_state_save=0",
                         "--output-format=terse"], check=False, stdin=subprocess.DEVNULL,
                        capture_output=True, text=True)
    if cp.returncode != 0 or path.stat().st_size != size:
        raise RuntimeError(f"fio could not write the image {path}: {cp.stderr.strip()}")


def parse_size(s: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    s = s.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (s[:-1], s[-1]) if s and s[-1] in units else (s, "")
    return int(float(num) * units[unit])


def tool_version(argv: list[str]) -> str:
    try:
        cp = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=30)
    except OSError as e:
        return f"unavailable ({e})"
    return (cp.stdout or cp.stderr).strip().splitlines()[0] if (cp.stdout or cp.stderr) else "?"


def _competing_cpu_hint() -> str:
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        return ""
    return f"load average {load1:.2f} on {os.cpu_count()} CPUs at start"


# --------------------------------------------------------------------------- output


def _fmt_iops(x: float | None) -> str:
    return "-" if x is None else f"{x / 1000:.1f}k"


def _fmt_bw(x: float | None) -> str:
    return "-" if x is None else f"{x / (1 << 20):.0f}"


def _fmt_cpu(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x * 100:.0f}%"


def table_rows(results: list[Result]) -> list[list[str]]:
    rows = []
    for r in results:
        ratio = r.ratio()
        rows.append(
            [
                r.job.title,
                _fmt_iops(r.median("pynbd", "iops")),
                _fmt_bw(r.median("pynbd", "bw")),
                _fmt_cpu(r.median("pynbd", "server_cpu")),
                _fmt_iops(r.median("nbdkit", "iops")),
                _fmt_bw(r.median("nbdkit", "bw")),
                _fmt_cpu(r.median("nbdkit", "server_cpu")),
                _fmt_cpu(r.median("pynbd", "fio_cpu")),
                "-" if ratio is None else f"{ratio:.2f}",
                _fmt_cpu(max((m.other_cpu for ms in r.runs.values() for m in ms), default=None)),
                f">= {r.job.bar:g} ({'IOPS' if r.job.metric == 'iops' else 'MB/s'})"
                if r.job.bar else "-",
                r.verdict(),
            ]
        )
    return rows


HEADERS = [
    "job",
    "pynbd IOPS",
    "pynbd MiB/s",
    "pynbd CPU",
    "nbdkit IOPS",
    "nbdkit MiB/s",
    "nbdkit CPU",
    "fio CPU (pynbd runs)",
    "pynbd/nbdkit",
    "others CPU",
    "bar",
    "result",
]


def print_text_table(results: list[Result]) -> None:
    rows = [HEADERS, *table_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADERS))]
    for k, row in enumerate(rows):
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
            )
        )
        if k == 0:
            print("  ".join("-" * w for w in widths))


def print_markdown(results: list[Result], context: dict[str, str]) -> None:
    print()
    print(f"Measured {context['date']} on {context['machine']}, {context['load']}.")
    print(f"{context['fio']}, {context['nbdkit']}, pynbd on {context['python']};")
    print(
        f"each job {context['runtime']} s after {context['ramp']} s ramp-up, one fio job over a "
        f"Unix socket, fresh server per run, servers alternating; median of {context['repeat']}."
    )
    print(
        "CPU is the server's CPU time over the run (100% = one core); 'others CPU' is the most"
        " that other processes (not the server, not fio) used during one of the job's runs."
    )
    print()
    print("| " + " | ".join(HEADERS) + " |")
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(HEADERS))) + "|")
    for row in table_rows(results):
        print("| " + " | ".join(row) + " |")
    print()
    print("Produced by:")
    print()
    print("```")
    print(context["command"])
    print("```")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--runtime", type=float, default=8, help="seconds per fio job (default 8)")
    ap.add_argument("--ramp", type=float, default=1, help="fio ramp-up seconds (default 1)")
    ap.add_argument("--size", default="1G", help="disk size, whole MiB (default 1G)")
    ap.add_argument("--only", choices=("both", *SERVERS), default="both")
    ap.add_argument(
        "--jobs",
        default=",".join(j.name for j in JOBS),
        help="comma-separated job names: " + ", ".join(j.name for j in JOBS),
    )
    ap.add_argument("--repeat", type=int, default=1, help="runs per job and server (median)")
    ap.add_argument(
        "--pynbd-cmd",
        default=shlex.join([sys.executable, "-m", "pynbd", "serve"]),
        help="command taking nbdkit's command line (default: this python -m pynbd serve,"
        " with this checkout's src/ first on PYTHONPATH)",
    )
    ap.add_argument("--nbdkit-cmd", default="nbdkit")
    ap.add_argument("--fio", default="fio")
    ap.add_argument(
        "--file-dir", help="where the file job's image goes (default: /tmp unless tmpfs)"
    )
    ap.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    ap.add_argument("--json", metavar="PATH", help="write all measurements as JSON")
    args = ap.parse_args(argv)
    by_name = {j.name: j for j in JOBS}
    try:
        args.job_list = [by_name[n.strip()] for n in args.jobs.split(",") if n.strip()]
    except KeyError as e:
        ap.error(f"unknown job {e}; known: {', '.join(by_name)}")
    if parse_size(args.size) % (1 << 20):
        ap.error("--size must be a whole number of MiB (the data checks use 1 MiB blocks)")
    args.servers = SERVERS if args.only == "both" else (args.only,)
    args.commands = {"pynbd": shlex.split(args.pynbd_cmd),
                     "nbdkit": shlex.split(args.nbdkit_cmd)}
    return args


def missing_tools(args: argparse.Namespace) -> str | None:
    """Why the benchmark cannot run here, or None."""
    for s in args.servers:
        if shutil.which(args.commands[s][0]) is None:
            return f"{args.commands[s][0]} not found"
    if shutil.which(args.fio) is None:
        return "fio not found (Debian: apt-get install fio)"
    enghelp = subprocess.run(
        [args.fio, "--enghelp=nbd"], check=False, capture_output=True, text=True
    )
    if enghelp.returncode != 0 or "uri" not in enghelp.stdout:
        return "this fio has no nbd engine (fio --enghelp=nbd)"
    return None


def make_context(args: argparse.Namespace, argv: list[str] | None) -> dict[str, str]:
    """What the report says about this run; prints it, and the CPU noise before starting."""
    context = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()} Linux {platform.release()}, {os.cpu_count()} CPUs",
        "load": _competing_cpu_hint(),
        "fio": tool_version([args.fio, "--version"]),
        "nbdkit": tool_version([args.commands["nbdkit"][0], "--version"])
        if "nbdkit" in args.servers
        else "nbdkit not run",
        "python": f"Python {platform.python_version()}",
        "runtime": f"{args.runtime:g}",
        "ramp": f"{args.ramp:g}",
        "repeat": str(args.repeat),
        "command": shlex.join(["python", os.path.relpath(sys.argv[0]), *sys.argv[1:]])
        if argv is None
        else shlex.join(["python", "benchmarks/fio_server.py", *argv]),
    }
    print(
        f"# {context['date']}  {context['machine']}  {context['load']}\n"
        f"# {context['fio']}; {context['nbdkit']}; {context['python']}"
    )
    for s in args.servers:
        print(f"# {s}: {shlex.join(args.commands[s])} -f -U SOCK PLUGIN ...")
    if "pynbd" in args.servers and args.commands["pynbd"][1:3] == ["-m", "pynbd"]:
        print(f"# pynbd: {pynbd_location(args.commands['pynbd'][0])}")
    b0, t0 = _busy_seconds(), time.monotonic()
    time.sleep(1)
    idle_busy = (_busy_seconds() - b0) / (time.monotonic() - t0)
    context["load"] += f", {idle_busy:.2f} CPUs busy before starting"
    print(f"# {idle_busy:.2f} CPUs busy in the second before starting")
    if idle_busy > NOISE_CPU:
        print(
            "# WARNING: something else is using the CPUs; ratios will be noisy"
            " (use --repeat, or an A/A run with --pynbd-cmd nbdkit)",
            file=sys.stderr,
        )
    return context


def run_once(args: argparse.Namespace, job: Job, name: str, plugin: list[str],
             workdir: Path) -> tuple[Measurement, str]:
    """One fresh server, the timed fio job, then the data check; RuntimeError (or
    TimeoutExpired) if any of it failed, the server's misbehaving at SIGTERM included."""
    sock = str(workdir / f"{name}.sock")
    server = ServerProcess(name, [*args.commands[name], "-f", "-U", sock, *plugin], sock,
                           workdir)
    try:
        server.wait_listening()
        m = run_fio(args, job, server.uri, workdir / "fio.json", server.proc.pid)
        checked = check_data(args, job, server.uri, workdir / "check.json")
    finally:
        complaint = server.stop()
        if os.path.exists(sock):
            os.unlink(sock)
    if complaint:
        raise RuntimeError(complaint)
    return m, checked


def run_all(args: argparse.Namespace, results: list[Result], image: Path | None,
            workdir: Path) -> tuple[bool, bool]:
    """Every job on every server, alternating which goes first; (an error, noisy)."""
    error = noisy = False
    total = len(results) * len(args.servers) * args.repeat
    step = 0
    for i, result in enumerate(results):
        job = result.job
        plugin = ["file", str(image)] if job.target == "file" else [job.target, args.size]
        for rep in range(args.repeat):
            order = list(args.servers)
            if (i + rep) % 2:
                order.reverse()
            for name in order:
                step += 1
                head = f"[{step}/{total}] {job.name:17} {name:6}"
                try:
                    m, checked = run_once(args, job, name, plugin, workdir)
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    result.errors[name] = str(e)
                    print(f"{head} ERROR: {e}", flush=True)
                    error = True
                    continue
                result.runs.setdefault(name, []).append(m)
                print(
                    f"{head} {m.iops:>10.0f} IOPS {m.bw / (1 << 20):>8.1f} MiB/s "
                    f"lat {m.lat_us:>7.1f} us  server CPU {_fmt_cpu(m.server_cpu)}"
                    f"  fio CPU {_fmt_cpu(m.fio_cpu)}  others {_fmt_cpu(m.other_cpu)}"
                    f"  data {checked}",
                    flush=True,
                )
                noisy = noisy or m.other_cpu > NOISE_CPU
    return error, noisy


def write_json(path: str, context: dict[str, str], results: list[Result]) -> None:
    with open(path, "w") as f:
        json.dump(
            {
                "context": context,
                "results": [
                    {
                        "job": r.job.__dict__,
                        "runs": {s: [m.__dict__ for m in ms] for s, ms in r.runs.items()},
                        "errors": r.errors,
                        "ratio": r.ratio(),
                        "verdict": r.verdict(),
                    }
                    for r in results
                ],
            },
            f,
            indent=2,
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    why = missing_tools(args)
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    context = make_context(args, argv)
    workdir = Path(tempfile.mkdtemp(prefix="pynbd-bench-"))
    image: Path | None = None
    results = [Result(job) for job in args.job_list]
    try:
        if any(j.target == "file" for j in args.job_list):
            image_dir = pick_file_dir(args.file_dir)
            image = Path(tempfile.mkstemp(prefix="pynbd-bench-", suffix=".img", dir=image_dir)[1])
            print(f"# file image: {image} ({args.size}, {_fs_type(str(image_dir))})")
            make_image(args.fio, image, parse_size(args.size))
        error, noisy = run_all(args, results, image, workdir)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if image is not None:
            image.unlink(missing_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)

    print()
    print_text_table(results)
    if args.markdown:
        print_markdown(results, context)
    if args.json:
        write_json(args.json, context, results)
    verdicts = [r.verdict() for r in results]
    print()
    if noisy:
        print(
            f"WARNING: other processes used more than {NOISE_CPU:.0%} of a CPU during some runs"
            " ('others' above): these ratios are not trustworthy; rerun on a quiet machine."
        )
    for r in results:
        ratio = r.ratio()
        shown = "-" if ratio is None else f"{ratio:.2f}"
        print(f"{r.verdict():5} {r.job.name}: pynbd/nbdkit {shown} (bar {r.job.bar:g})")
    if error or "ERROR" in verdicts:
        print("FAIL: a run failed (ERROR above): these numbers do not count", file=sys.stderr)
        return 2
    return 1 if "FAIL" in verdicts else 0


if __name__ == "__main__":
    sys.exit(main())
