"""reward_sst2.py: pairwise accuracy >= 0.9 offline, 2 ranks == 1 rank, the saved folder scores text on its own."""

import pytest
import torch
from conftest import (
    RM_ARGS,
    SST2,
    TINY_GPT2,
    assert_weights_equal,
    check_nonfinite_guard,
    check_preempt_and_resume,
    check_resume_from_checkpoint,
    check_resume_refuses_other_settings,
    metrics,
    run_into,
)

import reward_sst2

SHORT = ["--total_episodes", "320", "--local_micro_batch_size", "8", "--save_freq", "2", "--keep_checkpoints", "100"]


@pytest.fixture(scope="session")
def rm_short_1p(session_dir):
    return run_into("reward_sst2.py", RM_ARGS + SHORT, session_dir / "rm_short_1p")


@pytest.fixture(scope="session")
def rm_short_2p(session_dir):
    return run_into("reward_sst2.py", RM_ARGS + SHORT, session_dir / "rm_short_2p", nproc=2)


def test_bradley_terry_loss_matches_a_slow_reference():
    args = reward_sst2.Args(center_coef=0.01)
    r_w, r_l = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    expected = [-torch.log(1 / (1 + torch.exp(-(w - lo)))) + 0.01 * (w + lo) ** 2 for w, lo in zip(r_w, r_l)]
    torch.testing.assert_close(reward_sst2.pair_losses(r_w, r_l, args), torch.stack(expected))


def test_reward_model_reaches_090_pairwise_accuracy(reward_model):
    final = [m for m in metrics(reward_model) if "val/accuracy" in m][-1]
    assert final["val/accuracy"] >= 0.9, final
    assert final["val/sign_accuracy"] >= 0.8, final  # the centring term makes sign(r) meaningful


def test_saved_reward_model_scores_text_with_no_extra_code(reward_model):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(reward_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(reward_model)
    texts = ["a superb , moving and witty film .", "the plot is dull .", "it 's a mess , but the cast is terrific .",
             "boring"]
    with torch.no_grad():
        batched = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits[:, 0]
        one_by_one = torch.stack([model(**tokenizer(t, return_tensors="pt")).logits[0, 0] for t in texts])
        trained_path = reward_sst2.rewards(model, tokenizer(texts).input_ids, tokenizer.pad_token_id, "cpu")
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-5)  # read at the last real token
    torch.testing.assert_close(batched, trained_path)
    assert batched[0] > batched[1] and batched[2] > batched[3]


@pytest.mark.slow
def test_two_ranks_match_one_rank(rm_short_1p, rm_short_2p):
    assert_weights_equal(rm_short_1p, rm_short_2p, exact=False)
    one, two = metrics(rm_short_1p), metrics(rm_short_2p)
    assert [m["loss/reward_avg"] for m in one[1:]] == pytest.approx([m["loss/reward_avg"] for m in two[1:]], rel=1e-4)


def test_missing_label_column_fails_before_training(tmp_path):
    out = tmp_path / "out"
    args = reward_sst2.Args(model_name_or_path=str(TINY_GPT2), from_scratch=True, dataset=str(SST2),
                            label_column="sentiment", output_dir=str(out))
    with pytest.raises(ValueError, match=r"missing column\(s\) \['sentiment'\]"):
        reward_sst2.main(args)
    assert not out.exists()


def test_resume_from_a_checkpoint_is_exact(rm_short_1p, tmp_path):
    check_resume_from_checkpoint(reward_sst2, RM_ARGS + SHORT, rm_short_1p, tmp_path / "resumed", update=4)


@pytest.mark.slow
def test_preempted_two_rank_run_resumes_exactly(rm_short_2p, tmp_path):
    check_preempt_and_resume("reward_sst2.py", RM_ARGS + SHORT, rm_short_2p, tmp_path / "preempted", nproc=2)


def test_nonfinite_updates_are_skipped_then_stop_the_run(rm_short_1p, tmp_path, capsys):
    check_nonfinite_guard(reward_sst2, RM_ARGS + SHORT, rm_short_1p, tmp_path, good=2, capsys=capsys)


def test_resume_with_other_settings_is_refused(rm_short_1p, tmp_path, no_model_loading):
    check_resume_refuses_other_settings(reward_sst2, RM_ARGS + SHORT, rm_short_1p, tmp_path,
                                        [("--lr", "0.003", "0.01"), ("--center_coef", "0.01", "0.0")])
