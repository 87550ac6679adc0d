"""Private Redis servers for tests and benchmarks: free port, temp dir, nothing persisted, never 6379."""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(cluster_bus: bool = False) -> int:
    """A free loopback port; with ``cluster_bus`` also port + 10000 (Redis Cluster's bus) is free."""
    if not cluster_bus:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20000, 55000)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if not path:
        raise RuntimeError("redis-server is not on PATH (apt-get install redis-server)")
    return path


class RedisServer:
    """One ``redis-server`` on a free loopback port; ``stop()``/``start()`` keep the port (to test outages)."""

    def __init__(self, port: int | None = None, args: list[str] | None = None, password: str | None = None) -> None:
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="kvplug-redis-"))
        self.args = list(args or [])
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        cmd = [
            redis_server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.dir),
            *self.args,
        ]
        if self.password:
            cmd += ["--requirepass", self.password]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        client = redis.Redis(port=self.port, password=self.password, socket_timeout=0.5)
        while True:
            try:
                if client.ping():
                    client.close()
                    return self
            except redis.RedisError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()  # never leave a half-started server behind
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        """Kill the server (SIGKILL: an abrupt outage, as a crash would be)."""
        if self.proc and self.proc.poll() is None:
            self.resume()
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: the server keeps its connections open and answers nothing (a hung machine)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class RedisClusterServers:
    """``n`` cluster-enabled masters on free ports, joined with ``redis-cli --cluster create``."""

    def __init__(self, n: int = 3) -> None:
        # a cluster node also listens on port + 10000 (the cluster bus): pick ports where both are free
        self.nodes = [
            RedisServer(
                free_port(cluster_bus=True), args=["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]
            )
            for _ in range(n)
        ]
        for node in self.nodes:
            node.args += ["--cluster-config-file", str(node.dir / "nodes.conf")]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, timeout: float = 30.0) -> RedisClusterServers:
        try:
            self._start(timeout)
        except BaseException:
            self.close()  # a failed start leaves no server behind
            raise
        return self

    def _start(self, timeout: float) -> None:
        for node in self.nodes:
            node.start()
        cli = shutil.which("redis-cli")
        if not cli:
            raise RuntimeError("redis-cli is not on PATH")
        create = [cli, "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in self.nodes]]
        subprocess.run(
            [*create, "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # every node must agree, not only the first (a flaky start otherwise)
            states = [redis.Redis(port=n.port).cluster("info") for n in self.nodes]
            if all(isinstance(i, dict) and i.get("cluster_state") == "ok" for i in states):
                return
            time.sleep(0.1)
        raise RuntimeError("redis cluster did not reach state ok")

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def __enter__(self) -> RedisClusterServers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
