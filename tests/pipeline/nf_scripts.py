"""Read the pipeline's Nextflow files the way the tests need: process scripts, their scfm call, ext.args.

Used by the contract test (every flag a process passes exists on the command it calls).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Process:
    name: str
    module: Path
    groovy: str  # the script: section before its shell string (flag-building defs)
    shell: str  # the shell string, without the versions.yml heredoc
    ext_args: str = ""


def section(text: str, start: str, ends: tuple[str, ...]) -> str:
    begin = text.index(start) + len(start)
    stops = [text.find(end, begin) for end in ends]
    stops = [s for s in stops if s != -1]
    return text[begin : min(stops) if stops else len(text)]


def parse_process(path: Path) -> Process:
    text = path.read_text()
    name = re.search(r"^process\s+(\w+)\s*\{", text, re.M).group(1)
    script = section(text, "script:", ("stub:", "\n}\n"))
    groovy, _, rest = script.partition('"""')
    shell = rest.rsplit('"""', 1)[0]
    shell = re.sub(r"cat <<-END_VERSIONS.*?END_VERSIONS", "", shell, flags=re.S)
    return Process(name, path, groovy, shell)


def balanced(text: str, start: int) -> int:
    """Index just past the bracket closing the one at ``text[start]``."""
    pairs = {"{": "}", "(": ")", "[": "]"}
    opening, closing = text[start], pairs[text[start]]
    depth, i = 0, start
    while True:
        depth += (text[i] == opening) - (text[i] == closing)
        i += 1
        if depth == 0:
            return i


def modules_config_ext_args() -> dict[str, str]:
    """``withName: 'QC' { ext.args = ... }`` → {"QC": "<the ext.args expression>"}."""
    text = (REPO / "conf" / "modules.config").read_text()
    found = {}
    for match in re.finditer(r"withName:\s*'([^']+)'\s*\{", text):
        body = text[match.end() - 1 : balanced(text, match.end() - 1)]
        args = re.search(r"ext\.args\s*=\s*", body)
        if args:
            start = args.end()
            end = balanced(body, start) if body[start] == "{" else body.index("\n", start)
            for process in match.group(1).split("|"):
                found[process] = body[start:end]
    return found


def command_words(shell: str) -> list[str]:
    """The words of the one scfm-<step> call in a shell script (line continuations joined)."""
    joined = re.sub(r"\\\\\s*\n", " ", shell)
    calls = [line for line in joined.splitlines() if re.search(r"(^|[\s(])scfm-[a-z-]+", line)]
    assert len(calls) == 1, f"expected one scfm-<step> call, found {len(calls)}: {calls}"
    line = calls[0]
    line = line[line.index("scfm-") :]
    line = re.split(r"\s(?:\||;|&&|\))", line)[0]  # stop at a pipe, ; or the end of $( )
    # a word: quoted strings, ${groovy expressions} (which may hold spaces) and other characters, glued
    return re.findall(r"(?:\$\{[^}]*\}|'[^']*'|\"[^\"]*\"|[^\s'\"$]|\$)+", line)

