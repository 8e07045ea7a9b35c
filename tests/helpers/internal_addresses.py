"""Every spelling of an internal address issue 10 lists (loopback in its many forms, the cloud's
metadata service, the private, link-local and multicast ranges), each with the rule its refusal names.
Shared by the downloader's own tests and the worker's fault suite."""

from __future__ import annotations


def internal_spellings(port: int) -> list[tuple[str, str]]:
    """Internal addresses a job could name, each with the rule its refusal must name."""
    return [
        (f"http://127.0.0.1:{port}/x.bin", "loopback"),
        (f"http://localhost:{port}/x.bin", "loopback"),  # a name that resolves to loopback
        (f"http://127.1:{port}/x.bin", "loopback"),
        (f"http://0x7f.1:{port}/x.bin", "loopback"),
        (f"http://2130706433:{port}/x.bin", "loopback"),
        (f"http://0.0.0.0:{port}/x.bin", "unspecified"),
        (f"http://[::1]:{port}/x.bin", "loopback"),
        (f"http://[::ffff:127.0.0.1]:{port}/x.bin", "loopback"),
        (f"http://user@127.0.0.1:{port}/x.bin", "loopback"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://10.1.2.3/x.bin", "private"),
        ("http://172.16.0.1/x.bin", "private"),
        ("http://172.31.255.1/x.bin", "private"),
        ("http://192.168.0.1/x.bin", "private"),
        ("http://[fc00::1]/x.bin", "private"),
        ("http://[fe80::1]/x.bin", "link-local"),
        ("http://224.0.0.1/x.bin", "multicast"),
    ]
