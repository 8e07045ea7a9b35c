"""Booting Forge from the volume: the boot set recorded at install, its lay-out at worker start, the proof."""
