"""The ``loop`` frontend worker: one thread and one epoll answer ``POST /invocations`` end to end.

On a GPU host the frontends' CPU per request decides how many images/s reach the device, and a
gunicorn gevent or gthread worker spends most of it on its own machinery: an HTTP parser that
reads 8 KiB at a time into a request object and a WSGI environ, a response object writing the
head and body in separate sends, greenlet or thread switches around every blocking call (the
gevent worker's profile: gunicorn ~45%, switching and socket wrappers most of the rest).

This worker keeps gunicorn as the process manager (master, signals, heartbeat, graceful
restarts) and answers the common request itself, as a state machine per connection:

1. read the head; if it is ``POST /invocations`` with a Content-Length within the limit, plain
   headers (serving.http.wire) and a model description at hand, read the body straight into
   one buffer of its length;
2. decode and build the host message (``Invocations.prepare``, the same code as the WSGI path);
   at the end of the loop's turn send it, with the others that may go with it as one call
   (serving.http.gather), on an idle link to the least busy host, and put the link's socket in
   the same epoll;
3. when the answer is whole, encode each request's rows (``Prepared.finish``) and send head and
   body in one ``sendmsg``; a request whose deadline passes first is answered 504 (the link is
   closed once no request is left in its call).

Every other request, and every request whose head the fast path does not read (chunked,
``Expect``, odd headers, no model description yet, other routes, parse errors), goes to a small
thread pool where gunicorn's own parser and the Flask app answer it exactly as the gthread worker
would; the connection comes back to the loop after each answer it keeps alive.
"""

from __future__ import annotations

import collections
import errno
import heapq
import logging
import os
import select
import socket
import time
from concurrent.futures import ThreadPoolExecutor

from gunicorn import http, util
from gunicorn.http import wsgi
from gunicorn.workers.base import Worker

from serving.errors import DeadlineExceeded, NotFound, NotReady
from serving.http.connection import IN, Call, Connection
from serving.http.gather import Member, take_groups
from serving.http.timings import Timings
from serving.metrics.process import ProcessSampler
from serving.metrics.tally import Tally

log = logging.getLogger("onebox.http")

_RECV = 256 * 1024
_TICK_S = 1.0  # heartbeat, parent check, idle connections


class LoopWorker(Worker):
    """A gunicorn worker class: ``worker_class = "serving.http.loop.LoopWorker"``."""

    publishes_metrics = True  # on its own loop, once a second (serving.http.server)

    def run(self) -> None:
        # onebox's app answers invocations on the loop; any other WSGI app only through the pool
        invocations = getattr(self.wsgi, "extensions", {}).get("onebox.invocations")
        self.invocations = invocations
        self.router = invocations.router if invocations is not None else None
        self.limit = invocations.settings.max_payload_bytes if invocations is not None else None
        self.keepalive = self.cfg.keepalive or 0
        self.ep = select.epoll()
        self.handlers: dict[int, object] = {}
        self.timers: list = []  # (deadline, sequence, member): a request's own deadline
        self.waiting: list[Member] = []  # requests to send at the end of this turn (or later)
        settings = invocations.settings if invocations is not None else None
        self.gather = settings is not None and settings.frontend_gather
        self.models = settings is not None and settings.multi_model  # /models/<name>/invoke here too
        self.max_calls = settings.frontend_max_calls if settings is not None else 0
        self.timings = Timings(settings.frontend_timings if settings is not None else None)
        # invocations counted on this thread without a lock, published on the tick; the pool's
        # (Flask's) are posted here (serving.metrics.tally)
        self.tally = Tally(invocations.tally.emf if invocations is not None else None)
        self.sampler = ProcessSampler("frontend")
        if invocations is not None:
            invocations.tally, invocations.tally_on_loop = self.tally, True
            invocations.record = self._record_posted
        # this loop's calls in flight per host (the pool's are not: their answers do not wake it)
        self.calls = dict.fromkeys(self.router.clients, 0) if self.router is not None else {}
        self.sequence = 0
        self.slow = 0  # connections with the pool (counted and uncounted on this thread)
        self.posted: collections.deque = collections.deque()  # callables from the pool's threads
        self.refreshing: set[str] = set()  # models whose description a pool thread is fetching
        self.pool = ThreadPoolExecutor(max(self.cfg.threads, 1), thread_name_prefix="onebox-http")
        for listener in self.sockets:
            listener.setblocking(False)
            self._watch(listener.fileno(), _Listener(self, listener), IN | select.EPOLLEXCLUSIVE)
        self._watch(self.PIPE[0], _Wake(self), IN)  # signals, and the pool's posts
        try:
            self._serve()
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def _serve(self) -> None:
        next_tick = 0.0
        while self.alive or self._busy():
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + _TICK_S
                self._tick(now)
                if self.ppid != os.getppid():
                    self.log.info("Parent changed, shutting down: %s", self)
                    return
            timeout = min(next_tick - now, self._next_deadline() - time.time())
            for fd, events in self.ep.poll(max(timeout, 0.0)):
                handler = self.handlers.get(fd)
                if handler is not None:
                    handler.event(events)
            if self.waiting:
                self.flush()
            self._expire(time.time())

    def _tick(self, now: float) -> None:
        self.notify()
        self.timings.dump()
        self.tally.flush()
        self.sampler.sample()
        if not self.alive:
            self._stop_listening()
        for handler in list(self.handlers.values()):
            if isinstance(handler, Connection) and handler.idle(now, self.keepalive if self.alive else 0):
                handler.close()

    def _busy(self) -> bool:
        """Requests still being answered while the worker winds down (gunicorn's graceful timeout
        ends it otherwise)."""
        if self.slow:
            return True
        return any(isinstance(h, Connection) and not h.waiting_for_request() for h in self.handlers.values())

    def _stop_listening(self) -> None:
        for listener in self.sockets:
            if self.handlers.pop(listener.fileno(), None) is not None:
                self.ep.unregister(listener.fileno())

    # -- registration, timers, posts -----------------------------------------------------
    def _watch(self, fd: int, handler: object, events: int) -> None:
        self.handlers[fd] = handler
        self.ep.register(fd, events)

    def unwatch(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            self.ep.unregister(fd)

    def _next_deadline(self) -> float:
        while self.timers and self.timers[0][2].done:
            heapq.heappop(self.timers)  # answered already
        return self.timers[0][0] if self.timers else float("inf")

    def _expire(self, now: float) -> None:
        while self.timers and self.timers[0][0] <= now:
            member = heapq.heappop(self.timers)[2]
            if member.done:
                continue
            answer = self.invocations.failed(DeadlineExceeded(
                f"no answer from the model within the deadline ({member.timeout:.1f}s)"
            ))  # fmt: skip
            if member.call is not None and member.call.link is not None:
                member.call.expire(member, answer)
            else:  # still waiting in this worker (flush passes it over now)
                member.done = True
                member.conn.respond(*answer)

    def _record_posted(self, model: str, status: int, seconds: float, model_seconds: float | None) -> None:
        self.post(self.tally.record, model, status, seconds, model_seconds)

    def post(self, fn, *args) -> None:
        """Run ``fn(*args)`` on the loop's thread (from any thread)."""
        self.posted.append((fn, args))
        try:
            os.write(self.PIPE[1], b".")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already

    # -- the fast path -------------------------------------------------------------------
    def start(self, conn: Connection, environ: dict, info: dict, body: bytearray, model: str | None) -> None:
        """Decode a read request for ``model`` (None: the single model) and queue it for a host
        (sent at the end of this turn of the loop, with the others it can go with), or answer
        its error."""
        inv = self.invocations
        read_at = conn.started
        if conn.answered_at:
            self.timings.turned(read_at - conn.answered_at)
        try:
            deadline = inv.deadline(environ)
            prepared = inv.prepare(environ, body, info, deadline, model)
        except Exception as err:  # every failure becomes an answer
            conn.respond(*inv.failed(err))
            return
        member = Member(conn, prepared, deadline, info if self.gather else None)
        member.read_at = read_at
        self.sequence += 1
        heapq.heappush(self.timers, (deadline, self.sequence, member))
        if member.key is None:
            self.send(Call(self, [member]))
        else:
            self.waiting.append(member)

    def flush(self) -> None:
        """Send the waiting requests, gathered into calls, while a host has room for a call."""
        groups = take_groups(self.waiting)
        self.waiting = []
        for i, group in enumerate(groups):
            if self.max_calls and min(self.calls.values()) >= self.max_calls:
                # every host has that many of this loop's calls: wait for one to come back
                self.waiting = [m for g in groups[i:] for m in g]
                return
            self.send(Call(self, group))

    def send(self, call: Call, exclude=None) -> None:
        """Send ``call`` on an idle link to the least busy host (once more on another if it
        cannot be reached)."""
        client = self.router.pick(exclude)
        try:
            link = client.acquire()
        except NotReady as err:
            self.unsent(call, client, err)
            return
        client.started()
        header, buffers = call.message()
        try:
            # "sent": the host counts the time a call takes to reach it (serving.http.timings)
            link.send({**header, "deadline": call.deadline, "sent": time.time()}, buffers)
        except (ConnectionError, OSError) as exc:
            link.close()
            client.finished()
            if link.used:
                # the host went away since this link's last call (restarted): its other idle
                # links are as dead, and nothing of this call reached it, so it goes on a new one
                client.forget_idle()
                self.send(call, exclude)
                return
            self.unsent(call, client, NotReady(f"the model host is not reachable ({exc.__class__.__name__})"))
            return
        call.client, call.link = client, link
        call.went()
        call.sent_at = time.perf_counter()
        self.calls[client] += 1
        self._watch(link.sock.fileno(), call, IN)

    def unsent(self, call: Call, client, err: NotReady) -> None:
        if not call.retried and self.router.may_fail_over(err):
            call.retried = True
            self.send(call, exclude=client)
            return
        answer = self.invocations.failed(err)
        for member in call.members:
            if not member.done:
                member.done = True
                member.conn.respond(*answer)

    def refresh(self, model: str) -> None:
        """Fetch ``model``'s description again on the pool, once at a time, while requests go on
        with the one at hand. Before this, every request of a worker whose description had
        expired went through the pool, each its own host call, until one of them fetched it:
        a burst of one-row calls at the host every two seconds from every worker."""
        if model not in self.refreshing:
            self.refreshing.add(model)
            self.pool.submit(self._refresh, model)

    def _refresh(self, model: str) -> None:
        try:
            self.router.describe(model, time.time() + self.invocations.settings.timeout_s)
        except NotFound:  # unloaded: requests go the slow way, which answers 404 (or finds it loaded again)
            self.post(self.router.forget, model)
        except Exception as err:  # the next request past the stale limit goes the slow way and says why
            self.log.debug("describing %r failed: %s", model, err)
        finally:
            self.post(self.refreshing.discard, model)

    # -- the slow path: gunicorn's parser and the Flask app, on the pool -------------------
    def hand_off(self, conn: Connection, data: bytes) -> None:
        """Give the connection, with the bytes read so far, to a pool thread."""
        conn.forget()
        conn.sock.setblocking(True)
        self.slow += 1
        self.pool.submit(self._serve_slow, conn.sock, conn.addr, conn.listener, data)

    def _slow_done(
        self, sock: socket.socket | None = None, addr=None, listener=None, rest: bytes = b""
    ) -> None:
        """A pool thread is done with a connection: it closed it, or gives ``sock`` back."""
        self.slow -= 1
        if sock is not None:
            self.adopt(sock, addr, listener, rest)

    def adopt(self, sock: socket.socket, addr, listener, data: bytes) -> None:
        """Take a connection (back) into the loop, with bytes already read from it."""
        if not self.alive:
            util.close(sock)
            return
        sock.setblocking(False)
        conn = Connection(self, sock, addr, listener)
        self._watch(sock.fileno(), conn, IN)
        if data:
            conn.buf += data
            conn.read_head()

    def _serve_slow(self, sock: socket.socket, addr, listener, data: bytes) -> None:
        req = None
        try:
            sock.settimeout(self.keepalive or None)
            parser = http.RequestParser(self.cfg, sock, addr)
            parser.unreader.unread(data)
            req = next(parser)
            if self._handle_slow(listener, req, sock, addr) and _finish_body(parser, req):
                rest = parser.unreader.buf.getvalue()
                self.post(self._slow_done, sock, addr, listener, rest)
                return
        except (StopIteration, http.errors.NoMoreData, TimeoutError):
            pass  # the client is done, went away, or went quiet
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                self.log.exception("Socket error processing request.")
        except BaseException as exc:
            self.handle_error(req, sock, addr, exc)
        util.close(sock)
        self.post(self._slow_done)

    def _handle_slow(self, listener, req, sock, addr) -> bool:
        """Answer one request through the WSGI app; whether the connection stays open."""
        environ, resp = {}, None
        try:
            self.cfg.pre_request(self, req)
            resp, environ = wsgi.create(req, sock, addr, listener.getsockname(), self.cfg)
            respiter = self.wsgi(environ, resp.start_response)
            try:
                for item in respiter:
                    resp.write(item)
                resp.close()
            finally:
                if hasattr(respiter, "close"):
                    respiter.close()
        except OSError:
            raise
        except Exception:
            if resp is not None and resp.headers_sent:
                self.log.exception("Error handling request")
                return False
            raise
        finally:
            try:
                self.cfg.post_request(self, req, environ, resp)
            except Exception:
                self.log.exception("Exception in post_request hook")
        return self.alive and not resp.should_close()


def _finish_body(parser, req) -> bool:
    """Read what the app left of the request's body, so the next request starts clean."""
    finish = getattr(parser, "finish_body", None)
    if finish is not None:
        return finish()
    while req.body.read(_RECV):
        pass
    return True


class _Listener:
    __slots__ = ("worker", "sock")

    def __init__(self, worker: LoopWorker, sock):
        self.worker, self.sock = worker, sock

    def event(self, events: int) -> None:
        for _ in range(64):
            try:
                client, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EMFILE, errno.ENFILE):
                    return
                raise
            if client.family != socket.AF_UNIX:
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            util.close_on_exec(client)
            self.worker.adopt(client, addr, self.sock, b"")


class _Wake:
    __slots__ = ("worker",)

    def __init__(self, worker: LoopWorker):
        self.worker = worker

    def event(self, events: int) -> None:
        try:
            os.read(self.worker.PIPE[0], 4096)
        except BlockingIOError:
            pass
        posted = self.worker.posted
        while posted:
            fn, args = posted.popleft()
            fn(*args)
