#!/bin/sh
# The worker image's entry point: run the RunPod worker, which boots Forge from the network volume.
# exec, so the worker is PID 1's direct replacement and receives RunPod's SIGTERM itself
# (it then stops Forge). Arguments pass through, e.g. --rp_serve_api --rp_api_host 0.0.0.0.
set -eu
exec python -m worker "$@"
