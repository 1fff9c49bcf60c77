"""The wire format and the transport: round trips, zero copy, limits, malformed input."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import msgpack
import numpy as np
import pytest
import torch
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from pslm.errors import ProtocolError, RefusedError, RequestTimeout
from pslm.wire import auth, transport
from pslm.wire.frames import DTYPES, tensor_from_frames, tensor_to_frames
from pslm.wire.message import MAX_FRAME, MAX_HEADER, Message, decode, encode
from pslm.wire.transport import Channel, Listener, Poller, tcp_address


def _address_of(buf: object) -> int:
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)  # type: ignore[call-overload]


@pytest.mark.parametrize("dtype", list(DTYPES.values()))
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 5), (2, 3, 4)])
def test_round_trip_every_dtype_and_shape(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = (torch.arange(max(1, int(np.prod(shape))) * 3) % 97).to(dtype)[: int(np.prod(shape))]
    t = t.reshape(shape)
    msg = decode(encode(Message("x", id=5, body={"a": [1, "b"]}, tensors=[t, t + 1])))
    assert (msg.op, msg.id, msg.body) == ("x", 5, {"a": [1, "b"]})
    assert msg.tensors[0].dtype == dtype and msg.tensors[0].shape == t.shape
    assert torch.equal(msg.tensors[0], t) and torch.equal(msg.tensors[1], t + 1)


def test_send_is_zero_copy() -> None:
    t = torch.randn(1000)
    (frame,) = tensor_to_frames(t)
    assert _address_of(frame) == t.data_ptr()


def test_receive_is_zero_copy_over_a_real_socket() -> None:
    listener = Listener()
    channel = Channel(timeout=5.0)
    channel.connect("l", listener.address)
    t = torch.randn(4096)
    channel.send("l", Message("push", tensors=[t]))
    Poller(listener).poll(5.0)
    frames = listener.socket.recv_multipart(copy=False)
    msg = decode(frames[1:])
    assert torch.equal(msg.tensors[0], t)
    assert msg.tensors[0].data_ptr() == _address_of(frames[2].buffer)
    channel.close()
    listener.close()


def test_large_tensor_is_split_into_frames_of_at_most_16_mib() -> None:
    t = torch.randn(25 << 20)  # 100 MiB of fp32
    frames = encode(Message("push", tensors=[t]))
    sizes = [memoryview(f).nbytes for f in frames[1:]]
    assert len(sizes) == 7 and max(sizes) == MAX_FRAME and sum(sizes) == 100 << 20
    assert torch.equal(decode(frames).tensors[0], t)


def _header(**fields: object) -> bytes:
    base: dict[str, object] = {"v": 1, "op": "push", "id": 3, "body": {}, "t": []}
    base.update(fields)
    return msgpack.packb(base)


@pytest.mark.parametrize(
    "frames, fragment",
    [
        ([b"\xc1"], "msgpack"),
        ([msgpack.packb([1, 2])], "must be a map"),
        ([_header(v=2)], "version"),
        ([_header(v=True)], "version"),
        ([_header(v=1.0)], "version"),
        ([_header(body={b"worker": 1})], "keys must be strings"),
        ([_header(body={"a": [{"b": {b"deep": 1}}]})], "keys must be strings"),
        ([_header(id=-1)], "request id"),
        ([_header(op="")], "op must be"),
        ([_header(t=[["f64", [2]]]), b"x" * 16], "dtype"),
        ([_header(t=[[["f32"], [2]]]), b"x" * 8], "dtype"),
        ([_header(t=[[{}, [2]]]), b"x" * 8], "dtype"),
        ([_header(t=[["f32", [-1]]]), b""], "dimension"),
        ([_header(t=[["f32", [2]]])], "data frames"),
        ([_header(t=[["f32", [2]]]), b"x" * 7], "bytes"),
        ([_header(t=[["f32", [1 << 40]]]), b""], "limit"),
        # empty, but its other dimensions would overflow strides or allocate 64 GiB in a sum
        ([_header(t=[["f32", [0, 2**48, 2**48]]]), b""], "limit"),
        ([_header(t=[["f32", [0, 2**34]]]), b""], "limit"),
        ([msgpack.packb({"v": 1, "op": "x", "id": 1, "body": msgpack.ExtType(1, b"")})], "ext"),
    ],
)
def test_malformed_messages_are_refused(frames: list[bytes], fragment: str) -> None:
    with pytest.raises(ProtocolError, match=fragment):
        decode(frames)


@pytest.mark.parametrize(
    "frames",
    [
        [_header(id=42, t=[["f32", [2]]]), b"x"],
        [_header(id=42, v=2)],  # another version: answered, not left to time out
        [_header(id=42, body={b"k": 1})],
    ],
)
def test_refusal_keeps_the_request_id_when_the_header_is_readable(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    assert info.value.request_id == 42


def test_an_empty_tensor_with_small_dimensions_still_round_trips() -> None:
    t = torch.zeros(0, 3, 5)
    assert decode(encode(Message("x", tensors=[t]))).tensors[0].shape == (0, 3, 5)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=4))
def test_random_frames_raise_protocol_error_only(frames: list[bytes]) -> None:
    try:
        decode(frames)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["v", "op", "id", "body", "t", "x"]),
        st.one_of(
            st.integers(-5, 5),
            st.text(max_size=3),
            st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3),
            st.lists(
                st.lists(
                    st.one_of(st.text(max_size=4), st.lists(st.integers(-2, 4), max_size=3)),
                    max_size=3,
                ),
                max_size=3,
            ),
        ),
    ),
    st.lists(st.binary(max_size=32), max_size=3),
)
def test_random_headers_raise_protocol_error_only(header: dict, data: list[bytes]) -> None:
    try:
        decode([msgpack.packb(header), *data])
    except ProtocolError:
        pass


def test_request_without_reply_times_out_with_named_error() -> None:
    silent = Listener()  # receives, never answers
    channel = Channel(timeout=0.3)
    channel.connect("silent", silent.address)
    start = time.monotonic()
    with pytest.raises(RequestTimeout, match="silent"):
        channel.request("silent", Message("ping"))
    assert 0.3 <= time.monotonic() - start < 5.0
    channel.close()
    silent.close()


def test_error_reply_raises_refused_and_late_replies_are_dropped() -> None:
    listener = Listener()
    channel = Channel(timeout=5.0)
    channel.connect("peer", listener.address)
    rid = channel.send("peer", Message("ping"))
    Poller(listener).poll(5.0)
    peer, msg = listener.recv()
    listener.send(peer, Message("error", id=msg.id, body={"code": "bad", "message": "no way"}))
    with pytest.raises(RefusedError, match="no way") as info:
        channel.wait([rid])
    assert info.value.code == "bad"
    listener.send(peer, msg.reply())  # a late duplicate reply must not confuse the next request
    rid2 = channel.send("peer", Message("ping"))
    Poller(listener).poll(5.0)
    peer, msg2 = listener.recv()
    listener.send(peer, msg2.reply(n=2))
    assert channel.wait([rid2])[rid2].body == {"n": 2}
    channel.close()
    listener.close()


def test_oversized_frame_drops_the_connection_not_the_listener() -> None:
    listener = Listener()
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    # the listener may cut the connection while the message is still being written; the
    # rest of it then waits for a peer that keeps cutting it: give up instead of hanging
    raw.setsockopt(zmq.SNDTIMEO, 2000)
    raw.connect(listener.address)
    with contextlib.suppress(zmq.Again):
        raw.send_multipart([_header(t=[["u8", [MAX_FRAME + 1]]]), b"x" * (MAX_FRAME + 1)])
    assert Poller(listener).poll(0.5) == []  # refused by ZeroMQ before it reaches pslm
    raw.close()
    channel = Channel(timeout=5.0)
    channel.connect("l", listener.address)
    channel.send("l", Message("ping"))
    assert Poller(listener).poll(5.0)
    assert listener.recv()[1].op == "ping"
    channel.close()
    listener.close()


@pytest.mark.parametrize(
    "given, expected",
    [
        ("127.0.0.1:9000", "tcp://127.0.0.1:9000"),
        ("tcp://h:1", "tcp://h:1"),
        ("tcp://127.0.0.1:*", "tcp://127.0.0.1:*"),
    ],
)
def test_addresses(given: str, expected: str) -> None:
    assert tcp_address(given) == expected


@pytest.mark.parametrize("bad", ["nohost", "tcp://h:port", "udp://h:1", "h:99999"])
def test_bad_addresses(bad: str) -> None:
    with pytest.raises(ValueError):
        tcp_address(bad)


def test_on_reply_sees_each_reply_as_it_arrives() -> None:
    listener = Listener()
    channel = Channel(timeout=5.0)
    channel.connect("peer", listener.address)
    ids = [channel.send("peer", Message("pull")) for _ in range(3)]
    poller = Poller(listener)
    for _ in ids:
        poller.poll(5.0)
        peer, msg = listener.recv()
        listener.send(peer, msg.reply(n=msg.id))
    seen: list[tuple[int, object]] = []
    replies = channel.wait(ids, on_reply=lambda i, m: seen.append((i, m.body["n"])))
    assert sorted(seen) == [(i, i) for i in ids] and set(replies) == set(ids)
    channel.close()
    listener.close()


def test_a_hole_in_the_checks_still_answers_with_the_request_id() -> None:
    with pytest.raises(ProtocolError, match="dimension") as info:
        decode([_header(id=9, t=[["f32", [0, 2**63, 2]]]), b""])
    assert info.value.request_id == 9


def test_frames_at_odd_offsets_are_aligned() -> None:
    t = torch.arange(100, dtype=torch.float32)
    buf = bytearray(1) + bytearray(t.numpy().tobytes())
    out = tensor_from_frames([memoryview(buf)[1:]], "f32", [100])
    assert out.data_ptr() % 4 == 0 and torch.equal(out, t)


PEER = """
import sys, msgpack, zmq
s = zmq.Context().socket(zmq.DEALER)
s.connect(sys.argv[1])
s.send(msgpack.packb({"v": 1, "op": "hello", "id": 1, "body": {}, "t": []}))
while True:
    s.recv_multipart()
"""


def test_sent_is_done_once_zeromq_has_sent_the_frames() -> None:
    """``Listener.send(track=True)``: not done while a peer that reads nothing holds up a large
    message (its last frame is small: copied when sent, so the large one before it is what is
    watched), done as soon as the peer reads it."""
    security = auth.current()  # (a cluster started earlier in this process installs one)
    auth.install(None)  # the peer is plain pyzmq
    listener = Listener()
    peer = subprocess.Popen([sys.executable, "-c", PEER, listener.address])
    try:
        assert listener.socket.poll(30_000), "the peer did not say hello"
        identity, _ = listener.recv()
        os.kill(peer.pid, signal.SIGSTOP)  # reads nothing: 64 MiB cannot all leave
        big = torch.ones(16 << 20)
        msg = Message("ok", tensors=[big, torch.ones(3)])
        sent = listener.send(identity, msg, track=True)
        assert sent is not None and not sent.done
        assert not sent.wait(0.2)  # the peer is still stopped
        os.kill(peer.pid, signal.SIGCONT)
        assert sent.wait(30) and sent.done
        small = listener.send(identity, Message("ok", tensors=[torch.ones(3)]), track=True)
        assert small is not None and small.done  # copied when sent: nothing to wait for
    finally:
        os.kill(peer.pid, signal.SIGCONT)
        peer.kill()
        peer.wait()
        listener.close()
        auth.install(security)


def _answer_one(listener: Listener, **body: object) -> None:
    assert Poller(listener).poll(5.0)
    peer, msg = listener.recv()
    listener.send(peer, msg.reply(**body))


def test_waiting_for_an_id_named_twice_returns_its_reply() -> None:
    listener = Listener()
    channel = Channel(timeout=5.0)
    channel.connect("peer", listener.address)
    rid = channel.send("peer", Message("ping"))
    _answer_one(listener, n=1)
    assert channel.wait([rid, rid]) == {rid: Message("ok", id=rid, body={"n": 1})}
    channel.close()
    listener.close()


def test_a_reply_from_another_peer_than_the_one_asked_is_dropped() -> None:
    a, b = Listener(), Listener()
    channel = Channel(timeout=5.0)
    channel.connect("a", a.address)
    channel.connect("b", b.address)
    ra = channel.send("a", Message("pull"))
    rb = channel.send("b", Message("pull"))
    assert Poller(b).poll(5.0)
    peer_b, msg_b = b.recv()
    b.send(peer_b, Message("ok", id=ra, body={"from": "b"}))  # guesses a's request id
    b.send(peer_b, msg_b.reply(**{"from": "b"}))
    channel.wait([rb])  # b's forged reply came before this one: it has been taken
    _answer_one(a, **{"from": "a"})
    assert channel.wait([ra])[ra].body == {"from": "a"}
    channel.close()
    a.close()
    b.close()


def test_unread_notices_are_capped_keeping_the_newest(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(transport, "MAX_NOTICES", 5)
    listener = Listener()
    channel = Channel(timeout=5.0)
    channel.connect("peer", listener.address)
    rid = channel.send("peer", Message("ping"))
    assert Poller(listener).poll(5.0)
    peer, msg = listener.recv()
    for n in range(8):
        listener.send(peer, Message("note", body={"n": n}))
    listener.send(peer, msg.reply())
    channel.wait([rid])
    assert [m.body["n"] for _, m in channel.notices] == [3, 4, 5, 6, 7]
    assert channel.dropped_notices == 3 and "notices dropped" in caplog.text
    channel.close()
    listener.close()


FLOODER = """
import sys, time, msgpack, zmq
s = zmq.Context().socket(zmq.ROUTER)
s.bind("tcp://127.0.0.1:*")
print(s.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
peer = s.recv_multipart()[0]  # a request, never answered
notice = msgpack.packb({"v": 1, "op": "note", "id": 0, "body": {}, "t": []})
end = time.monotonic() + 30
while time.monotonic() < end:  # a ROUTER drops what the peer cannot take yet
    s.send_multipart([peer, notice])
"""


def test_a_flooding_peer_cannot_hold_a_wait_past_its_timeout() -> None:
    security = auth.current()
    auth.install(None)  # the flooder is plain pyzmq
    channel = Channel(timeout=0.5)
    flooder = subprocess.Popen([sys.executable, "-c", FLOODER], stdout=subprocess.PIPE, text=True)
    try:
        assert flooder.stdout is not None
        channel.connect("flooder", flooder.stdout.readline().strip())
        rid = channel.send("flooder", Message("pull"))
        assert channel.socket("flooder").poll(30_000)  # the flood has begun
        start = time.monotonic()
        with pytest.raises(RequestTimeout, match="flooder"):
            channel.wait([rid])
        # far below the flood's 30 s (the old loop stayed until it ended), with room for a
        # slow machine
        assert time.monotonic() - start < 10.0
        assert len(channel.notices) <= transport.MAX_NOTICES
    finally:
        with flooder:  # (closes its stdout)
            flooder.kill()
        channel.close()
        auth.install(security)


def test_a_listener_that_takes_no_tensors_drops_a_peer_sending_a_large_frame() -> None:
    """libzmq buffers a whole multipart message before handing it over, bounding frames only:
    a listener of control messages (the scheduler's) takes no frame larger than a header, so a
    peer cannot make it buffer tensor-sized frames; other peers are still served."""
    security = auth.current()
    auth.install(None)  # the peers are plain pyzmq
    listener = Listener(max_bytes=0)
    big, good = (zmq.Context.instance().socket(zmq.DEALER) for _ in range(2))
    try:
        for sock in (big, good):
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(listener.address)
        big.send_multipart([*encode(Message("status", id=1))[:1], bytes(MAX_HEADER + 1)])
        good.send_multipart(encode(Message("status", id=2)))
        assert listener.socket.poll(10_000)
        _, msg = listener.recv()
        assert msg.id == 2  # the large one never arrived
        assert not listener.socket.poll(200)
    finally:
        big.close()
        good.close()
        listener.close()
        auth.install(security)
