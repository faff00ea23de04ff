"""The code-shape rules that keep the scripts standalone yet consistent: helpers copied between scripts are identical
copies, no top-level script imports another, nothing runs at import time, and every Args field has a docstring."""

import ast

import pytest
from conftest import ROOT

SCRIPTS = sorted(p for p in ("sft_sst2.py", "sft.py", "reward_sst2.py", "reward.py", "ppo.py", "rebel.py", "dpo.py",
                             "rebel_online.py", "rloo.py", "grpo.py", "generate.py", "score.py", "filter.py")
                 if (ROOT / p).exists())
TRAINING = [p for p in ("sft_sst2.py", "sft.py", "reward_sst2.py", "reward.py", "ppo.py", "rebel.py", "dpo.py",
                        "rebel_online.py", "rloo.py", "grpo.py") if p in SCRIPTS]
ONLINE = [p for p in ("ppo.py", "rebel_online.py", "rloo.py", "grpo.py") if p in SCRIPTS]  # ppo.py's rollout block
CORE = {"init_distributed", "all_reduce", "load_split", "require_columns", "check_output_dir", "create_output_dir",
        "save_checkpoint", "load_checkpoint", "Preemption", "step_if_finite", "checkpoint_or_stop", "Logger",
        "save_model_atomically", "lr_at", "Progress"}
# helpers above main that a script copied from another (same name, same code), outside the shared blocks
COPIED = [(("trimmed_batch", "chunk_logprobs", "SequenceLogprobs", "check_logprob_path", "build_model", "fingerprint",
            "sharded_pass", "reference_logprobs"), ("rebel.py", "dpo.py")),
          (("without_dropout",), ("sft_sst2.py", "sft.py", "reward_sst2.py", "reward.py", "ppo.py", "rebel.py",
                                  "dpo.py")),
          (("end_of_turn_id",), ("filter.py", "generate.py", "dpo.py", "ppo.py", "sft.py")),
          (("stop_token_ids",), ("filter.py", "generate.py", "ppo.py", "sft.py")),  # one stop set for every stage
          (("describe_stop_ids",), ("generate.py", "ppo.py")),
          (("probe_attention", "probe_tolerance"), ("rebel.py", "dpo.py", "ppo.py")),  # one probe rule everywhere
          (("pad_to",), ("filter.py", "dpo.py"))]


def top_level(path):
    source = (ROOT / path).read_text()
    tree = ast.parse(source)
    return source, tree, {node.name: ast.get_source_segment(source, node) for node in tree.body
                          if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def shared_block_names(path, heading="shared, as identical copies"):
    """Names defined in the script's blocks whose heading holds `heading` (the infrastructure block of every script,
    the rollout block of the online scripts). A block runs from its heading to the next `# ----` line or the
    `__main__` guard; the blocks sit below `main`, so the algorithm reads first."""
    source, tree, _ = top_level(path)
    lines = source.splitlines()
    names = set()
    for start in (i for i, line in enumerate(lines) if line.startswith("# ") and heading in line):
        end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith(("# ----", "if __name__")))
        names |= {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))
                  and start < node.lineno - 1 < end}
    return names


@pytest.mark.parametrize("path", ONLINE[1:])
def test_online_scripts_carry_the_whole_rollout_block(path):
    """rebel_online.py, rloo.py and grpo.py copy ppo.py's rollout machinery (sampling with either backend, the weight
    push, chunked logprobs, rewards, evaluation, model loading and sharding) whole; the identical-copies test below
    then checks every function of it."""
    expected = shared_block_names("ppo.py", "rollout machinery shared")
    assert expected >= {"sample", "sampling_noise", "Sampler", "push_weights", "vllm_sample", "chunked_logprobs",
                        "CausalLogprobs", "Rewards", "reward_inputs", "evaluate_policy", "load_prompts", "shard"}
    assert shared_block_names(path, "rollout machinery shared") == expected


@pytest.mark.parametrize("path", SCRIPTS)
def test_algorithm_reads_before_the_infrastructure(path):
    """Reading order: docstring, Args, the algorithm's helpers, main, then the shared infrastructure block."""
    _, tree, defs = top_level(path)
    names = [node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    shared = shared_block_names(path)
    assert shared_block_names(path, "infrastructure shared"), f"{path} has no shared infrastructure block"
    assert names.index("main") < min(names.index(n) for n in shared), f"{path}: shared block is above main"
    assert names[names.index("main") + 1:] == [n for n in names if n in shared], f"{path}: own helpers after main"


def test_shared_helpers_are_identical_copies():
    definitions = {path: top_level(path)[2] for path in SCRIPTS}
    shared = set().union(*(shared_block_names(path) for path in SCRIPTS))
    assert CORE <= shared
    for name in sorted(shared):
        copies = {path: defs[name] for path, defs in definitions.items() if name in defs}
        first = next(iter(copies.values()))
        different = [path for path, src in copies.items() if src != first]
        assert not different, f"{name} differs between {sorted(copies)}: {different}"


@pytest.mark.parametrize("names,paths", COPIED)
def test_helpers_copied_above_main_are_identical(names, paths):
    definitions = {path: top_level(path)[2] for path in paths if path in SCRIPTS}
    for name in names:
        copies = {path: defs.get(name) for path, defs in definitions.items()}
        assert None not in copies.values(), f"{name} is missing from {[p for p, c in copies.items() if c is None]}"
        different = [path for path, src in copies.items() if src != next(iter(copies.values()))]
        assert not different, f"{name} differs between {sorted(copies)}: {different}"


@pytest.mark.parametrize("path", TRAINING)
def test_training_scripts_share_the_core_helpers(path):
    assert CORE <= set(top_level(path)[2])


@pytest.mark.parametrize("path", SCRIPTS)
def test_script_stands_alone_and_runs_nothing_at_import(path):
    _, tree, _ = top_level(path)
    own = {p[:-3] for p in SCRIPTS}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not {a.name.split(".")[0] for a in node.names} & own, f"{path} imports another script"
        if isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in own, f"{path} imports another script"
    for node in tree.body:  # only imports, definitions, constants and the __main__ guard at top level
        allowed = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)
        is_docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        is_main_guard = isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
        assert isinstance(node, allowed) or is_docstring or is_main_guard, f"{path}: {ast.unparse(node)[:80]}"


@pytest.mark.parametrize("path", SCRIPTS)
def test_every_args_field_has_a_docstring(path):
    _, tree, _ = top_level(path)
    dataclasses = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name.endswith("Args")]
    assert dataclasses, f"{path} has no Args dataclass"
    for cls in dataclasses:
        body = cls.body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign):
                following = body[i + 1] if i + 1 < len(body) else None
                documented = isinstance(following, ast.Expr) and isinstance(getattr(following, "value", None),
                                                                             ast.Constant)
                assert documented, f"{path}: {cls.name}.{ast.unparse(node.target)} has no docstring"
