"""The commands, one module each: the library behind every ``forge-volume`` subcommand."""
