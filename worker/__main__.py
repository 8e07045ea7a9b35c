"""``python -m worker``: boot Forge in the background and start RunPod's job loop at once.

``python -m worker --rp_serve_api --rp_api_port 8000`` runs RunPod's local test API instead.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    # RunPod's logger defaults to DEBUG, which formats every job's whole output (megabytes of base64)
    # into a log line; INFO keeps the log readable and the relay fast. Set RUNPOD_LOG_LEVEL to override.
    os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")
    from worker.boot import build_worker, remove_on_sigterm
    from worker.handler import make_handler

    worker = build_worker(os.environ)  # Forge starts booting now, while the SDK imports
    remove_on_sigterm(worker)
    worker.local_api = "--rp_serve_api" in sys.argv
    from worker.sdk import import_runpod

    runpod = import_runpod()

    if os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT"):  # on RunPod: progress goes to /status
        worker.report = runpod.serverless.progress_update
    runpod.serverless.start({"handler": make_handler(worker)})


if __name__ == "__main__":
    main()
