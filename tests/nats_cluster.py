"""Three real nats-servers in one JetStream cluster on loopback, for tests that lose a node.

Each node has its own client port, route port and store; `kill9(name)` ends one with SIGKILL
(a crash: no flush, no goodbye to its peers) and `restart(name)` brings it back on the same
ports and store. `wait_ready()` returns once the meta group has a leader (JetStream in a
cluster answers nothing before).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nats.errors
import nats.js.errors

from shared.nats_server import nats_server_binary

CLUSTER_NAME = "mindx-test"


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on loopback now (bound together, so no two are the same)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Node:
    name: str
    port: int
    cluster_port: int
    store: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def route(self) -> str:
        return f"nats://127.0.0.1:{self.cluster_port}"


@dataclass
class NatsCluster:
    root: Path
    nodes: list[Node] = field(default_factory=list)

    @classmethod
    def create(cls, root: Path, size: int = 3) -> NatsCluster:
        ports = free_ports(2 * size)
        nodes = [
            Node(
                name=f"n{i + 1}",
                port=ports[2 * i],
                cluster_port=ports[2 * i + 1],
                store=root / f"n{i + 1}" / "store",
                log=root / f"n{i + 1}" / "server.log",
            )
            for i in range(size)
        ]
        return cls(root, nodes)

    @property
    def urls(self) -> str:
        """Every node's client URL, comma-separated (what `--nats` takes)."""
        return ",".join(n.url for n in self.nodes)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def start(self, node: Node) -> None:
        node.store.mkdir(parents=True, exist_ok=True)
        routes = ",".join(n.route for n in self.nodes if n is not node)
        argv = [
            nats_server_binary(),
            "-js",
            "-n", node.name,
            "-a", "127.0.0.1",
            "-p", str(node.port),
            "-sd", str(node.store),
            "--cluster_name", CLUSTER_NAME,
            "--cluster", node.route,
            "--routes", routes,
            "-l", str(node.log),
        ]  # fmt: skip
        node.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def start_all(self) -> None:
        for node in self.nodes:
            self.start(node)

    def kill9(self, name: str) -> None:
        """SIGKILL the node `name` and reap it."""
        node = self.node(name)
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait()
        node.proc = None

    def restart(self, name: str) -> None:
        self.start(self.node(name))

    def stop_all(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.terminate()
        for node in self.nodes:
            if node.proc is not None:
                try:
                    node.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait()
                node.proc = None

    def alive(self) -> list[Node]:
        return [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]

    async def wait_ready(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Until every running node accepts clients and JetStream answers on each (the meta
        group has a leader); RuntimeError with the nodes' log tails after `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: BaseException | None = None
        for node in self.alive():
            while True:
                try:
                    nc = await nats.connect(
                        node.url, connect_timeout=1, allow_reconnect=False, max_reconnect_attempts=0
                    )
                    try:
                        await nc.jetstream().account_info()
                    finally:
                        await nc.close()
                    break
                except (OSError, nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
                    last = exc
                if loop.time() >= deadline:
                    raise RuntimeError(
                        f"cluster not ready within {timeout:g}s ({node.name}: {last!r})\n"
                        + self.log_tails()
                    )
                await asyncio.sleep(0.1)

    def log_tails(self, lines: int = 15) -> str:
        out = []
        for n in self.nodes:
            with contextlib.suppress(OSError):
                tail = n.log.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {n.name} ---\n" + "\n".join(tail))
        return "\n".join(out)

    def __del__(self) -> None:  # no server outlives a test that failed oddly
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                with contextlib.suppress(OSError):
                    os.kill(node.proc.pid, signal.SIGKILL)
