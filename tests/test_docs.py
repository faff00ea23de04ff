"""The documentation cannot drift from the code: every command in the shell blocks of README.md and docs/ names a
script that exists and passes arguments its parser accepts (tyro, run without `main`); blocks marked
`<!-- offline -->` name only local models and data; every relative link and image resolves, `#anchors` included; and
every top-level script's docstring ends with a pointer to its page. Seconds: one import per script."""

import ast
import contextlib
import importlib.util
import io
import re
import shlex
import sys

import pytest
import tyro
from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = ["sft_sst2.py", "sft.py", "reward_sst2.py", "reward.py", "ppo.py", "rebel_online.py", "rloo.py", "grpo.py",
           "generate.py", "score.py", "filter.py", "rebel.py", "dpo.py"]
TORCHRUN_OPTIONS = {"--nproc_per_node", "--nnodes", "--rdzv_backend", "--rdzv_endpoint", "--rdzv_id",
                    "--shutdown-timeout", "--master_port"}
LOCAL_ONLY = re.compile(r"--(\w+\.)?(\w*model\w*|dataset|reward_fn)$")  # arguments that name a model or data


def shell_blocks(path):
    """(line, code, offline) of every ```bash block; offline: the block is marked `<!-- offline -->`."""
    lines, blocks, i = path.read_text().splitlines(), [], 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            blocks.append((i + 1, "\n".join(lines[i + 1:end]), before == "<!-- offline -->"))
            i = end
        i += 1
    return blocks


def expand(token, variables):
    """$VAR and ${VAR} (unknown ones, such as the environment's, become a placeholder path)."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), "x"), token)


def braces(token):
    """Brace expansion of one token: a{0,1}b -> a0b a1b."""
    m = re.search(r"\{([^{}]*,[^{}]*)\}", token)
    return [t for part in m.group(1).split(",") for t in braces(token[:m.start()] + part + token[m.end():])] \
        if m else [token]


def commands(code):
    """The (script, arguments) of every python/torchrun/bash command of a block, in order."""
    variables, found = {}, []
    for line in code.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(re.sub(r"\$\(\((?:[^()]|\([^()]*\))*\)\)", "0", line), posix=True, punctuation_chars=";&")
        lexer.whitespace_split = True
        pieces = [[]]
        for token in lexer:  # comments dropped, quotes respected, split at && and ;
            if token in ("&&", ";"):
                pieces.append([])
            else:
                pieces[-1].append(token)
        for tokens in filter(None, pieces):
            if tokens[0] == "for" and "in" in tokens:  # for t in 0 1 2: the loop variable takes its first value
                variables[tokens[1]] = tokens[tokens.index("in") + 1]
                continue
            assigned = []
            while tokens and re.fullmatch(r"\w+=.*", tokens[0]):  # VAR=value, alone or before a command
                assigned.append(tokens.pop(0).split("=", 1))
            if not tokens:
                variables.update((name, expand(value, variables)) for name, value in assigned)
                continue
            words = [w for token in tokens for w in (expand(token, variables).split() if "$" in token else [token])]
            words = [w for word in words for w in braces(word)]
            if words[:1] == ["torchrun"]:
                rest = words[1:]
                while rest and rest[0].startswith("--"):
                    rest = rest[2:] if rest[0] in TORCHRUN_OPTIONS else rest[1:]
                if rest and rest[0].endswith(".py"):  # not "torchrun --nproc_per_node 2" said of any script
                    found.append((rest[0], rest[1:]))
            elif words[:1] == ["python"] and words[1:2] != ["-m"]:
                found.append((words[1], words[2:]))
            elif words[:1] == ["bash"]:
                found.append((words[1], None))
    return found


def inline_commands(path):
    """(line, command) of every `python ...`, `torchrun ...` or `bash ...` code span outside the blocks."""
    text = re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), path.read_text(), flags=re.M | re.S)
    return [(text.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split()))
            for m in re.finditer(r"`((?:python|torchrun|bash) [^`]+)`", text)]


BLOCKS = [(path, line, code, offline) for path in PAGES for line, code, offline in shell_blocks(path)]
COMMANDS = [(f"{path.relative_to(ROOT)}:{line}", script, args, offline)
            for path, line, code, offline in BLOCKS for script, args in commands(code)]
COMMANDS += [(f"{path.relative_to(ROOT)}:{line}", script, args, False)
             for path in PAGES for line, code in inline_commands(path) for script, args in commands(code)
             if script not in ("script.py", "...")]  # "python script.py", "python ...": any script


@pytest.fixture(scope="module")
def parsers():
    modules = {}

    def load(script):
        if script not in modules:
            spec = importlib.util.spec_from_file_location(f"doc_{script.replace('/', '_')[:-3]}", ROOT / script)
            modules[script] = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # tyro's errors inspect it
            spec.loader.exec_module(modules[script])
        return modules[script]
    return load


def test_the_docs_have_commands_to_check():
    assert len(PAGES) >= 20 and len(COMMANDS) >= 40
    assert sum(offline for *_, offline in COMMANDS) >= 4
    assert {script for _, script, _, _ in COMMANDS} >= {*SCRIPTS, "tools/quickstart.py", "tools/compare.py"}


@pytest.mark.parametrize("where,script,args,offline", COMMANDS, ids=[f"{c[0]}:{c[1]}" for c in COMMANDS])
def test_every_command_names_a_script_and_its_arguments_parse(where, script, args, offline, parsers):
    assert (ROOT / script).is_file(), f"{where}: {script} does not exist"
    if args is None or not script.endswith(".py"):
        return
    args = [a for a in args if a != "..."]  # "rloo.py ... --rloo.k 4": the same command as above, but for these
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            tyro.cli(parsers(script).Args, args=args, use_underscores=True)
    except SystemExit as e:
        if e.code not in (0, None):  # 0: --help
                pytest.fail(f"{where}: {script} refuses {' '.join(args)}:\n{stderr.getvalue()[-2000:]}")
    if offline:
        for flag, value in zip(args, args[1:]):
            if LOCAL_ONLY.match(flag):
                path = value.split(":")[0]  # --reward_fn file.py:function
                assert path.startswith("runs/") or (ROOT / path).exists(), \
                    f"{where}: an offline command names {flag} {value}, which is not a local path"


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation other than - and _ removed, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    seen, result = {}, set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.M):
        base = slug(heading)
        result.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return result


def links(path):
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_slugs_follow_github():
    assert slug("Comparing the algorithms (`tools/compare.py`)") == "comparing-the-algorithms-toolscomparepy"
    assert slug("The GPT-2 / SST-2 example") == "the-gpt-2--sst-2-example"
    assert slug("GPU check (`bench/gpu_check.py`)") == "gpu-check-benchgpu_checkpy"


@pytest.mark.parametrize("path", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_resolves(path):
    for target in links(path):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        assert resolved.exists(), f"{path.name}: link {target} -> {resolved} does not exist"
        if anchor:
            assert resolved.suffix == ".md" and anchor in anchors(resolved), \
                f"{path.name}: link {target}: no heading with that anchor in {resolved.name}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_docstring_ends_with_its_page(script):
    docstring = ast.get_docstring(ast.parse((ROOT / script).read_text()))
    last = docstring.strip().splitlines()[-1]
    assert re.fullmatch(r"Documentation: docs/[\w-]+\.md", last), f"{script}: docstring ends with {last!r}"
    page = ROOT / last.split(": ")[1]
    assert page.exists() and f"`{script}`" in page.read_text(), f"{script}: {page} is missing or does not name it"
