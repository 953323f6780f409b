"""A Ray cluster that `ray start` recorded on this machine and that was stopped without
`ray stop`: the jobs start a local Ray instead of retrying "Failed to connect to GCS" for
minutes with no word of their own (found 2026-12-06)."""

from __future__ import annotations

import socket

from pipeline.cluster import stale_local_cluster


def test_a_recorded_cluster_that_does_not_answer_is_found_stale(tmp_path):
    assert stale_local_cluster(str(tmp_path)) is None  # no record: Ray starts a local cluster anyway
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        (tmp_path / "ray_current_cluster").write_text(f"127.0.0.1:{port}\n")
        assert stale_local_cluster(str(tmp_path)) is None  # it answers: joined as before
    # the same address with nothing listening any more
    address, record = stale_local_cluster(str(tmp_path), timeout_s=1.0)
    assert address == f"127.0.0.1:{port}" and record == str(tmp_path / "ray_current_cluster")
    (tmp_path / "ray_current_cluster").write_text("garbage")
    assert stale_local_cluster(str(tmp_path)) is None


def test_only_a_local_head_that_refuses_is_stale(tmp_path):
    """A record of a remote head (a worker or login node's `ray start --address`) is Ray's to
    wait for; an IPv6 record of a live local head is not stale."""
    (tmp_path / "ray_current_cluster").write_text("192.0.2.1:6379\n")  # TEST-NET: never this machine
    assert stale_local_cluster(str(tmp_path), timeout_s=0.5) is None
    if socket.has_ipv6:
        try:
            server = socket.socket(socket.AF_INET6)
            server.bind(("::1", 0))
        except OSError:  # no IPv6 loopback here
            return
        with server:
            server.listen()
            port = server.getsockname()[1]
            (tmp_path / "ray_current_cluster").write_text(f"[::1]:{port}\n")
            assert stale_local_cluster(str(tmp_path)) is None
        assert stale_local_cluster(str(tmp_path)) == (f"[::1]:{port}", str(tmp_path / "ray_current_cluster"))
