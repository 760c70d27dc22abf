"""The inference worker's wire format: framed messages, descriptors passed along, the shared-memory layout."""

from __future__ import annotations

import mmap
import os
import socket

import numpy as np
import pytest

from service.inference_process import InferenceProcess, _Connection
from service.metrics import Metrics
from service.settings import Settings
from service.wire import RUN, Kind, Layout, ModelLayout, PeerGone, receive, send, send_json, shared_memory
from service.worker import RelayedMetrics

LAYOUT = Layout(3, {"gray": ModelLayout((4, 5, 1), 10, (("a", 2, 3), ("b", 1, 1))),
                    "rgb": ModelLayout((6, 6, 3), 2, ())})


def test_messages_round_trip_and_the_end_of_the_stream_is_peer_gone():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        send(ours, Kind.RUN, RUN.pack(1, 3, 1))
        send_json(ours, Kind.STATUS, {"state": "loading", "model": "gray"})
        send(ours, Kind.STOP)
        kind, body, fds = receive(theirs)
        assert (kind, RUN.unpack(body), fds) == (Kind.RUN, (1, 3, 1), [])
        assert receive(theirs)[:2] == (Kind.STATUS, b'{"state": "loading", "model": "gray"}')
        assert receive(theirs)[:2] == (Kind.STOP, b"")
        ours.close()
        with pytest.raises(PeerGone):
            receive(theirs)


def test_a_descriptor_travels_with_its_message_and_maps_the_same_memory():
    fd, buffer = shared_memory(LAYOUT.size)
    ours, theirs = socket.socketpair()
    with ours, theirs, buffer:
        send_json(ours, Kind.READY, {"layout": LAYOUT.to_json()}, fds=(fd,))
        os.close(fd)
        kind, body, fds = receive(theirs, with_fds=True)
        assert kind is Kind.READY and len(fds) == 1
        with mmap.mmap(fds[0], LAYOUT.size) as other:
            os.close(fds[0])
            LAYOUT.inputs(buffer, "rgb", 2)[...] = 7
            assert (LAYOUT.inputs(other, "rgb", 2) == 7).all()


def test_a_blocked_read_gives_up_once_the_peer_is_dead():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.settimeout(0.01)
        checks = []
        with pytest.raises(PeerGone):
            receive(theirs, alive=lambda: checks.append(1) or len(checks) < 3)
        assert len(checks) == 3


def test_layout_regions_do_not_overlap_and_survive_json():
    assert Layout.from_json(LAYOUT.to_json()) == LAYOUT
    assert LAYOUT.output_offset >= 3 * 6 * 6 * 3 and LAYOUT.output_offset % 64 == 0
    fd, buffer = shared_memory(LAYOUT.size)
    os.close(fd)
    n = 3
    views = [LAYOUT.inputs(buffer, "gray", n), LAYOUT.scores(buffer, "gray", n),
             LAYOUT.familiarity(buffer, "gray", n), *LAYOUT.masks(buffer, "gray", n).values()]
    for value, view in enumerate(views, start=1):
        view[...] = value
    for value, view in enumerate(views, start=1):
        assert (view == value).all()
    assert [v.shape for v in views] == [(3, 4, 5, 1), (3, 10), (3, 2), (3, 2, 3), (3, 1, 1)]
    start, end = np.frombuffer(buffer, np.uint8).ctypes.data, views[-1]
    assert end.ctypes.data + end.nbytes <= start + LAYOUT.size
    with pytest.raises(ValueError, match="1 to 3"):
        LAYOUT.inputs(buffer, "gray", 4)


# ------------------------------------------------------------------ compile metrics relayed by EVENT messages


class AliveProcess:
    def poll(self) -> None:
        return None


def test_the_worker_relays_its_compile_metrics_and_the_server_applies_them_between_batches():
    metrics = Metrics()
    process = InferenceProcess(Settings(), {}, metrics=metrics)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        relayed = RelayedMetrics(lambda event: send_json(theirs, Kind.EVENT, event))
        relayed.compile_speedup_ratio.labels("demo").set(1.5)
        relayed.compile_failures_total.labels("demo", "load").inc()
        relayed.model_compiled.labels("demo").set(1)
        conn = _Connection(AliveProcess(), ours, process._apply_event)
        conn.receive_waiting_events()  # what the supervisor does while no batch runs
        conn.receive_waiting_events()  # nothing left: returns at once
        assert process.serving_forms == {"demo": "compiled"}
        assert metrics.compile_speedup_ratio.labels("demo")._value.get() == 1.5
        assert metrics.compile_failures_total.labels("demo", "load")._value.get() == 1
        send(theirs, Kind.RESULT, b"")  # only a RUN may be answered: anything else between batches is broken
        with pytest.raises(PeerGone):
            conn.receive_waiting_events()


def test_an_event_for_anything_but_a_compile_metric_is_refused():
    process = InferenceProcess(Settings(), {}, metrics=Metrics())
    with pytest.raises(ValueError, match="unknown event"):
        process._apply_event(b'{"metric": "requests_total", "labels": [], "op": "inc", "value": 1}')
    with pytest.raises(ValueError, match="unknown event"):
        process._apply_event(b'{"metric": "model_compiled", "labels": ["demo"], "op": "observe", "value": 1}')
