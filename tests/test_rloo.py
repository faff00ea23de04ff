"""rloo.py: leave-one-out advantages and the clipped sequence-level loss against slow references (k = 2 and 4), ratio 1
and KL 0 before the first step, 2 ranks == 1 rank, exact resume, the non-finite guard, whole groups per rank, and a
short offline run that clearly raises the held-out reward-model score above the SFT policy's."""

import math

import pytest
import torch
from conftest import (
    assert_same_run,
    check_nonfinite_guard,
    check_preempt_and_resume,
    check_resume_from_checkpoint,
    check_short_run_learns,
    learning_args,
    metrics,
    online_args,
    run_in_process,
    run_into,
)

import rloo


@pytest.mark.parametrize("k", [2, 4])
def test_advantages_and_loss_match_a_slow_reference(k):
    """Rewards of 3 prompts x k responses, the leave-one-out baseline, the sequence-level ratio clipped at 0.2, and
    the minibatch loss (mean over responses): values and gradients against per-sample Python."""
    g = torch.Generator().manual_seed(k)
    n, length, cliprange = 3 * k, 5, 0.2
    rewards = torch.randn(n, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).double()
    old = torch.randn(n, length, generator=g, dtype=torch.float64) * 0.3 - 2
    new = (old + torch.randn(n, length, generator=g, dtype=torch.float64) * 0.1).requires_grad_()

    advantages = rloo.rloo_advantages(rewards, k)
    losses, ratio, clipped, _ = rloo.rloo_losses(new, old, advantages, mask, cliprange)
    losses.mean().backward()

    slow_new = new.detach().clone().requires_grad_()
    slow_losses = []
    for i in range(n):
        group = range(i // k * k, i // k * k + k)
        baseline = sum(rewards[j].item() for j in group if j != i) / (k - 1)
        a = rewards[i].item() - baseline
        assert advantages[i].item() == pytest.approx(a, abs=1e-12)
        log_ratio = sum(slow_new[i, t] - old[i, t] for t in range(lengths[i]))
        r = torch.exp(log_ratio)
        slow_losses.append(torch.max(-a * r, -a * torch.clamp(r, 1 - cliprange, 1 + cliprange)))
        assert ratio[i].item() == pytest.approx(r.item(), rel=1e-12)
        assert bool(clipped[i]) == (-a * min(max(r.item(), 1 - cliprange), 1 + cliprange) > -a * r.item())
    assert losses.tolist() == pytest.approx([x.item() for x in slow_losses], rel=1e-12)
    (sum(slow_losses) / n).backward()
    torch.testing.assert_close(new.grad, slow_new.grad, rtol=1e-12, atol=1e-12)
    assert (new.grad * (1 - mask)).abs().sum() == 0  # padding gets no gradient
    assert clipped.sum() > 0 and clipped.sum() < n  # both branches were exercised


def test_local_batch_must_hold_whole_groups(sft_policy, reward_model, tmp_path, no_model_loading):
    with pytest.raises(ValueError, match=r"--batch_size 6 over 1 ranks gives 6 responses per rank, not a multiple of "
                                         r"--rloo.k 4"):
        run_in_process(rloo, online_args(sft_policy, reward_model, "--batch_size", "6", "--rloo.k", "4",
                                         "--local_micro_batch_size", "2"), tmp_path / "one")
    args = rloo.Args(batch_size=12, local_micro_batch_size=2)
    args.rloo.k = 4
    with pytest.raises(ValueError, match=r"--batch_size 12 over 2 ranks gives 6 responses per rank"):
        rloo.derive_group_batch_sizes(args, 2, 4, "rloo.k", 1)
    with pytest.raises(ValueError, match=r"--rloo.k must be >= 2"):
        run_in_process(rloo, online_args(sft_policy, reward_model, "--rloo.k", "1"), tmp_path / "two")


def short_rloo(sft_policy, reward_model, *extra):
    return online_args(sft_policy, reward_model, "--total_episodes", "48", "--save_freq", "1", "--keep_checkpoints",
                       "100", "--rloo.k", "4", *extra)


@pytest.fixture(scope="session")
def rloo_1p(session_dir, sft_policy, reward_model):
    return run_into("rloo.py", short_rloo(sft_policy, reward_model), session_dir / "rloo_1p")


def test_ratio_is_one_and_kl_zero_before_the_first_step(rloo_1p):
    first = metrics(rloo_1p)[1]  # one epoch, one minibatch: update 1 is a single step from the rollout policy
    assert first["update"] == 1
    assert first["val/ratio"] == 1.0 and first["val/ratio_var"] == 0.0
    assert first["policy/approxkl_avg"] == 0.0 and first["policy/clipfrac_avg"] == 0.0
    assert first["objective/kl"] == 0.0 and first["objective/non_score_reward"] == 0.0
    assert first["objective/advantage_std"] > 0  # the k responses to a prompt differ


@pytest.mark.slow
def test_two_ranks_match_one_rank(rloo_1p, session_dir, sft_policy, reward_model):
    """DDP over 2 ranks, each with whole groups of 4: the same run as one rank (which accumulates 4 micro-batches)."""
    two = run_into("rloo.py", short_rloo(sft_policy, reward_model), session_dir / "rloo_2p", nproc=2)
    assert_same_run(rloo_1p, two)


def test_resume_from_a_checkpoint_is_exact(rloo_1p, sft_policy, reward_model, tmp_path):
    check_resume_from_checkpoint(rloo, short_rloo(sft_policy, reward_model), rloo_1p, tmp_path / "resumed", update=1)


@pytest.mark.slow
def test_preempted_run_resumes_exactly(rloo_1p, sft_policy, reward_model, tmp_path):
    """SIGTERM mid-run: the checkpoint it writes resumes to the uninterrupted run's weights and metrics, bitwise."""
    check_preempt_and_resume("rloo.py", short_rloo(sft_policy, reward_model), rloo_1p, tmp_path / "preempted", nproc=1)


def test_nonfinite_updates_are_skipped_then_stop_the_run(rloo_1p, sft_policy, reward_model, tmp_path, capsys):
    check_nonfinite_guard(rloo, short_rloo(sft_policy, reward_model), rloo_1p, tmp_path, good=1, capsys=capsys)


@pytest.mark.slow
def test_short_run_raises_the_held_out_reward_above_the_sft_policy(session_dir, sft_policy, reward_model):
    """RLOO with k = 2 (16 prompts per update) gains least at this budget, hence a margin of 0.3 (`learning_args`)."""
    args = learning_args(sft_policy, reward_model, "--local_rollout_forward_batch_size", "8", "--rloo.k", "2",
                         "--rloo.noptepochs", "4")
    evals = check_short_run_learns("rloo.py", args, session_dir / "rloo_learns", 0.3)
    assert all(math.isfinite(e["eval/judge"]) for e in evals)
