"""Forge itself at run time: its command line and environment, its process, its own files, its hash cache."""
