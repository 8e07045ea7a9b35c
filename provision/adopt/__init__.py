"""Taking over a volume the original runpod-worker-forge's install script filled (``forge-volume adopt``).

- ``survey``: what is on the volume (checkout, extensions, models, settings, venv); reads only.
- ``plan``: the checks that refuse a volume as it is, the plan printed first, the journal.
- ``hashcache``: sha256 of every model, cached by size and mtime.
- ``lookup``: a model's source by its hash, from an index that answers by hash (Civitai's).
- ``moves``: the journaled moves into this layout, each leaving a link at the old path.
- ``records``: the spec, the lock, state.json's records and the config seed, from the journal.
"""
