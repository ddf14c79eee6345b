"""One client connection and one host call of the ``loop`` worker (serving.http.loop).

A :class:`Connection` reads a head, reads its body straight into one buffer, waits while its
request is with a host, and writes the answer, head and body in one ``sendmsg`` (the rest when
the socket has room); pipelined requests wait in its buffer. A :class:`Call` is one message at a
host, with one request or several gathered ones: its link's socket sits in the worker's epoll
until the answer is whole.
"""

from __future__ import annotations

import select
import socket
import time
from typing import TYPE_CHECKING

from gunicorn import util

from serving.errors import NotReady
from serving.http.gather import Member, joined_message, split_reply
from serving.http.wire import HEAD_MAX, parse_head, response_head
from serving.ipc.protocol import ConnectionClosed

if TYPE_CHECKING:
    from serving.http.loop import LoopWorker

HEAD_RECV = 16 * 1024  # a head, with room for a whole small body
IN, OUT = select.EPOLLIN, select.EPOLLOUT
_GONE = select.EPOLLHUP | select.EPOLLERR


class Connection:
    """One client connection in the loop: reading a head, reading a body, waiting, writing."""

    __slots__ = ("worker", "sock", "fd", "addr", "listener", "buf", "head", "info", "body", "got", "out",
                 "in_flight", "close_after", "paused", "closed", "active", "answered_at", "started",
                 "host_s")  # fmt: skip

    def __init__(self, worker: LoopWorker, sock: socket.socket, addr, listener):
        self.worker, self.sock, self.fd, self.addr, self.listener = (
            worker,
            sock,
            sock.fileno(),
            addr,
            listener,
        )
        self.buf = bytearray()  # bytes read past the current request (a head, pipelined requests)
        self.head = None  # the request being read or answered (serving.http.wire.Head)
        self.info: dict | None = None  # the model's description when its head was read
        self.body: bytearray | None = None
        self.got = 0
        self.out: memoryview | None = None  # what the socket has not taken of an answer yet
        self.in_flight = False  # the request is with a host
        self.close_after = False  # the answer being written is the connection's last
        self.paused = False  # not reading: pipelined requests piled up behind the current one
        self.closed = False
        self.active = time.monotonic()
        self.answered_at = 0.0  # perf_counter() at its last response (serving.http.timings)
        self.started = 0.0  # perf_counter() when the current request's body was whole
        self.host_s: float | None = None  # the current request's host call, once answered (metrics)

    def waiting_for_request(self) -> bool:
        return self.head is None and not self.buf and not self.out

    def idle(self, now: float, keepalive: float) -> bool:
        """Nothing going on for longer than ``keepalive`` (a half-sent request counts too)."""
        return not self.in_flight and not self.out and now - self.active > keepalive

    def event(self, events: int) -> None:
        if events & OUT:
            self._write()
        if events & (IN | _GONE) and not self.closed:
            self._read()

    def _read(self) -> None:
        self.active = time.monotonic()
        if self.body is not None and not self.in_flight:
            self._read_body()
            return
        try:
            # a head, and the start of its body: the rest goes straight into the body's buffer
            data = self.sock.recv(HEAD_RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()  # reset: the client is gone, a late answer for it is dropped
            return
        if not data:
            if self.in_flight or self.out:  # half-closed after its request: answer, then close
                self.close_after = True
                self.worker.ep.modify(self.fd, OUT if self.out else 0)
            else:
                self.close()
            return
        self.buf += data
        if self.head is None and not self.out:
            self.read_head()
        elif len(self.buf) > HEAD_MAX:  # pipelining faster than it is answered: wait
            self.paused = True
            self.worker.ep.modify(self.fd, OUT if self.out else 0)

    def _read_body(self) -> None:
        try:
            n = self.sock.recv_into(memoryview(self.body)[self.got :])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        if n == 0:
            self.close()
            return
        self.got += n
        if self.got == len(self.body):
            self._start()

    def read_head(self) -> None:
        """Parse a head from ``buf`` once it is whole; start the body or hand the request off."""
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > HEAD_MAX:
                self.worker.hand_off(self, bytes(self.buf))
            return
        worker = self.worker
        head = info = None
        if worker.invocations is not None:
            head = parse_head(bytes(self.buf[:end]), worker.models)
        if head is not None:
            model = head.model or worker.invocations.model
            info, stale = worker.router.usable(model)
            if stale:  # fetched again on the pool; this request and the next go on meanwhile
                worker.refresh(model)
        if head is None or info is None or (worker.limit is not None and head.length > worker.limit):
            worker.hand_off(self, bytes(self.buf))
            return
        start = end + 4
        have = min(len(self.buf) - start, head.length)
        self.head, self.info, self.body, self.got = head, info, bytearray(head.length), have
        self.body[:have] = memoryview(self.buf)[start : start + have]
        del self.buf[: start + have]
        if have == head.length:
            self._start()
        else:
            self._read_body()  # most of it has usually arrived with the head

    def _start(self) -> None:
        self.in_flight = True
        self.started = time.perf_counter()
        self.worker.start(self, self.head.environ, self.info, self.body, self.head.model)

    def respond(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        """Send an answer to the current request (dropped if the client is gone)."""
        self.in_flight = False
        self.answered_at = now = time.perf_counter()
        worker = self.worker
        worker.tally.record(
            self.head.model or worker.invocations.model, status, now - self.started, self.host_s
        )
        self.host_s = None
        if self.closed:
            return
        self.close_after = self.close_after or not (self.head.keep_alive and self.worker.alive)
        head = response_head(self.head.version, status, headers, not self.close_after)
        self.head = self.info = self.body = None
        try:
            sent = self.sock.sendmsg([head, body])
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close()
            return
        if sent < len(head) + len(body):  # rare: a slow reader or a large answer
            self.out = memoryview(head + body)[sent:]
            self.worker.ep.modify(self.fd, OUT if self.paused else IN | OUT)
            return
        self._answered()

    def _write(self) -> None:
        try:
            sent = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        self.active = time.monotonic()
        self.out = self.out[sent:]
        if self.out.nbytes == 0:
            self.out = None
            self.worker.ep.modify(self.fd, 0 if self.paused else IN)
            self._answered()

    def _answered(self) -> None:
        if self.close_after:
            self.close()
            return
        if self.paused:
            self.paused = False
            self.worker.ep.modify(self.fd, IN)
        if self.buf:
            self.read_head()  # a pipelined request

    def forget(self) -> None:
        """Leave the loop without closing (the socket goes elsewhere)."""
        self.worker.unwatch(self.fd)
        self.closed = True

    def close(self) -> None:
        if not self.closed:
            self.forget()
            util.close(self.sock)


class Call:
    """One message at a host, with one request or several gathered ones (serving.http.gather):
    its link's socket is in the epoll until the answer is whole."""

    __slots__ = ("worker", "members", "deadline", "client", "link", "retried", "sent_at")

    def __init__(self, worker: LoopWorker, members: list[Member]):
        self.worker, self.members = worker, members
        self.deadline = max(m.deadline for m in members)  # the host's; each member has its own timer
        self.client = self.link = None
        self.retried = False
        self.sent_at = 0.0  # perf_counter() when it went to a host (serving.http.timings)

    def message(self) -> tuple[dict, list]:
        """The header and buffers to send."""
        return joined_message(self.members)

    def event(self, events: int) -> None:
        try:
            message = self.link.receive()
        except (BlockingIOError, InterruptedError):
            return
        except (ConnectionClosed, ConnectionError, OSError) as exc:
            client = self.client
            self.end(broken=True)
            self.worker.unsent(
                self, client, NotReady(f"the model host is not reachable ({exc.__class__.__name__})")
            )
            return
        if message is None:
            return
        answered_at = time.perf_counter()
        replied = message[0].get("replied")
        back = time.time() - replied if isinstance(replied, float) else 0.0
        self.end(broken=False)
        failed = self.worker.invocations.failed
        timings = self.worker.timings
        try:
            shares = split_reply(*message, self.members)
        except Exception as err:  # a malformed answer fails every request in the call
            shares, broken = None, failed(err)
        for i, member in enumerate(self.members):
            if member.done:
                continue
            member.done = True
            if member.conn.closed:
                continue
            if shares is None:
                answer = broken
            else:
                try:
                    answer = member.prepared.finish(*shares[i])
                except Exception as err:  # every failure becomes an answer
                    answer = failed(err)
            member.conn.host_s = answered_at - self.sent_at
            member.conn.respond(*answer)
            timings.answered(member.read_at, self.sent_at, answered_at, member.conn.answered_at, back)

    def expire(self, member: Member, answer: tuple) -> None:
        """``member``'s deadline passed: answer it ``answer``; the link goes once no member is left."""
        member.done = True
        member.conn.respond(*answer)
        if self.link is not None and all(m.done for m in self.members):
            self.end(broken=True)

    def went(self) -> None:
        """The call is at a host: its members' deadlines now end it (``expire``)."""
        for member in self.members:
            member.call = self

    def end(self, broken: bool) -> None:
        """Take the link out of the epoll and give it back (or close it, when ``broken``).

        The members forget the call: a member and its call referring to each other would be a
        cycle, and their bodies would wait for the garbage collector instead of going as soon
        as they are answered (a retried call is ``went`` again)."""
        for member in self.members:
            member.call = None
        link, self.link = self.link, None
        self.worker.unwatch(link.sock.fileno())
        self.worker.calls[self.client] -= 1
        self.client.finished()
        if broken:
            link.close()
        else:
            self.client.release(link)
