"""A TCP forwarder: what a Service in front of a server outside the cluster gives a pod, for
servers that listen only on a unix socket or on the loopback (the embedded Postgres)."""

from __future__ import annotations

import socket
import socketserver
import threading


class Forwarder(socketserver.ThreadingTCPServer):
    """Accepts on (`host`, `port`) and pipes each connection to `target`: a unix socket path, or a
    (host, port). Runs in a daemon thread from `start()` until `stop()`."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, port: int, target: str | tuple[str, int]) -> None:
        self.target = target
        super().__init__((host, port), _Pipe)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> Forwarder:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def connect(self) -> socket.socket:
        if isinstance(self.target, str):
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(self.target)
            return upstream
        return socket.create_connection(self.target)


class _Pipe(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server = self.server
        assert isinstance(server, Forwarder)
        with server.connect() as upstream:
            other = threading.Thread(target=_pump, args=(upstream, self.request), daemon=True)
            other.start()
            _pump(self.request, upstream)
            other.join()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for end in (source, sink):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
