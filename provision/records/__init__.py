"""The volume's records: the spec, the lock, state.json, the writer lock, and writing them atomically."""
