"""Every error a helper job can meet gives advice that works from a job (issue 10, hole 16).

The CLI's advice ("run `forge-volume lock` again", "pass --wait", "check the source in the spec",
"re-run") cannot be followed by a client of the endpoint; each error class says what a job can do.
The end-to-end cases are in tests/worker/test_e2e_helper_payloads.py; this walks every class.
"""

from __future__ import annotations

import importlib
import pkgutil

import provision
import worker
from provision.errors import CommandError, ForgeVolumeError

CLI_ONLY = ("forge-volume lock", "forge-volume install", "forge-volume init", "--wait", "--prune", "in the spec",
            "re-run")
# Raised only by install on a pod (git, pip, uv): no helper job reaches them.
INSTALL_ONLY = {"CommandError", "GitError", "UvMissingError"}


def _classes() -> list[type[ForgeVolumeError]]:
    for package in (provision, worker):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name != "worker.__main__":
                importlib.import_module(info.name)
    found: list[type[ForgeVolumeError]] = []
    todo = [ForgeVolumeError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return found


def test_every_error_class_has_advice_a_job_can_follow() -> None:
    classes = [c for c in _classes() if c.__name__ not in INSTALL_ONLY and not issubclass(c, CommandError)]
    assert len(classes) > 10
    for cls in classes:
        advice = cls.__new__(cls).advice("job")  # the class's own advice, whatever its constructor needs
        assert not any(phrase in advice for phrase in CLI_ONLY), (cls.__name__, advice)


def test_the_cli_keeps_its_advice_and_a_raise_sites_own_advice_serves_both() -> None:
    from provision.errors import ChecksumError, DownloadError, VolumeBusyError

    assert "pass --wait" in VolumeBusyError("busy").one_line()
    assert "forge-volume lock" in ChecksumError("bad").one_line()
    assert DownloadError("x", "do this").one_line("job") == "x (do this)"
    assert DownloadError("x", "cli", job_hint="job").one_line("job") == "x (job)"
