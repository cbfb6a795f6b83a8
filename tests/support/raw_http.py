"""A client that writes raw bytes to a server and reads its HTTP/1.1 answers one by one: for
tests of what a server does with malformed, pipelined, slow or half-sent requests, which no
HTTP library will send."""

from __future__ import annotations

import dataclasses
import socket


@dataclasses.dataclass(frozen=True)
class RawResponse:
    status: int
    headers: dict[str, str]  # names lower-cased; a repeated name keeps its last value
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


class RawConnection:
    def __init__(self, port: int, *, timeout_s: float = 10) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
        self._file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_response(self, *, head_request: bool = False) -> RawResponse:
        """The next answer; ``head_request``: it answers a HEAD, so it has no body."""
        status_line = self._file.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        status = int(status_line.split(b" ", 2)[1])
        headers: dict[str, str] = {}
        while True:
            line = self._file.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if head_request or status < 200 or status in (204, 304):
            return RawResponse(status, headers, b"")
        if headers.get("transfer-encoding", "").lower() == "chunked":
            return RawResponse(status, headers, self._read_chunked())
        if "content-length" in headers:
            return RawResponse(status, headers, self._read_exactly(int(headers["content-length"])))
        return RawResponse(status, headers, self._file.read())  # ends at close

    def _read_exactly(self, length: int) -> bytes:
        data = self._file.read(length)
        if len(data) < length:
            raise ConnectionError(f"the body ended after {len(data)} of {length} bytes")
        return data

    def _read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            size = int(self._file.readline().split(b";")[0], 16)
            if size == 0:
                while self._file.readline() not in (b"\r\n", b""):
                    pass
                return bytes(body)
            body += self._read_exactly(size)
            self._file.readline()

    def closed_by_server(self) -> bool:
        """Whether the server has closed its side (reads end without data)."""
        try:
            return self._file.read(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self._file.close()
        self.sock.close()


def request_bytes(
    method: str, target: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: gateway.test"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body and not any(name.lower() == "content-length" for name in headers or {}):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
