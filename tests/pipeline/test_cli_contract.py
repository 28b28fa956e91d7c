"""The pipeline and the CLIs it wraps agree: commands, flags, positional arguments and parameters.

Each process's `script:` block calls one `bin/scfm-<step>` executable; every flag it (or its
`ext.args` in conf/modules.config) passes must exist on that click command, every required option
must be passed, and a single-valued positional argument must get exactly one value. Every
`params.*` used anywhere must be declared in nextflow.config and described in nextflow_schema.json.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import pytest

from nf_scripts import command_words, modules_config_ext_args, parse_process, section
from scfm.cli import cli

REPO = Path(__file__).resolve().parents[2]
MODULES = sorted((REPO / "modules" / "local").glob("*/main.nf"))

# flags of the launchers wrapped around scfm-pretrain, not of scfm itself
LAUNCHER_FLAGS = {"--standalone", "--nnodes", "--nproc_per_node", "--no-python", "--kill-on-bad-exit", "--nv", "-B", "--pwd"}
STEP_FLAGS = {"--seed", "--quiet"}  # every step passes these; --mlflow-uri comes from MLFLOW_TRACKING_URI


def resolve_command(words: list[str]) -> tuple[click.Command, list[str], list[str]]:
    """``scfm-vocab build a b -o x`` → (the `vocab build` command, its path, the words after it)."""
    executable = words[0]
    bin_file = REPO / "bin" / executable
    assert bin_file.exists(), f"{executable} is not in bin/"
    step = re.search(r"run_step\(\"([^\"]+)\"\)", bin_file.read_text()).group(1)
    command: click.Command = cli
    path = []
    for part in step.split():
        assert isinstance(command, click.Group) and part in command.commands, f"scfm has no command {step!r}"
        command = command.commands[part]
        path.append(part)
    rest = words[1:]
    while isinstance(command, click.Group):
        assert rest and rest[0] in command.commands, f"{executable}: no subcommand among {rest[:1]}"
        command = command.commands[rest[0]]
        path.append(rest[0])
        rest = rest[1:]
    return command, path, rest


def option_names(command: click.Command) -> set[str]:
    return {o for p in command.params if isinstance(p, click.Option) for o in p.opts + p.secondary_opts}


def groovy_flags(text: str) -> set[str]:
    """Flags inside string literals of Groovy code (the defs that build optional flags, ext.args)."""
    literals = re.findall(r"\"[^\"\n]*\"|'[^'\n]*'", text)
    return {flag for lit in literals for flag in re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", lit)} - LAUNCHER_FLAGS


def shell_flags(words: list[str]) -> set[str]:
    return {w for w in words if re.fullmatch(r"--?[A-Za-z][\w-]*", w)}


def positionals(command: click.Command, words: list[str]) -> list[str]:
    """Words that are not options nor option values, in order."""
    takes_value = {o for p in command.params if isinstance(p, click.Option) and not p.is_flag for o in p.opts}
    out, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in takes_value:
            skip = True
        elif re.fullmatch(r"\$\{\w+\}", word):
            pass  # a Groovy variable holding optional flags (`def batch = ... ? "--batch ..." : ''`)
        elif not word.startswith("-"):
            out.append(word)
    return out


PROCESSES = [parse_process(m) for m in MODULES]
EXT_ARGS = modules_config_ext_args()


def test_every_module_is_parsed():
    assert len(PROCESSES) >= 9
    assert {p.name for p in PROCESSES} >= {"MLFLOW_INIT", "QC", "VOCAB_BUILD", "ALIGN", "PRETRAIN", "FINETUNE",
                                            "EMBED", "ANNOTATE", "REPORT"}


def test_ext_args_only_for_known_processes():
    known = {p.name for p in PROCESSES} | {"REPORT_BATCH", "REPORT_ALL"}
    assert set(EXT_ARGS) <= known, set(EXT_ARGS) - known


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: p.name)
def test_script_calls_existing_command_with_existing_flags(process):
    words = command_words(process.shell)
    command, path, rest = resolve_command(words)
    available = option_names(command) | {"-h", "--help"}
    used = shell_flags(rest) | groovy_flags(process.groovy) | groovy_flags(EXT_ARGS.get(process.name, ""))
    unknown = sorted(used - available)
    assert not unknown, f"{process.module}: scfm {' '.join(path)} has no {unknown}"
    # the `--flag` words in the shell line come only from the command's own options
    assert shell_flags(rest) <= available


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: p.name)
def test_script_passes_required_options(process):
    command, path, rest = resolve_command(command_words(process.shell))
    used = shell_flags(rest) | groovy_flags(process.groovy)
    missing = [p.opts for p in command.params if isinstance(p, click.Option) and p.required and not set(p.opts) & used]
    assert not missing, f"{process.module}: scfm {' '.join(path)} requires {missing}"


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: p.name)
def test_positional_arguments_match_arity(process):
    command, path, rest = resolve_command(command_words(process.shell))
    given = positionals(command, rest)
    arguments = [p for p in command.params if isinstance(p, click.Argument)]
    if not arguments:
        assert not given, f"{process.module}: scfm {' '.join(path)} takes no positional arguments, got {given}"
        return
    variadic = any(a.nargs == -1 for a in arguments)
    if variadic:
        assert given, f"{process.module}: scfm {' '.join(path)} needs input files"
    else:
        # one word per argument; a Groovy list spliced in (`${xs.join(' ')}`) would be several files
        assert len(given) == len(arguments), f"{process.module}: {given} for {[a.name for a in arguments]}"
        assert not any(".join(" in word for word in given), f"{process.module}: a list passed to {arguments}"


@pytest.mark.parametrize("process", [p for p in PROCESSES if not p.name.startswith("MLFLOW_")], ids=lambda p: p.name)
def test_every_step_passes_seed_and_quiet(process):
    assert STEP_FLAGS <= shell_flags(command_words(process.shell))


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: p.name)
def test_process_emits_versions_and_has_a_stub(process):
    text = process.module.read_text()
    assert re.search(r"path\s+'versions\.yml',\s*emit:\s*versions", text)
    assert "stub:" in text
    assert re.search(r"^\s+tag\s", text, re.M) and re.search(r"^\s+label\s+'process_\w+'", text, re.M)


def test_versions_command_exists():
    from click.testing import CliRunner

    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("scfm")


# -- params ----------------------------------------------------------------------------------------
def used_params() -> dict[str, set[str]]:
    files = [REPO / "main.nf", REPO / "nextflow.config", *(REPO / "workflows").glob("*.nf"),
             *(REPO / "modules").rglob("*.nf"), *(REPO / "conf").glob("*.config")]
    used: dict[str, set[str]] = {}
    for f in files:
        for name in re.findall(r"\bparams\.([A-Za-z_]\w*)", f.read_text()):
            used.setdefault(name, set()).add(f.relative_to(REPO).as_posix())
    return used


def config_params(path: Path) -> dict[str, str]:
    """``name = value`` lines of the top-level ``params { }`` block."""
    text = path.read_text()
    block = section(text, "params {", ("\n}\n",))
    return dict(re.findall(r"^\s{4}(\w+)\s*=\s*(.+?)\s*$", block, re.M))


def schema_params() -> dict[str, dict]:
    schema = json.loads((REPO / "nextflow_schema.json").read_text())
    return {name: spec for group in schema["$defs"].values() for name, spec in group["properties"].items()}


def test_every_used_param_is_declared_and_described():
    declared, described = config_params(REPO / "nextflow.config"), schema_params()
    for name, where in sorted(used_params().items()):
        assert name in declared, f"params.{name} (used in {sorted(where)}) is not set in nextflow.config"
        assert name in described, f"params.{name} (used in {sorted(where)}) is not in nextflow_schema.json"


def test_config_and_schema_list_the_same_params_with_the_same_defaults():
    declared, described = config_params(REPO / "nextflow.config"), schema_params()
    assert set(declared) == set(described), set(declared) ^ set(described)
    for name, literal in declared.items():
        default = described[name].get("default")
        value = None if literal == "null" else json.loads(literal.replace("'", '"'))
        assert value == default, f"{name}: nextflow.config says {literal}, schema says {default!r}"


def test_profile_params_are_declared():
    declared = config_params(REPO / "nextflow.config")
    for config in (REPO / "conf").glob("*.config"):
        if "params {" in config.read_text():
            extra = set(config_params(config)) - set(declared)
            assert not extra, f"{config.name} sets undeclared params {extra}"


def test_schema_is_valid_draft_2020_12():
    import jsonschema

    schema = json.loads((REPO / "nextflow_schema.json").read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    defaults = {name: spec["default"] for name, spec in schema_params().items() if "default" in spec}
    jsonschema.Draft202012Validator(schema).validate({**defaults, "input": "samplesheet.csv", "outdir": "results"})


def test_contract_catches_drift(tmp_path):
    """The checks above can fail: an unknown flag, a missing required option and a list for one input."""
    module = tmp_path / "main.nf"
    module.write_text(
        "process BROKEN {\n    script:\n    def extra = \"--no-such-flag 1\"\n    \"\"\"\n"
        "    scfm-qc ${inputs.join(' ')} \\\\\n        --summary x.json \\\\\n        ${extra}\n    \"\"\"\n}\n"
    )
    process = parse_process(module)
    command, _, rest = resolve_command(command_words(process.shell))
    assert groovy_flags(process.groovy) - option_names(command) == {"--no-such-flag"}
    required = {o for p in command.params if isinstance(p, click.Option) and p.required for o in p.opts}
    assert required and not required & shell_flags(rest)
    assert positionals(command, rest) == ["${inputs.join(' ')}"]


# -- workflow -> module calls ----------------------------------------------------------------------
def input_count(process: Path) -> int:
    """Number of input channels a process declares (one declaration per line of its input: block)."""
    block = section(process.read_text(), "input:", ("output:",))
    return len([line for line in block.splitlines() if line.strip() and not line.strip().startswith("//")])


def split_arguments(text: str) -> list[str]:
    """Top-level comma split of a call's argument list."""
    args, depth, current = [], 0, ""
    for char in text:
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            args.append(current.strip())
            current = ""
        else:
            current += char
    return [a for a in [*args, current.strip()] if a]


def process_calls(workflow: Path) -> list[tuple[str, Path, list[str]]]:
    """(name as called, module file, arguments) for every process call in a workflow file."""
    text = workflow.read_text()
    modules = {}
    for names, source in re.findall(r"include\s*\{([^}]*)\}\s*from\s*'([^']+)'", text):
        module = (workflow.parent / source / "main.nf").resolve()
        for item in names.split(";"):
            parts = item.split(" as ")
            modules[parts[-1].strip()] = module
    calls = []
    for name, module in modules.items():
        for match in re.finditer(rf"(?<![\w.]){name}\(", text):
            depth, i = 1, match.end()
            while depth:
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            calls.append((name, module, split_arguments(text[match.end() : i - 1])))
    return calls


def test_workflow_calls_pass_every_process_input():
    calls = process_calls(REPO / "workflows" / "scfm.nf")
    assert {name for name, _, _ in calls} >= {"MLFLOW_INIT", "QC", "VOCAB_BUILD", "ALIGN", "PRETRAIN", "FINETUNE",
                                              "EMBED", "ANNOTATE", "REPORT_BATCH", "REPORT_ALL"}
    for name, module, args in calls:
        assert len(args) == input_count(module), f"{name}({', '.join(args)}) but {module} declares " \
                                                 f"{input_count(module)} inputs"


def test_call_check_catches_a_missing_argument(tmp_path):
    (tmp_path / "modules" / "step").mkdir(parents=True)
    (tmp_path / "modules" / "step" / "main.nf").write_text(
        "process STEP {\n    input:\n    val a\n    // a comment\n    tuple val(b), path(c)\n\n    output:\n"
        "    path 'x'\n\n    script:\n    \"\"\"\n    true\n    \"\"\"\n}\n")
    workflow = tmp_path / "wf.nf"
    workflow.write_text("include { STEP as FIRST } from './modules/step'\n"
                        "workflow W {\n    FIRST(channel.of([1, 2]).map { x -> [x, x] })\n}\n")
    [(name, module, args)] = process_calls(workflow)
    assert (name, len(args), input_count(module)) == ("FIRST", 1, 2)
