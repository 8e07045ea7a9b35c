"""Fetching bytes: verified, resumable, cancellable downloads, the address fence, model sources and hosts."""
