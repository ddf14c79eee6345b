"""Messages sent on a non-blocking socket (the loop worker's links) when they exceed its buffer."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from serving.ipc import protocol
from serving.ipc.protocol import FrameReader, recv_message, send_message


def _pair(buffer: int = 65536) -> tuple[socket.socket, socket.socket]:
    sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
    sender.setblocking(False)
    return sender, receiver


def test_a_message_many_times_the_buffer_arrives_whole_while_the_peer_reads_slowly():
    sender, receiver = _pair()
    data = np.random.default_rng(0).integers(0, 255, 3_000_000, dtype=np.uint8)
    got = []

    def read_slowly():
        time.sleep(0.2)  # the sender finds the buffer full and waits for room
        got.append(recv_message(receiver, FrameReader()))

    reader = threading.Thread(target=read_slowly)
    reader.start()
    with sender, receiver:
        send_message(sender, {"op": "x"}, [data, data[:5]])
        reader.join(10)
    header, buffers = got[0]
    assert header == {"op": "x"}
    assert bytes(buffers[0]) == data.tobytes() and bytes(buffers[1]) == data[:5].tobytes()


def test_a_peer_that_takes_nothing_more_times_the_send_out(monkeypatch):
    monkeypatch.setattr(protocol, "SEND_WAIT_S", 0.2)
    sender, receiver = _pair()
    with sender, receiver, pytest.raises(TimeoutError, match="takes no more"):
        send_message(sender, {"op": "x"}, [b"\0" * 3_000_000])
