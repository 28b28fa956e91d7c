"""Read the pipeline's Nextflow files the way the tests need: process scripts, their scfm call, ext.args.

Shared by the contract test (flags exist) and the chain test (the same command lines run for real).
"""

from __future__ import annotations

import re
import shlex
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




def module_process(step: str) -> Process:
    return parse_process(REPO / "modules" / "local" / step / "main.nf")


def render_command(process: Process, values: dict[str, object], params: dict[str, object]) -> list[str]:
    """The process's scfm command line with its Groovy expressions filled in, split like a shell would.

    ``${params.x}`` comes from ``params``; every other ``${expr}`` must be in ``values`` (a KeyError
    means the module changed and the caller must say what the new expression holds). Shell variables
    (``\\${name}`` in the module) are filled from ``values`` too.
    """
    line = " ".join(command_words(process.shell)).replace("\\${", "${")
    return shlex.split(re.sub(r"\$\{([^}]*)\}", _groovy_filler(values, params), line))


def _groovy_filler(values: dict[str, object], params: dict[str, object]):
    """re.sub callback: the value of the ``${expr}`` matched, from ``params`` or ``values``, as Groovy prints it."""
    def fill(match: re.Match) -> str:
        expr = match.group(1)
        value = params[expr[len("params."):]] if expr.startswith("params.") else values[expr]
        if isinstance(value, bool):
            return str(value).lower()
        return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)

    return fill


def render_script(process: Process, values: dict[str, object], params: dict[str, object]) -> str:
    """The process's whole shell script (without the versions.yml heredoc), as the task would run it.

    Groovy's ``${expr}`` are filled like :func:`render_command` does; ``\\$`` becomes ``$`` and ``\\\\`` before a
    line end a shell line continuation.
    """
    script = re.sub(r"(?<!\\)\$\{([^}]*)\}", _groovy_filler(values, params), process.shell)
    script = re.sub(r"\\\\\s*\n", " ", script)  # Groovy's "\\" + newline: a shell line continuation
    return script.replace("\\$", "$")
