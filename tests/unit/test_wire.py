"""The frame codec: framing, limits and fd accounting, without sockets."""

from __future__ import annotations

import os
import struct

import pytest

from membroker import wire
from membroker.errors import ProtocolError
from membroker.v1 import session_pb2 as spb


def _fd() -> int:
    return os.memfd_create("t", os.MFD_CLOEXEC)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_frames_split_and_glued_decode_in_order():
    a = wire.encode(spb.Frame(ping=spb.Ping(nonce=1)))
    b = wire.encode(spb.Frame(revoke_ack=spb.RevokeAck(space_id="sp-1", seq=9)))
    d = wire.FrameDecoder()
    stream = a + b
    got = []
    for i in range(0, len(stream), 3):
        got += d.feed(stream[i : i + 3], [])
    assert [(f.WhichOneof("body"), fds) for f, fds in got] == [("ping", []), ("revoke_ack", [])]
    assert got[1][0].revoke_ack.seq == 9 and d.pending_bytes == 0


def test_fd_goes_to_the_frame_that_expects_it_even_when_glued_after_another():
    fd = _fd()
    d = wire.FrameDecoder()
    data = wire.encode(spb.Frame(ping=spb.Ping(nonce=1))) + wire.encode(
        spb.Frame(fd_offer=spb.FdOffer(tag=4))
    )
    frames = d.feed(data, [fd])
    assert [(f.WhichOneof("body"), fds) for f, fds in frames] == [("ping", []), ("fd_offer", [fd])]
    os.close(fd)


def test_fd_arriving_with_a_partial_frame_waits_for_it():
    fd = _fd()
    d = wire.FrameDecoder()
    data = wire.encode(spb.Frame(fd_offer=spb.FdOffer(tag=4)))
    assert d.feed(data[:2], [fd]) == []
    assert d.feed(data[2:], []) == [(spb.Frame(fd_offer=spb.FdOffer(tag=4)), [fd])]
    os.close(fd)


@pytest.mark.parametrize(
    ("data", "nfds", "message"),
    [
        (struct.pack("<I", wire.DEFAULT_MAX_FRAME + 1), 0, "exceeds the limit"),
        (struct.pack("<I", 2) + b"\xff\xff", 0, "undecodable"),
        (struct.pack("<I", 0), 0, "no known body"),
        (wire.encode(spb.Frame(ping=spb.Ping(nonce=1))), 1, "unexpected fd"),
        (wire.encode(spb.Frame(fd_delivery=spb.FdDelivery(tag=1))), 0, "needs 1 fd"),
        (b"\x01", wire.MAX_PENDING_FDS + 1, "fds pending"),
    ],
)
def test_protocol_errors_close_every_fd(data, nfds, message):
    fds = [_fd() for _ in range(nfds)]
    d = wire.FrameDecoder()
    with pytest.raises(ProtocolError, match=message):
        d.feed(data, fds)
    d.close()
    assert not any(_is_open(fd) for fd in fds)
