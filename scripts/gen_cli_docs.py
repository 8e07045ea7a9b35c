"""Write docs/cli.md from the real `--help` output of `forge-volume` and each of its commands.

The help texts are the command docstrings, so the reference cannot say something the CLI does
not; tests/docs/test_cli_docs.py fails when docs/cli.md is older than the help texts.

    python scripts/gen_cli_docs.py            # rewrite docs/cli.md
    python scripts/gen_cli_docs.py --check    # exit 1 if docs/cli.md is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import click
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
CLI_DOC = ROOT / "docs" / "cli.md"
REGENERATE = "python scripts/gen_cli_docs.py"
# A fixed width, so the file does not depend on the terminal of whoever regenerates it.
WIDTH = 100


def _help(args: list[str]) -> str:
    from provision.cli import main

    result = CliRunner().invoke(main, [*args, "--help"], prog_name="forge-volume", terminal_width=WIDTH)
    if result.exit_code != 0:
        raise RuntimeError(f"forge-volume {' '.join(args)} --help exited {result.exit_code}:\n{result.output}")
    return result.output.rstrip() + "\n"


def render() -> str:
    """The whole of docs/cli.md."""
    from provision.cli import main

    assert isinstance(main, click.Group)
    parts = [
        "# forge-volume command reference\n",
        f"Generated from `forge-volume --help` by `{REGENERATE}`; do not edit by hand.\n",
        "Every command takes the global options (`--volume`, `--spec`, `--quiet`, `--debug`) before its name, "
        "e.g. `forge-volume --volume /workspace install`. Exit status: 0 on success, 1 on a failure "
        "(one line with the cause and its fix; `--debug` adds the traceback), 2 on a usage error.\n",
        "## forge-volume\n",
        "```text\n" + _help([]) + "```\n",
    ]
    for name in main.list_commands(click.Context(main)):
        parts.append(f"## forge-volume {name}\n")
        parts.append("```text\n" + _help([name]) + "```\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale; write nothing")
    parser.add_argument("--output", type=Path, default=CLI_DOC, help="where the reference goes (default: docs/cli.md)")
    args = parser.parse_args(argv)
    output: Path = args.output
    text = render()
    if args.check:
        current = output.read_text(encoding="utf-8") if output.exists() else ""
        if current != text:
            print(f"{output} is stale; run: {REGENERATE}", file=sys.stderr)
            return 1
        print(f"{output} is up to date")
        return 0
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
