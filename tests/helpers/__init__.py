"""Test helpers: fixture git repositories, local wheels, loopback servers."""
