"""A host connection's owed replies (``serving.ipc.server._Link``): a reply being sent never
holds up the connection's next message, and a close waits for every owed reply."""

from __future__ import annotations

import threading

from serving.ipc.server import _Link


class _Sock:
    """A socket whose ``sendmsg`` waits for ``go`` (a send the kernel has not finished)."""

    def __init__(self):
        self.go = threading.Event()
        self.sending = threading.Event()
        self.sent: list[bytes] = []
        self.closed = False

    def sendmsg(self, parts, ancillary=()):
        self.sending.set()
        assert self.go.wait(10)
        data = b"".join(bytes(p) for p in parts)
        self.sent.append(data)
        return len(data)

    def close(self):
        self.closed = True


def _deliver_in_thread(link: _Link) -> threading.Thread:
    thread = threading.Thread(target=link.deliver, args=(({"ok": True}, []),))
    thread.start()
    assert link.sock.sending.wait(5)
    return thread


def test_the_next_message_is_taken_while_the_last_reply_is_still_being_sent():
    sock = _Sock()
    link = _Link(sock)
    link.hold()
    sender = _deliver_in_thread(link)
    taken = threading.Thread(target=link.hold)  # the reader, with the frontend's next message
    taken.start()
    taken.join(2)  # the send is still blocked: only a hold that does not wait for it returns
    held = not taken.is_alive()
    sock.go.set()
    sender.join(5)
    taken.join(5)
    assert held, "the reader waited for another thread's send"
    assert len(sock.sent) == 1 and not sock.closed


def test_a_close_during_a_send_closes_the_socket_once_the_send_is_done():
    sock = _Sock()
    link = _Link(sock)
    link.hold()
    sender = _deliver_in_thread(link)
    link.close()
    assert not sock.closed  # the reply is still going out
    sock.go.set()
    sender.join(5)
    assert len(sock.sent) == 1 and sock.closed


def test_a_close_waits_for_every_owed_reply_and_sends_none_after_it():
    sock = _Sock()
    link = _Link(sock)
    link.hold()
    sender = _deliver_in_thread(link)
    link.hold()  # the next message came while the first reply was being sent
    link.close()
    sock.go.set()
    sender.join(5)
    assert len(sock.sent) == 1 and not sock.closed  # the second reply is still owed
    link.deliver(({"ok": True}, []))
    assert len(sock.sent) == 1 and sock.closed  # closing: dropped, and the socket goes


def test_a_link_with_nothing_owed_closes_at_once():
    sock = _Sock()
    link = _Link(sock)
    link.hold()
    sock.go.set()
    link.deliver(({"ok": True}, []))
    assert not sock.closed
    link.close()
    assert sock.closed
