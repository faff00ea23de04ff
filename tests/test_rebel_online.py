"""rebel_online.py: the loss against a slow per-pair reference, ratio 1 / KL 0 before the first step, 2 ranks == 1
rank (DDP and FSDP2), exact resume, the non-finite guard, whole pairs per rank, and a short offline run that clearly
raises the held-out reward-model score above the SFT policy's."""

import pytest
import torch
from conftest import (
    SST2,
    assert_same_run,
    check_nonfinite_guard,
    check_preempt_and_resume,
    check_resume_from_checkpoint,
    check_short_run_learns,
    learning_args,
    metrics,
    run_in_process,
    run_into,
)

import rebel_online


def test_loss_matches_a_slow_per_pair_reference():
    """The update's loss, from token logprobs to the minibatch mean (sequence sums over real tokens, rows 2i and 2i + 1
    a pair), against a per-pair Python loop: values and gradients."""
    g = torch.Generator().manual_seed(0)
    lengths = [5, 2, 7, 1, 3, 6]  # 3 pairs
    mask = (torch.arange(7)[None] < torch.tensor(lengths)[:, None]).float()
    new = (torch.randn(6, 7, generator=g, dtype=torch.float64) - 2).requires_grad_()
    old = torch.randn(6, 7, generator=g, dtype=torch.float64) - 2
    rewards = torch.randn(6, generator=g, dtype=torch.float64)
    eta, minibatch_pairs = 0.7, 4  # the mean runs over the pairs of the whole minibatch, here 3 of its 4
    losses, diff, target, log_ratio = rebel_online.rebel_losses((new * mask).sum(1).view(-1, 2),
                                                                ((old * mask).sum(1)).view(-1, 2), rewards.view(-1, 2),
                                                                eta)
    loss = losses.sum() / minibatch_pairs
    loss.backward()

    slow_new = new.detach().clone().requires_grad_()
    total = 0.0
    for p in range(3):
        ratios = []
        for row in (2 * p, 2 * p + 1):
            seq_new = sum(slow_new[row, t] for t in range(lengths[row]))
            seq_old = sum(old[row, t].item() for t in range(lengths[row]))
            ratios.append(seq_new - seq_old)
        expected_diff = ratios[0] - ratios[1]
        expected_target = eta * (rewards[2 * p].item() - rewards[2 * p + 1].item())
        assert diff[p].item() == pytest.approx(expected_diff.item(), abs=1e-12)
        assert target[p].item() == pytest.approx(expected_target, abs=1e-12)
        assert losses[p].item() == pytest.approx((expected_diff.item() - expected_target) ** 2, abs=1e-12)
        total = total + (expected_diff - expected_target) ** 2
    slow_loss = total / minibatch_pairs
    slow_loss.backward()
    assert loss.item() == pytest.approx(slow_loss.item(), abs=1e-12)
    torch.testing.assert_close(new.grad, slow_new.grad, atol=1e-12, rtol=0)
    assert (new.grad * (1 - mask)).abs().sum() == 0  # padding gets no gradient


def test_sign_align():
    diff, target = torch.tensor([1.0, -1.0, 0.0, 2.0, 0.0]), torch.tensor([2.0, 3.0, 1.0, 0.0, 0.0])
    assert rebel_online.sign_align(diff, target).tolist() == [1.0, 0.0, 0.5, 0.0, 0.0]


def test_each_rank_holds_whole_pairs():
    args = rebel_online.Args(batch_size=6, local_micro_batch_size=2)
    rebel_online.derive_rebel_batch_sizes(args, 1)
    assert (args.local_batch_size, args.gradient_accumulation_steps, args.num_updates) == (6, 3, 20_000 // 6)
    with pytest.raises(ValueError, match=r"--batch_size 6 over 2 rank\(s\) gives 3 responses per rank, an odd local "
                                         r"batch: each rank must hold whole pairs"):
        rebel_online.derive_rebel_batch_sizes(rebel_online.Args(batch_size=6, local_micro_batch_size=2), 2)
    with pytest.raises(ValueError, match="--local_micro_batch_size 3: a micro-batch holds whole pairs"):
        rebel_online.derive_rebel_batch_sizes(rebel_online.Args(batch_size=12, local_micro_batch_size=3), 1)
    args = rebel_online.Args(batch_size=12, local_micro_batch_size=2)
    args.rebel.nminibatches = 4
    with pytest.raises(ValueError, match="6 pairs.*does not split into --rebel.nminibatches 4"):
        rebel_online.derive_rebel_batch_sizes(args, 1)


def test_odd_batch_is_refused_before_any_model_is_loaded(tmp_path, no_model_loading):
    with pytest.raises(ValueError, match="--batch_size 7 over 1 rank"):
        run_in_process(rebel_online, ["--task.dataset", SST2, "--batch_size", "7"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def rebel_args(sft, rm, *extra):
    return ["--model_name_or_path", sft, "--reward_model_name_or_path", rm, "--task.dataset", SST2, "--lr", "1e-4",
            "--batch_size", "16", "--local_micro_batch_size", "4", "--local_rollout_forward_batch_size", "8",
            "--eval_size", "8", "--rebel.noptepochs", "1", *extra]


def short_rebel(sft_policy, reward_model):
    return rebel_args(sft_policy, reward_model, "--total_episodes", "48", "--save_freq", "1", "--keep_checkpoints",
                      "100")


@pytest.fixture(scope="session")
def rebel_1p(session_dir, sft_policy, reward_model):
    return run_into("rebel_online.py", short_rebel(sft_policy, reward_model), session_dir / "rebel_online_1p")


@pytest.fixture(scope="session")
def rebel_2p(session_dir, sft_policy, reward_model):
    return run_into("rebel_online.py", short_rebel(sft_policy, reward_model), session_dir / "rebel_online_2p", nproc=2)


def test_ratio_is_one_and_kl_zero_before_the_first_step(rebel_1p):
    rows = metrics(rebel_1p)
    first = rows[1]  # one epoch, one minibatch: update 1 is a single step from the rollout policy
    assert first["update"] == 1
    assert first["val/ratio"] == 1.0 and first["val/ratio_var"] == 0.0 and first["objective/abs_logratio_diff"] == 0.0
    assert first["objective/kl"] == 0.0 and first["objective/non_score_reward"] == 0.0
    assert first["objective/rlhf_reward"] == first["objective/scores"]
    assert first["loss/policy_avg"] > 0 and 0 < first["objective/sign_align"] <= 0.5  # ties score 1/2
    later = rows[-1]  # the policy moved away from the reference (its log-ratios against pi_old stay 0 here: one step
    assert later["objective/kl"] != 0.0  # per update, each measured before its step)
    for key in ("objective/entropy", "objective/raw_scores", "objective/abs_eta_reward_diff", "val/eos_rate",
                "val/response_length", "loss/grad_norm", "loss/skipped_updates", "lr", "episode", "eps"):
        assert key in later, key
    assert later["episode"] == 48


REBEL_CURVES = ("objective/scores", "objective/kl", "loss/policy_avg", "objective/sign_align", "eval/scores")


@pytest.mark.slow
def test_two_ranks_match_one_rank(rebel_1p, rebel_2p):
    """Each rank samples its own pairs with the noise of their global rows, and takes its share of every minibatch of
    pairs from the gathered rollout: the same run as one rank."""
    assert_same_run(rebel_1p, rebel_2p, REBEL_CURVES)


@pytest.mark.slow
def test_fsdp_with_several_minibatches_on_two_ranks_matches_one_rank(sft_policy, reward_model, tmp_path):
    """The policy sharded with FSDP2 (a unit below a root without weights, sampled through), the reference and reward
    model sharded frozen, 2 epochs of 2 minibatches of pairs split over the ranks: the same run as one unsharded rank.
    (With the policy itself as the FSDP2 root, its embeddings and final norm never moved: this test found it.)"""
    args = rebel_args(sft_policy, reward_model, "--total_episodes", "32", "--rebel.nminibatches", "2",
                      "--rebel.noptepochs", "2")
    one = run_into("rebel_online.py", args, tmp_path / "1p")
    two = run_into("rebel_online.py", [*args, "--fsdp"], tmp_path / "fsdp", nproc=2)
    assert_same_run(one, two, REBEL_CURVES)


def test_resume_from_a_checkpoint_is_exact(rebel_1p, sft_policy, reward_model, tmp_path):
    check_resume_from_checkpoint(rebel_online, short_rebel(sft_policy, reward_model), rebel_1p, tmp_path / "resumed",
                                 update=1)


@pytest.mark.slow
def test_preempted_run_resumes_exactly(rebel_1p, sft_policy, reward_model, tmp_path):
    """SIGTERM mid-run: the checkpoint it writes resumes to the uninterrupted run's weights and metrics, bitwise."""
    check_preempt_and_resume("rebel_online.py", short_rebel(sft_policy, reward_model), rebel_1p,
                             tmp_path / "preempted", nproc=1)


def test_nonfinite_updates_are_skipped_then_stop_the_run(rebel_1p, sft_policy, reward_model, tmp_path, capsys):
    check_nonfinite_guard(rebel_online, short_rebel(sft_policy, reward_model), rebel_1p, tmp_path, good=1,
                          capsys=capsys)


@pytest.mark.slow
def test_short_run_raises_the_held_out_reward_above_the_sft_policy(session_dir, sft_policy, reward_model):
    out = session_dir / "rebel_online_learns"
    check_short_run_learns("rebel_online.py", learning_args(sft_policy, reward_model, "--rebel.noptepochs", "4"), out,
                           0.5)
    samples = (out / "eval_samples.jsonl").read_text().splitlines()
    assert len(samples) == 2 * 256  # every held-out answer, before and after, with its scores
