"""Real redis-server and memcached processes on loopback, for the tests and the benchmarks alike: a
Redis single node (stoppable, killable, restartable on the same port), a 3-primary cluster, and a
memcached (likewise, with its item size ``-I`` as a parameter).

Every server binds 127.0.0.1, runs in its own directory with no persistence (``--save ""
--appendonly no``), is ready when PING answers, and is stopped by ``stop()`` (terminate, wait,
kill): only the process this object started.

Ports. A port found free and handed to a server that binds it later can be taken in between: by
another server started here, by a test suite running beside it, or by any socket the kernel gives
an ephemeral port (``bind`` to port 0, ``connect``). So ``free_port()`` *reserves* the port: it is
left with a connection in TIME_WAIT, and for that minute the kernel gives it to no ``bind(0)`` and
no ``connect()``, while a server that sets ``SO_REUSEADDR`` (redis-server, memcached and uvicorn do)
still binds it. A server stopped or killed re-reserves its ports for its restart. And a start is
checked, not assumed: a server that could not bind ("Address already in use"), or whose port is
answered by another process (the pid it reports is not the one started), raises ``PortTaken``, and
``start_server`` / ``start_memcached`` / ``RedisClusterServers.start`` try again on new ports.
``tests/redis_servers.py`` and ``tests/memcached_servers.py`` wrap these in pytest fixtures;
``kvtier bench tiers`` / ``chat`` / ``memcached`` start one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
INSTALL_HINT = (
    "redis-server / redis-cli not found on PATH: run scripts/test.sh, which installs the Debian "
    "package redis-server"
)


def redis_binaries() -> tuple[str, str]:
    """Paths of ``redis-server`` and ``redis-cli``; FileNotFoundError with an install hint if missing."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        raise FileNotFoundError(INSTALL_HINT)
    return server, cli


HOST = "127.0.0.1"
ADDRESS_IN_USE = "address already in use"  # redis-server, memcached and uvicorn say it so (any case)


class PortTaken(RuntimeError):
    """The server could not have its port: another socket bound it, or another process answers it."""


def reserve_port(port: int = 0) -> int:
    """``port`` (0: one the kernel picks) on 127.0.0.1, left reserved for about a minute: bound and
    listening with ``SO_REUSEADDR``, connected to once and closed from the accepting side, so that
    the port is in TIME_WAIT. Raises OSError if ``port`` is in use."""
    with contextlib.closing(socket.socket()) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, port))
        listener.listen(8)
        listener.settimeout(5.0)
        address = listener.getsockname()
        with contextlib.closing(socket.create_connection(address, timeout=5.0)):
            accepted, _ = listener.accept()  # ours, or a client of a server just killed there
            accepted.close()  # the accepting side closes first: its end is the one in TIME_WAIT
        return int(address[1])


def free_port() -> int:
    """A loopback port for a server to bind: nothing listens there, and nothing the kernel hands out
    takes it for a minute (see the module doc); the server must set ``SO_REUSEADDR``."""
    return reserve_port()


def _rereserve(port: int) -> None:
    """Keep a stopped server's port for its restart (best effort: it may be gone already)."""
    with contextlib.suppress(OSError):
        reserve_port(port)


def _ping(port: int, timeout: float = 0.2) -> bool:
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _wait_until_stopped(pid: int, timeout: float = START_TIMEOUT_S) -> None:
    """Wait until every thread of ``pid`` is in the stopped state (Linux: /proc; elsewhere no wait)."""
    tasks = Path(f"/proc/{pid}/task")
    if not tasks.is_dir():
        return
    deadline = time.monotonic() + timeout
    while not all(_thread_state(t) in ("T", "t", "Z", "X", "") for t in tasks.iterdir()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"process {pid} did not stop within {timeout} s of SIGSTOP")
        time.sleep(0.001)


def _thread_state(task: Path) -> str:
    """The state letter of /proc/PID/task/TID/stat ('' if the thread is gone)."""
    try:
        stat = (task / "stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[0]  # the name, in parentheses, may hold spaces


class _ServerProcess:
    """A server process this object started on 127.0.0.1:``port``: wait until it answers, stop
    (SIGCONT first: a paused process cannot act on SIGTERM; then terminate, wait, kill), crash
    (SIGKILL), freeze (SIGSTOP) and thaw. Only ever the process it started."""

    def __init__(self, port: int | None) -> None:
        self.port = port if port is not None else free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _ports(self) -> list[int]:
        """The ports this server binds (kept reserved while it is stopped)."""
        return [self.port]

    def _answering_pid(self) -> int:
        """The pid of the server that answers on ``port`` (-1 if none says)."""
        raise NotImplementedError

    def _spawn(self, argv: list[str], answers: Callable[[int], bool], timeout: float, **popen: Any) -> bool:
        """Start ``argv`` and wait until ``answers(port)``; False (the process stopped) if it never does.
        Raises PortTaken if what answered is another process (ours exits: its bind failed)."""
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, **popen)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if answers(self.port):
                self._check_owner()
                return True
            time.sleep(0.02)
        return False

    def _check_owner(self) -> None:
        assert self.proc is not None
        try:
            pid = self._answering_pid()
        except Exception:  # refused, reset, timed out: not ours either way
            pid = -1
        if pid != self.proc.pid:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(1.0)  # it is exiting (its bind failed)
            self.stop()
            raise PortTaken(f"port {self.port} is answered by pid {pid}, not by the server started here")

    @staticmethod
    def _not_started(what: str, output: str) -> RuntimeError:
        """The error of a start that failed: PortTaken when the port was in use."""
        error = PortTaken if ADDRESS_IN_USE in output.lower() else RuntimeError
        return error(f"{what} did not start:\n{output}")

    def stop(self) -> None:
        """Terminate (SIGTERM), wait, then kill if it is still there."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._keep_ports()

    def kill(self) -> None:
        """Crash the server (SIGKILL): no clean shutdown, clients see their connections reset."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        self._keep_ports()

    def _keep_ports(self) -> None:
        for port in self._ports():
            _rereserve(port)

    def pause(self) -> None:
        """Freeze it (SIGSTOP): connections stay open and nothing answers, as on a hung host.
        Returns once every thread of it has stopped: each stops only when it is next scheduled,
        and until then a server on a busy machine still answered requests sent after pause()."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        _wait_until_stopped(self.proc.pid)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisServer(_ServerProcess):
    """One redis-server process on 127.0.0.1. ``stop()`` then ``start()`` reuses the same port."""

    def __init__(self, directory: Path, port: int | None = None, cluster: bool = False) -> None:
        self.server_bin, self.cli_bin = redis_binaries()
        super().__init__(port)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.cluster = cluster
        self.cluster_bus_port = free_port() if cluster else 0

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    def _argv(self) -> list[str]:
        argv = [
            self.server_bin,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        if self.cluster:
            argv += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-port", str(self.cluster_bus_port),
                "--cluster-node-timeout", "5000",
            ]  # fmt: skip
        return argv

    def _ports(self) -> list[int]:
        return [self.port, self.cluster_bus_port] if self.cluster else [self.port]

    def _answering_pid(self) -> int:
        client = self.client(socket_timeout=5.0)
        try:
            return int(client.info("server")["process_id"])
        finally:
            client.close()

    def start(self, timeout: float = START_TIMEOUT_S) -> RedisServer:
        """Start the process and wait until PING answers; raises RuntimeError with the log if it
        can't (PortTaken if its port was not to be had)."""
        if self.running:
            return self
        if self._spawn(self._argv(), _ping, timeout, cwd=self.directory, stderr=subprocess.DEVNULL):
            return self
        self.stop()
        log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
        raise self._not_started(f"redis-server on port {self.port}", log)

    def restart(self, timeout: float = START_TIMEOUT_S) -> RedisServer:
        """Stop (if running) and start again on the same port (the data is gone: no persistence)."""
        self.stop()
        return self.start(timeout)

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)  # type: ignore[arg-type]

    def __enter__(self) -> RedisServer:
        return self.start()


def start_server(directory: Path, attempts: int = 3) -> RedisServer:
    """Start a single node, on a new port for each try whose port was taken (PortTaken)."""
    last: Exception | None = None
    for i in range(attempts):
        server = RedisServer(directory / f"try{i}")
        try:
            return server.start()
        except PortTaken as e:
            last = e
    raise RuntimeError(f"could not start redis-server after {attempts} attempts") from last


class RedisClusterServers:
    """A 3-primary Redis Cluster (no replicas) on loopback; ``url`` is ``redis+cluster://...``. A
    start that lost a port to another socket starts over on new ports (``attempts`` in all)."""

    def __init__(self, directory: Path, size: int = 3, attempts: int = 3) -> None:
        self.directory = Path(directory)
        self.size = size
        self.attempts = attempts
        self._tries = 0
        self.nodes = self._new_nodes()

    def _new_nodes(self) -> list[RedisServer]:
        base = self.directory / f"try{self._tries}" if self._tries else self.directory
        self._tries += 1
        return [RedisServer(base / f"node{i}", cluster=True) for i in range(self.size)]

    @property
    def url(self) -> str:
        return f"redis+cluster://{self.nodes[0].address}"

    def start(self, timeout: float = 30.0) -> RedisClusterServers:
        while True:
            try:
                return self._start(timeout)
            except PortTaken:
                if self._tries >= self.attempts:
                    raise
                self.nodes = self._new_nodes()

    def _start(self, timeout: float) -> RedisClusterServers:
        try:
            for node in self.nodes:
                node.start()
            cli = self.nodes[0].cli_bin
            addresses = [n.address for n in self.nodes]
            created = subprocess.run(
                [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            if created.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{created.stdout}\n{created.stderr}")
            self.wait_ok(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ok(self, timeout: float) -> None:
        """Wait until every node says cluster_state:ok and knows all the others."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self._node_ok(n) for n in self.nodes):
                return
            time.sleep(0.05)
        raise RuntimeError("cluster did not reach cluster_state:ok")

    def _node_ok(self, node: RedisServer) -> bool:
        client = node.client(socket_timeout=1.0)
        try:
            info = client.execute_command("CLUSTER INFO")
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()
        if isinstance(info, bytes):  # raw text when the client does not parse the reply
            info = dict(line.split(":", 1) for line in info.decode().split() if ":" in line)
        return str(info.get("cluster_state")) == "ok" and int(info.get("cluster_known_nodes", 0)) == len(
            self.nodes
        )

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisClusterServers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------- memcached

MEMCACHED_INSTALL_HINT = "memcached not found on PATH: run scripts/test.sh, which installs the Debian package"


def memcached_binary() -> str:
    """The path of ``memcached``; FileNotFoundError with an install hint if missing."""
    path = shutil.which("memcached")
    if path is None:
        raise FileNotFoundError(MEMCACHED_INSTALL_HINT)
    return path


def _memcached_answers(port: int, timeout: float = 0.2) -> bool:
    from pymemcache.client.base import Client

    client = Client(("127.0.0.1", port), connect_timeout=timeout, timeout=timeout)
    try:
        return bool(client.version())
    except Exception:  # refused, reset, timed out, or a half-started server's garbage
        return False
    finally:
        client.close()


class MemcachedServer(_ServerProcess):
    """One memcached on 127.0.0.1 (no UDP). ``stop()``/``kill()`` then ``start()`` reuses the port (the
    data is gone); ``pause()``/``resume()`` freeze it (SIGSTOP/SIGCONT), as a hung host would be."""

    def __init__(self, port: int | None = None, item_size: int = 1 << 20, memory_mb: int = 64) -> None:
        self.binary = memcached_binary()
        super().__init__(port)
        self.item_size = item_size
        self.memory_mb = memory_mb

    @property
    def url(self) -> str:
        return f"memcached://{self.address}"

    def _argv(self) -> list[str]:
        argv = [
            self.binary,
            "-l", "127.0.0.1",
            "-p", str(self.port),
            "-U", "0",
            "-m", str(self.memory_mb),
            "-I", str(self.item_size),
            "-t", "2",
        ]  # fmt: skip
        if self.item_size < 1 << 20:  # memcached's slab chunk (512 KiB) must not exceed -I
            argv += ["-o", f"slab_chunk_max={self.item_size // 2}"]
        if os.geteuid() == 0:  # memcached refuses to run as root without naming a user
            argv += ["-u", "root"]
        return argv

    def start(self, timeout: float = START_TIMEOUT_S) -> MemcachedServer:
        """Start the process and wait until ``version`` answers; RuntimeError with its stderr if not."""
        if self.running:
            return self
        if self._spawn(self._argv(), _memcached_answers, timeout, stderr=subprocess.PIPE):
            return self
        err = b""
        if self.proc is not None and self.proc.poll() is not None and self.proc.stderr is not None:
            err = self.proc.stderr.read()[-2000:]
        self.stop()
        raise self._not_started(f"memcached on port {self.port}", err.decode(errors="replace"))

    def _answering_pid(self) -> int:
        client = self.client()
        try:
            return int(client.stats()[b"pid"])
        finally:
            client.close()

    def client(self) -> Any:
        """A plain pymemcache client of this server (replies awaited), for checks from outside kvtier."""
        from pymemcache.client.base import Client

        return Client(("127.0.0.1", self.port), default_noreply=False, timeout=2.0)

    def __enter__(self) -> MemcachedServer:
        return self.start()


def start_memcached(item_size: int = 1 << 20, memory_mb: int = 64, attempts: int = 3) -> MemcachedServer:
    """Start one, on a new port for each try whose port was taken (PortTaken)."""
    last: Exception | None = None
    for _ in range(attempts):
        server = MemcachedServer(item_size=item_size, memory_mb=memory_mb)
        try:
            return server.start()
        except PortTaken as e:
            last = e
    raise RuntimeError(f"could not start memcached after {attempts} attempts") from last
