"""Local Ray clusters for tests and benchmarks: free ports, and stopping exactly one
cluster's processes (never ``ray stop``, which ends every Ray on the machine)."""

from __future__ import annotations

import contextlib
import os
import socket


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 now. Each socket stays open until all are chosen:
    choosing them one after another can return one port twice (the OS may hand a port closed
    a moment ago out again), and Ray refuses to start when two of its components share one."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def stop_cluster_processes(temp_dir: str, gcs_port: int | None = None) -> list[int]:
    """Kill the processes of the cluster whose temp dir is ``temp_dir`` (and GCS port
    ``gcs_port``), and nothing else: those whose command line names either, their
    descendants, and Ray's agents that rename themselves (``ray::DashboardAgent``,
    ``ray::RuntimeEnvAgent``, idle workers: setproctitle drops the arguments) but hold log
    files under ``temp_dir``. Returns the pids killed."""
    import psutil

    def named(args: list[str]) -> bool:
        return any(temp_dir in a or (gcs_port is not None and (
            a == f"--gcs_server_port={gcs_port}" or (a.endswith(f":{gcs_port}") and "address" in a))) for a in args)

    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            args = p.info["cmdline"] or []
            if named(args) or (args and args[0].startswith("ray::")
                               and any(f.path.startswith(temp_dir) for f in p.open_files())):
                found[p.pid] = p
                for child in p.children(recursive=True):
                    found[child.pid] = child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    found.pop(os.getpid(), None)
    for p in found.values():
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(found.values()), timeout=5)
    return sorted(found)
