"""HTTP/2 flow control sized to the messages (gradwire.channel.flow_control_options): a fixed
window no larger than the receive limit, on the PS's server and on the worker's channel."""

import grpc

from gradwire.channel import MAX_FLOW_CONTROL_WINDOW, MIN_FLOW_CONTROL_WINDOW, flow_control_options
from gradwire.worker import client as worker_client


def window(options) -> int:
    values = dict(options)
    assert values["grpc.http2.bdp_probe"] == 0  # fixed window, no bandwidth-delay probing
    return values["grpc.http2.lookahead_bytes"]


def test_the_window_is_the_message_limit_within_bounds():
    assert window(flow_control_options(218_192)) == 218_192
    assert window(flow_control_options(10**9)) == MAX_FLOW_CONTROL_WINDOW
    assert window(flow_control_options(100)) == MIN_FLOW_CONTROL_WINDOW


def test_the_ps_window_never_exceeds_its_receive_limit(make_server, monkeypatch):
    """A hostile peer can make the PS buffer no more than one allowed message per stream."""
    seen: list = []
    real = grpc.server

    def recording_server(*args, **kwargs):
        seen.append(dict(kwargs["options"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(grpc, "server", recording_server)
    running = make_server(workers=1, rounds=1)
    (options,) = seen
    assert window(options.items()) == max(MIN_FLOW_CONTROL_WINDOW, min(running.receive_limit, MAX_FLOW_CONTROL_WINDOW))
    assert options["grpc.http2.lookahead_bytes"] <= max(running.receive_limit, MIN_FLOW_CONTROL_WINDOW)


def test_the_worker_channel_has_the_window_of_its_message_limit(monkeypatch):
    seen: list = []
    monkeypatch.setattr(worker_client, "client_channel", lambda target, **kw: seen.append(dict(kw["options"])))
    worker_client.open_channel("127.0.0.1:1", max_message_mb=4)
    (options,) = seen
    assert window(options.items()) == 4 * 2**20
