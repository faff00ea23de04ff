"""Turn a summarize_from_feedback_details reward model (`ScalarModel`) into an ordinary sequence classifier.

The TL;DR reward models of summarize_from_feedback_details (sfd; the REBEL code uses the same class) are saved as a
`ScalarModel`: an `AutoModel` backbone under `lm_backbone.*`, a linear head with a bias `scalar_head.{weight,bias}`,
and `config.bias` (the mean reward of the reference summaries, subtracted from the head's output), with
`"architectures": ["ScalarModel"]`, the backbone's config nested under `base_config` and no `model_type`, so
`AutoModelForSequenceClassification` cannot load them. sfd reads the reward at the last token before the first pad
token ([PAD], which its tokenizer adds; not EOS), i.e. at the last real token, which is the EOS its texts end with:

    reward = scalar_head(last_hidden_state[last real token]) - config.bias

This writes the same weights as the backbone's sequence classifier (GPTNeoXForSequenceClassification for Pythia),
num_labels 1, pad token [PAD], with the tokenizer, so `score.py`, `ppo.py` and the other online scripts load it
unchanged and read the reward at the same token. That class's head `score` has no bias, so the constant
c = scalar_head.bias - config.bias is folded into the bias of the backbone's final LayerNorm, whose output feeds only
the head: that bias gains delta = c * w / (w . w) (w the head's weights), so the head reads w . (h + delta) = w . h + c
for every hidden state h. Exact in real arithmetic; in fp32 it differs from sfd's own forward by rounding, checked on
padded probe texts before the folder is moved into place (and in tests/test_convert_sfd_reward.py, to 1e-5). The
output is written to a temporary folder and renamed, so a failed conversion leaves nothing at --output_dir.

    python tools/convert_sfd_reward.py --input vwxyzjn/EleutherAI_pythia-1b-deduped__reward__tldr \\
        --revision reward__55513__1706651113 --output_dir runs/sfd_reward_1b

Documentation: docs/tldr.md
"""

import glob
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass

import torch
import tyro
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "chat_template.jinja")
NOT_MODEL_CONFIG = ("architectures", "_name_or_path", "torch_dtype", "dtype", "transformers_version", "model_type")
PROBES = (  # texts in sfd's reward-model format: query + response + EOS (the tokenizer's EOS is appended)
    "SUBREDDIT: r/test\n\nTITLE: A title\n\nPOST: A short post about a day out.\n\nTL;DR: a day out",
    "SUBREDDIT: r/relationships\n\nTITLE: Should I call her back?\n\nPOST: We met last week and talked for hours. She "
    "has not written since, and I do not know whether to call.\n\nTL;DR: met someone, no news since, call or wait?",
    "TL;DR: short",
)


@dataclass
class Args:
    input: str
    """a ScalarModel folder, or its Hugging Face hub id (sfd's reward.py pushes each run to a branch: see --revision)"""
    output_dir: str
    """where the sequence-classification folder is written (must not exist, or be empty)"""
    revision: str | None = None
    """branch, tag or commit of a hub --input (e.g. reward__55513__1706651113); the default branch when None"""
    tokenizer: str | None = None
    """tokenizer to save with the model when --input has none (sfd's reward.py saves one): its base model's, e.g.
    EleutherAI/pythia-1b-deduped; a [PAD] token is added as sfd does when it has no pad token distinct from EOS"""
    check: bool = True
    """before writing, compare the converted model's rewards with sfd's forward on a few padded probe texts"""
    tolerance: float = 1e-5
    """largest |converted - sfd| reward difference the check accepts, relative to max(1, |reward|)"""


def resolve(args):
    """The local folder of --input: the folder itself, or a snapshot of the hub repository (config, weights and
    tokenizer files only)."""
    if os.path.isdir(args.input):
        return args.input
    if os.path.exists(args.input) or args.input.count("/") != 1:
        raise SystemExit(f"--input {args.input}: not a folder, nor a hub id (owner/name)")
    from huggingface_hub import snapshot_download
    try:  # the config alone first: a folder that is not a ScalarModel is refused before gigabytes of weights come
        read_scalar_config(snapshot_download(args.input, revision=args.revision, allow_patterns=["config.json"]),
                           f"--input {args.input}")
        return snapshot_download(args.input, revision=args.revision,
                                 allow_patterns=["config.json", *WEIGHT_FILES, "*.bin", "*.safetensors",
                                                 *TOKENIZER_FILES])
    except SystemExit:
        raise
    except Exception as e:  # offline, unknown repository or revision, no access: all end here, named
        raise SystemExit(f"--input {args.input} (revision {args.revision}): not a folder here, and the hub did not "
                         f"give it ({type(e).__name__}: {e})") from None


def read_scalar_config(folder, arg):
    """sfd's config.json, checked: a ScalarModel with a nested base_config, or a clear error naming the folder."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise SystemExit(f"{arg}: {folder} has no config.json; expected a ScalarModel reward model folder")
    with open(path) as f:
        config = json.load(f)
    architectures = config.get("architectures") or []
    if config.get("model_type") and any(a.endswith("ForSequenceClassification") for a in architectures):
        raise SystemExit(f"{arg}: {folder} is already a sequence classifier ({', '.join(architectures)}); "
                         "score.py, ppo.py and the other online scripts load it as it is: nothing to convert")
    base = config.get("base_config")
    if "ScalarModel" not in architectures or not isinstance(base, dict) or not base.get("model_type"):
        raise SystemExit(f"{arg}: {folder} is neither a ScalarModel reward model (architectures {architectures}, "
                         "expected ['ScalarModel'] with the backbone's config, model_type included, under "
                         "base_config) nor a sequence classifier")
    return config


def load_weights(folder, arg):
    """The state dict of a folder: model.safetensors or pytorch_model.bin (sfd saves .bin), whole or sharded."""
    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        files = [path]
        if name.endswith(".index.json"):
            with open(path) as f:
                files = [os.path.join(folder, shard) for shard in sorted(set(json.load(f)["weight_map"].values()))]
        state = {}
        try:
            for file in files:
                state.update(load_file(file) if file.endswith(".safetensors")
                             else torch.load(file, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:
            raise SystemExit(f"{arg}: cannot read the weights {file} ({type(e).__name__}: {e})") from None
        return state
    found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*")))
    raise SystemExit(f"{arg}: {folder} has no weights (expected one of {', '.join(WEIGHT_FILES)}; found {found})")


def target_config(scalar_config, pad_token_id, dtype):
    """The backbone's config as a sequence classifier's: num_labels 1, the pad token the reward is read before."""
    base = dict(scalar_config["base_config"])
    config = AutoConfig.for_model(base["model_type"], **{k: v for k, v in base.items() if k not in NOT_MODEL_CONFIG})
    config.num_labels = 1
    config.pad_token_id = pad_token_id
    config.dtype = dtype
    return config


def final_norm_name(model):
    """The parameter-name prefix of the backbone's final LayerNorm (the last LayerNorm with a bias among its direct
    children: GPT-NeoX's final_layer_norm, GPT-2's ln_f), or None."""
    base = getattr(model, model.base_model_prefix)
    norms = [name for name, module in base.named_children()
             if isinstance(module, torch.nn.LayerNorm) and module.bias is not None]
    return f"{model.base_model_prefix}.{norms[-1]}" if norms else None


def convert_state(state, scalar_config, model, arg):
    """The ScalarModel's tensors under the sequence classifier's names, with c = head bias - config.bias folded
    into the final LayerNorm's bias; returns (tensors, c, folded_into, delta in fp64)."""
    expected = model.state_dict()
    prefix = model.base_model_prefix
    for name in ("scalar_head.weight", "scalar_head.bias"):
        if name not in state:
            raise SystemExit(f"{arg}: the weights have no {name} (a ScalarModel's head); their names start with "
                             f"{sorted({k.split('.')[0] for k in state})}")
    out = {f"{prefix}.{k[len('lm_backbone.'):]}": v for k, v in state.items() if k.startswith("lm_backbone.")}
    out["score.weight"] = state["scalar_head.weight"]
    others = sorted(k for k in state if not k.startswith(("lm_backbone.", "scalar_head.")))
    missing = sorted(set(expected) - set(out))
    if others or missing:
        raise SystemExit(f"{arg}: the weights do not match a ScalarModel over {type(model).__name__}: "
                         f"missing {missing[:5]}, unknown {others[:5]}")
    buffers = [*(type(model)._keys_to_ignore_on_load_unexpected or []), r"rotary_emb\.inv_freq$"]
    unknown = sorted(k for k in set(out) - set(expected) if not any(re.search(p, k) for p in buffers))
    if unknown:
        raise SystemExit(f"{arg}: the weights do not match a ScalarModel over {type(model).__name__}: unknown "
                         f"{unknown[:5]}")
    out = {k: v for k, v in out.items() if k in expected}  # old transformers saved some buffers (attention masks)
    for name, tensor in out.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise SystemExit(f"{arg}: {name} has shape {tuple(tensor.shape)}, but base_config makes it "
                             f"{tuple(expected[name].shape)}")
    norm = final_norm_name(model)
    if norm is None:
        raise SystemExit(f"{arg}: {type(model).__name__}'s backbone has no final LayerNorm with a bias, so the "
                         "head's constant cannot be folded in exactly; this converter supports such backbones only "
                         "(GPT-NeoX/Pythia, which sfd and REBEL use)")
    w = state["scalar_head.weight"].double().reshape(-1)
    c = float(state["scalar_head.bias"].double().reshape(())) - float(scalar_config.get("bias", 0.0))
    if c != 0 and not (w @ w) > 0:
        raise SystemExit(f"{arg}: scalar_head.weight is zero, so the constant {c} cannot be folded into its input")
    delta = c * w / (w @ w) if c != 0 else torch.zeros_like(w)
    bias = out[f"{norm}.bias"]
    out[f"{norm}.bias"] = (bias.double() + delta).to(bias.dtype)
    return {k: v.contiguous() for k, v in out.items()}, c, f"{norm}.bias", delta


def load_tokenizer(folder, args):
    """The tokenizer saved with the model, with a pad token distinct from EOS ([PAD], as sfd adds), right padding."""
    source = folder if any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES[:2]) else args.tokenizer
    if source is None:
        raise SystemExit(f"--input {args.input}: {folder} has no tokenizer; pass --tokenizer (the base model's, e.g. "
                         "EleutherAI/pythia-1b-deduped)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise SystemExit(f"cannot load the tokenizer of {source} ({e})") from None
    if tokenizer.eos_token_id is None:
        raise SystemExit(f"the tokenizer of {source} has no EOS token; sfd's reward texts end with one")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})  # sfd's own pad token, never in a text
    tokenizer.padding_side = "right"
    return tokenizer


def sfd_reward_reference(model, norm_bias, original_bias, w, b, bias, ids, pad_id):
    """sfd's reward, computed its way: the backbone with its original final-LayerNorm bias, pads masked (ids set to
    0), the head and config.bias at the last token before the first pad (first_true_indices(ids == pad) - 1)."""
    with torch.no_grad():
        saved = norm_bias.detach().clone()
        norm_bias.copy_(original_bias)
        try:
            mask = ids != pad_id
            hidden = getattr(model, model.base_model_prefix)(input_ids=ids.masked_fill(~mask, 0),
                                                             attention_mask=mask.long()).last_hidden_state
        finally:
            norm_bias.copy_(saved)
        is_pad = ids == pad_id
        first_pad = torch.where(is_pad.any(1), is_pad.long().argmax(1), torch.full_like(ids[:, 0], ids.shape[1]))
        rows = torch.arange(len(ids))
        return (hidden[rows, first_pad - 1].double() @ w + b - bias).float()


def check(folder, tokenizer, original_bias, scalar_config, state, norm_param, args):
    """Load the written folder as the online scripts do and compare its rewards with sfd's on padded probe texts;
    also that every tensor but the folded bias is the source's, unchanged. Returns the largest difference."""
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    written = model.state_dict()
    prefix = model.base_model_prefix
    for name, tensor in state.items():
        target = "score.weight" if name == "scalar_head.weight" else f"{prefix}.{name[len('lm_backbone.'):]}"
        if target in written and target != norm_param and not torch.equal(written[target], tensor.float()):
            raise SystemExit(f"check failed: {target} differs from the source's {name}")
    texts = [t + tokenizer.eos_token for t in PROBES]
    enc = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    ids = enc.input_ids.masked_fill(enc.attention_mask == 0, tokenizer.pad_token_id)
    with torch.no_grad():
        converted = model(input_ids=ids, attention_mask=enc.attention_mask).logits[:, 0]
    reference = sfd_reward_reference(model, model.get_parameter(norm_param), original_bias.float(),
                                     state["scalar_head.weight"].double().reshape(-1),
                                     float(state["scalar_head.bias"].double().reshape(())),
                                     float(scalar_config.get("bias", 0.0)), ids, tokenizer.pad_token_id)
    diff = ((converted - reference).abs() / reference.abs().clamp(min=1.0)).max().item()
    print(f"check: rewards of {len(texts)} padded probe texts, converted {converted.tolist()} vs sfd's "
          f"{reference.tolist()}; largest relative difference {diff:.2e}")
    if not diff <= args.tolerance:
        raise SystemExit(f"check failed: the converted rewards differ from sfd's by {diff:.2e} (> --tolerance "
                         f"{args.tolerance}); nothing written")
    return diff


def main(args: Args):
    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir) or os.path.isfile(args.output_dir):
        raise SystemExit(f"--output_dir {args.output_dir}: already exists and is not empty; choose another folder")
    folder = resolve(args)
    scalar_config = read_scalar_config(folder, f"--input {args.input}")
    tokenizer = load_tokenizer(folder, args)
    state = load_weights(folder, f"--input {args.input}")
    # fp32 output whatever the source's dtype (sfd's are fp32; some hub copies are bf16): the folded bias stays exact,
    # and every script here loads fp32 master weights anyway
    state, dtype = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, torch.float32
    config = target_config(scalar_config, tokenizer.pad_token_id, dtype)
    if tokenizer.pad_token_id >= config.vocab_size:
        raise SystemExit(f"--input {args.input}: the pad token {tokenizer.pad_token!r} has id "
                         f"{tokenizer.pad_token_id}, outside the model's {config.vocab_size} embeddings")
    cls = AutoModelForSequenceClassification._model_mapping[type(config)]
    with torch.device("meta"):
        model = cls(config)
    tensors, c, norm_param, delta = convert_state(state, scalar_config, model, f"--input {args.input}")
    original_bias = state[f"lm_backbone.{norm_param[len(model.base_model_prefix) + 1:]}"]
    config.architectures = [cls.__name__]
    config.sfd_conversion = {  # provenance, read by nobody: what was folded where
        "source": args.input, "revision": args.revision, "scalar_head_bias": c + float(scalar_config.get("bias", 0.0)),
        "config_bias": float(scalar_config.get("bias", 0.0)), "constant": c, "folded_into": norm_param}
    model.load_state_dict(tensors, strict=False, assign=True)  # the meta model takes the tensors, no copy

    parent = os.path.dirname(os.path.abspath(args.output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(args.output_dir))}.", dir=parent)
    try:
        model.config = config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if args.check:
            check(tmp, tokenizer, original_bias, scalar_config, state, norm_param, args)
        if os.path.isdir(args.output_dir):
            os.rmdir(args.output_dir)  # empty (checked above); a folder that filled meanwhile stops the rename
        os.rename(tmp, args.output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {args.output_dir}: {cls.__name__}, num_labels 1, pad token {tokenizer.pad_token!r} (id "
          f"{tokenizer.pad_token_id}, EOS id {tokenizer.eos_token_id}); constant {c:+.6g} (head bias "
          f"{config.sfd_conversion['scalar_head_bias']:+.6g} - config.bias {config.sfd_conversion['config_bias']:+.6g})"
          f" folded into {norm_param} (|delta| {delta.norm().item():.3g})")


if __name__ == "__main__":
    main(tyro.cli(Args, use_underscores=True))
