"""The one bound for "it happened promptly" in the suite, chosen to hold on a busy 2-core machine.

A test never asserts how fast something is: speed targets live in ``scripts/bench_*.py``, measured
side by side in one run. A test may assert that something ended promptly rather than by a path that
takes far longer (a request timeout of an hour, a boot of two minutes, a generation of a thousand
seconds). ``PROMPT`` sits several times above what a loaded machine stretches the prompt path to
(well under a second when idle) and far below every slow path the tests rule out. Where a deadline
is part of what is checked, the bound is that deadline plus ``PROMPT``; the deadline itself is a
wall-clock floor a loaded machine cannot shorten, so lower bounds stay exact.
"""

from __future__ import annotations

PROMPT = 10.0  # seconds
