"""A bad spec stops install (and lock, and plan) with one line naming the file and the key, before
anything is written to the volume."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.provision.conftest import cli

GOOD_FORGE = '[forge]\nrepo = "/nowhere/forge"\npython = "/usr/bin/python3"\ntorch = []\n'

CASES = {
    "unknown key": (GOOD_FORGE + 'colour = "blue"\n', "line 5: `forge.colour` is not a known key"),
    "misspelt key": (GOOD_FORGE + 'torch_index = ""\n',
                     "line 5: `forge.torch_index` is not a known key; did you mean `torch_index_url`?"),
    "misspelt table": (GOOD_FORGE + '\n[[model]]\nkind = "lora"\nsource = "https://example.invalid/a.bin"\n',
                       "line 6: `[[model]]` is not a known table; did you mean `[[models]]`?"),
    "wrong type": ('[forge]\ntorch = "torch==2.3.1"\n', "`forge.torch` must be a list"),
    "missing repo": (GOOD_FORGE + '[[extensions]]\nname = "reactor"\n', "`extensions[0].repo` is missing"),
    "unknown kind": (GOOD_FORGE + '[[models]]\nkind = "weights"\nsource = "https://example.invalid/a.bin"\n',
                     "`models[0].kind` is 'weights', not a known kind (known kinds: checkpoint, lora"),
    "duplicate extension": (GOOD_FORGE + '[[extensions]]\nname = "a"\nrepo = "/r/a"\n'
                            '[[extensions]]\nname = "a"\nrepo = "/r/b"\n', "`extensions[1]` repeats name 'a'"),
    "bad toml": ("[forge\nrepo = 1\n", "not valid TOML"),
    "env not strings": (GOOD_FORGE + "env = { A = 1 }\n", "`forge.env` must be a table of strings"),
    "newline in a model name": (GOOD_FORGE + '[[models]]\nkind = "lora"\nsource = "https://example.invalid/a.bin"\n'
                                'name = "evil\\n.safetensors"\n', "control character U+000A"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("command", ["install", "lock", "plan"])
def test_bad_spec_is_one_line_naming_file_and_key(case: str, command: str, volume: Path, tmp_path: Path) -> None:
    text, expected = CASES[case]
    spec = tmp_path / "elsewhere" / "forge-volume.toml"
    spec.parent.mkdir()
    spec.write_text(text, encoding="utf-8")

    result = cli("--spec", str(spec), command)

    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {spec}: ")
    assert expected in lines[0]
    assert "Traceback" not in result.output
    assert "fix that line of the spec (nothing was changed)" in lines[0] and "forge-volume init" not in lines[0]
    assert list(volume.iterdir()) == []  # nothing written to the volume
    assert sorted(p.name for p in spec.parent.iterdir()) == ["forge-volume.toml"]  # and no lock


def test_missing_spec_says_how_to_write_one(volume: Path) -> None:
    result = cli("install")
    assert result.exit_code == 1
    assert f"spec file {volume / 'forge-volume.toml'} does not exist" in result.stderr
    assert "forge-volume init" in result.stderr
    assert list(volume.iterdir()) == []


def test_usage_error_exits_2(volume: Path) -> None:
    result = cli("install", "--no-such-flag")
    assert result.exit_code == 2
