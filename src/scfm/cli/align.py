"""Commands of this area; see scfm.cli."""

COMMANDS: list = []
