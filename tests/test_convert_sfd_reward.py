"""tools/convert_sfd_reward.py: a tiny reward model saved the way summarize_from_feedback_details (sfd) saves its
`ScalarModel` (config.json shape, state-dict names, pytorch_model.bin, tokenizer with [PAD]) is converted, loaded as
the online scripts load a reward model, and its rewards compared with sfd's own forward, written out here as the slow
reference; plus bad inputs, the atomic write, and an sfd SFT policy folder loading as it is."""

import json
import os
import sys

import pytest
import torch
from conftest import ROOT, TINY_GPT2, run
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    GPTNeoXModel,
)

import ppo
import score

sys.path.insert(0, str(ROOT / "tools"))
import convert_sfd_reward  # noqa: E402

BASE_CONFIG = {  # a Pythia-shaped backbone config as transformers 4.33 nested it under base_config
    "_name_or_path": "models/EleutherAI/pythia-1b-deduped/sft_model_55513", "architectures": ["GPTNeoXForCausalLM"],
    "model_type": "gpt_neox", "vocab_size": 1040, "hidden_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "intermediate_size": 128, "rotary_pct": 0.25, "rotary_emb_base": 10000,
    "max_position_embeddings": 256, "use_parallel_residual": True, "layer_norm_eps": 1e-5, "bos_token_id": 0,
    "eos_token_id": 0, "hidden_act": "gelu", "attention_dropout": 0.0, "hidden_dropout": 0.0,
    "tie_word_embeddings": False, "torch_dtype": "float32"}
HEAD_BIAS, CONFIG_BIAS = 0.7, -0.4  # c = 1.1: a conversion that dropped either would be off by it
QUERIES = ["SUBREDDIT: r/movies\n\nTITLE: A film\n\nPOST: I saw a film about a dog and loved it.\n\nTL;DR:",
           "SUBREDDIT: r/test\n\nTITLE: Short\n\nPOST: One line.\n\nTL;DR:"]
RESPONSES = [" loved a dog film", " a very short post with a longer summary than the post itself", " one line",
             " x"]


def backbone_config():
    return GPTNeoXConfig(**{k: v for k, v in BASE_CONFIG.items()
                            if k not in ("_name_or_path", "architectures", "model_type", "torch_dtype")})


def sfd_tokenizer(folder, pad):
    """tiny-gpt2's BPE (EOS <|endoftext|> = id 0, as Pythia's) saved as sfd saves Pythia's: pad [PAD] (pad="[PAD]"),
    or with pad = EOS and the generic class (pad="eos")."""
    tokenizer = AutoTokenizer.from_pretrained(TINY_GPT2)
    if pad == "[PAD]":
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    else:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(folder)
    if pad == "[PAD]":  # as transformers 4.33 (sfd's) writes it: the pad token only in special_tokens_map.json
        path = os.path.join(folder, "tokenizer_config.json")
        with open(path) as f:
            config = {k: v for k, v in json.load(f).items() if k != "pad_token"}
        with open(path, "w") as f:
            json.dump({**config, "tokenizer_class": "GPTNeoXTokenizer"}, f)  # what sfd's Pythia folders name
        with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
            json.dump({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "[PAD]",
                       "unk_token": "<|endoftext|>"}, f)
    return AutoTokenizer.from_pretrained(folder)


def make_scalar_model(folder, pad="[PAD]"):
    """A ScalarModel folder as sfd's reward.py writes it; returns (backbone, head) for the reference forward."""
    torch.manual_seed(0)
    backbone = GPTNeoXModel(backbone_config()).eval()
    with torch.no_grad():
        for parameter in backbone.parameters():  # off the init's zeros and ones: the final LayerNorm's bias matters
            parameter.add_(0.05 * torch.randn_like(parameter))
    head = torch.nn.Linear(64, 1)
    torch.nn.init.normal_(head.weight, std=1 / (64 + 1) ** 0.5)  # sfd's layer_init of scalar_head
    torch.nn.init.constant_(head.bias, HEAD_BIAS)
    os.makedirs(folder, exist_ok=True)
    state = {f"lm_backbone.{k}": v for k, v in backbone.state_dict().items()}
    state["lm_backbone.layers.0.attention.masked_bias"] = torch.tensor(-1e9)  # a buffer old transformers saved
    state.update({"scalar_head.weight": head.weight.detach(), "scalar_head.bias": head.bias.detach()})
    torch.save(state, os.path.join(folder, "pytorch_model.bin"))  # sfd saves with safe_serialization=False
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"architectures": ["ScalarModel"], "base_config": BASE_CONFIG, "base_model": BASE_CONFIG[
            "_name_or_path"], "bias": CONFIG_BIAS, "hidden_size": 64, "torch_dtype": "float32",
                   "transformers_version": "4.33.2"}, f, indent=2)  # no model_type, as ScalarModelConfig writes it
    sfd_tokenizer(folder, pad)
    return backbone, head


def first_true_indices(bools):
    row_len = bools.size(-1)
    return torch.min(row_len * (~bools).long() + torch.arange(row_len), dim=-1).values


def sfd_get_reward(backbone, head, query_responses, pad_id, context_length):
    """sfd's get_reward with its ScalarModel forward: pads masked and set to 0, no position ids, the head on the last
    hidden state minus config.bias, read at the last token before the first pad after the query."""
    attention_mask = query_responses != pad_id
    input_ids = torch.masked_fill(query_responses, ~attention_mask, 0)
    with torch.no_grad():
        output = backbone(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        reward_logits = head(output.hidden_states[-1]) - CONFIG_BIAS
    sequence_lengths = first_true_indices(query_responses[:, context_length:] == pad_id) - 1 + context_length
    return reward_logits[torch.arange(len(query_responses)), sequence_lengths].squeeze(-1)


def sfd_batch(tokenizer, pad_id):
    """sfd's rollout layout: queries left-padded with [PAD] to one width, responses cut after EOS and right-padded
    (one response ends without EOS, as a truncated one does); and the same texts as plain token lists."""
    queries = [tokenizer(q).input_ids for q in QUERIES]
    width = max(map(len, queries)) + 3
    rows, sequences = [], []
    for i, response in enumerate(RESPONSES):
        query = queries[i % len(queries)]
        tokens = tokenizer(response).input_ids + ([tokenizer.eos_token_id] if i != 1 else [])
        rows.append([pad_id] * (width - len(query)) + query + tokens + [pad_id] * (40 - len(tokens)))
        sequences.append(query + tokens)
    return torch.tensor(rows), width, sequences


@pytest.mark.parametrize("pad", ["[PAD]", "eos"])
def test_converted_rewards_equal_sfd_scalar_model(tmp_path, pad):
    backbone, head = make_scalar_model(tmp_path / "sfd", pad)
    out = tmp_path / "converted"
    if pad == "[PAD]":  # as a user runs it; the other case in-process (seconds saved)
        proc = run("tools/convert_sfd_reward.py", "--input", tmp_path / "sfd", "--output_dir", out)
        assert "largest relative difference" in proc.stdout
        assert "+1.1 (head bias +0.7 - config.bias -0.4)" in proc.stdout
    else:
        convert(tmp_path, tmp_path / "sfd", output="converted")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPTNeoXForSequenceClassification"] and len(config["id2label"]) == 1
    assert config["sfd_conversion"]["constant"] == pytest.approx(HEAD_BIAS - CONFIG_BIAS)
    assert sorted(os.listdir(tmp_path)) == ["converted", "sfd"]  # no temporary folder left

    # loaded and read exactly as ppo.py (and rloo/grpo/rebel_online) load and read a reward model
    rm_tokenizer = ppo.load_tokenizer(str(out), "--reward_model_name_or_path", needs_eos=False)
    assert rm_tokenizer.pad_token_id != rm_tokenizer.eos_token_id  # else the trailing EOS would count as padding
    if pad == "[PAD]":
        assert rm_tokenizer.pad_token == "[PAD]"
    model = ppo.load_pretrained(AutoModelForSequenceClassification, str(out), "--reward_model_name_or_path",
                                ppo.Args())
    model.config.pad_token_id = rm_tokenizer.pad_token_id
    model = ppo.freeze(model)
    rows, width, sequences = sfd_batch(rm_tokenizer, rm_tokenizer.pad_token_id)
    reference = sfd_get_reward(backbone, head, rows, rm_tokenizer.pad_token_id, width)
    converted = ppo.score(model, sequences, rm_tokenizer.pad_token_id, 3, torch.device("cpu"))
    torch.testing.assert_close(converted, reference, atol=1e-5, rtol=0)
    # and as score.py reads it (its own right padding), one batch
    rewards = score.reward_batch(model, sequences, rm_tokenizer.pad_token_id, torch.device("cpu"))
    torch.testing.assert_close(torch.tensor(rewards), reference, atol=1e-5, rtol=0)
    dropped = reference - (HEAD_BIAS - CONFIG_BIAS)  # what a conversion without the constant would give
    assert (converted - dropped).abs().min() > 1


def convert(tmp_path, source, output="out", **kwargs):
    convert_sfd_reward.main(convert_sfd_reward.Args(input=str(source), output_dir=str(tmp_path / output), **kwargs))


def test_not_a_scalar_model_is_refused_naming_the_folder(tmp_path):
    policy = tmp_path / "policy"
    GPTNeoXForCausalLM(backbone_config()).save_pretrained(policy)
    with pytest.raises(SystemExit, match=f"{policy} is neither a ScalarModel reward model"):
        convert(tmp_path, policy)
    with pytest.raises(SystemExit, match=f"{tmp_path / 'empty'} has no config.json"):
        os.makedirs(tmp_path / "empty")
        convert(tmp_path, tmp_path / "empty")
    with pytest.raises(SystemExit, match="not a folder, nor a hub id"):
        convert(tmp_path, tmp_path / "missing")
    assert not (tmp_path / "out").exists()


def test_a_sequence_classifier_is_refused_it_loads_as_it_is(tmp_path):
    classifier = tmp_path / "rm"
    config = backbone_config()
    config.num_labels = 1
    AutoModelForSequenceClassification.from_config(config).save_pretrained(classifier)
    with pytest.raises(SystemExit, match=f"{classifier} is already a sequence classifier .*nothing to convert"):
        convert(tmp_path, classifier)


def test_bad_weights_and_a_failed_check_leave_nothing_written(tmp_path):
    make_scalar_model(tmp_path / "sfd")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(SystemExit, match="taken: already exists and is not empty"):
        convert(tmp_path, tmp_path / "sfd", output="taken")
    with pytest.raises(SystemExit, match="check failed"):  # fails after the files are written: the temp folder goes
        convert(tmp_path, tmp_path / "sfd", tolerance=-1.0)
    assert sorted(os.listdir(tmp_path)) == ["sfd", "taken"]
    state = torch.load(tmp_path / "sfd" / "pytorch_model.bin", weights_only=True)
    del state["scalar_head.bias"]
    torch.save(state, tmp_path / "sfd" / "pytorch_model.bin")
    with pytest.raises(SystemExit, match="the weights have no scalar_head.bias"):
        convert(tmp_path, tmp_path / "sfd")
    (tmp_path / "sfd" / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="cannot read the weights .*pytorch_model.bin"):
        convert(tmp_path, tmp_path / "sfd")
    assert sorted(os.listdir(tmp_path)) == ["sfd", "taken"]


def test_an_sfd_sft_policy_folder_loads_as_it_is(tmp_path):
    """sfd's sft.py saves AutoModelForCausalLM (model_type gpt_neox) with safe_serialization=False, the tokenizer with
    [PAD], and a generation config without eos (it set generation_config.eos_token_id = None): the policy, its
    tokenizer and its stop token load here as they are."""
    folder = tmp_path / "sft"
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(backbone_config())
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    model.save_pretrained(folder)  # transformers 5 writes safetensors only: swapped for sfd's pytorch_model.bin
    os.remove(folder / "model.safetensors")
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    assert json.loads((folder / "config.json").read_text())["model_type"] == "gpt_neox"
    tokenizer = sfd_tokenizer(folder, "[PAD]")
    loaded = ppo.load_pretrained(AutoModelForCausalLM, str(folder), "--model_name_or_path", ppo.Args())
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert ppo.load_tokenizer(str(folder)).pad_token == "[PAD]"
    assert ppo.stop_token_ids(tokenizer, str(folder)) == [tokenizer.eos_token_id]


def test_a_hub_input_is_checked_from_its_config_before_any_weights_download(tmp_path, monkeypatch):
    """A hub repository that is not a ScalarModel is refused after its config.json alone came down."""
    import huggingface_hub

    (tmp_path / "snapshot").mkdir()
    (tmp_path / "snapshot" / "config.json").write_text(json.dumps(
        {"model_type": "gpt_neox", "architectures": ["GPTNeoXForSequenceClassification"]}))
    calls = []

    def fake_download(repo_id, revision=None, allow_patterns=None):
        calls.append(allow_patterns)
        return str(tmp_path / "snapshot")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    args = convert_sfd_reward.Args(input="someone/reward", output_dir=str(tmp_path / "out"))
    with pytest.raises(SystemExit, match="already a sequence classifier"):
        convert_sfd_reward.main(args)
    assert calls == [["config.json"]] and not (tmp_path / "out").exists()
