"""A free TCP port on this machine, for the servers and process groups that tests, benchmarks and notebooks start."""
import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port of `host` that no socket holds now (the system picks it). Another program could take it before it
    is used, so start the server that needs it right away."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]
