"""train.compile: the compiled SUPER update against the eager one, its checks, and a run with it."""

from __future__ import annotations

import pytest
import torch

from marlkit.pipelines import make_config, qlearning
from marlkit.pipelines.compiled import CompiledQUpdate
from marlkit.pipelines.learners import gradient_step, make_optimiser
from marlkit.pipelines.session import start_run

SMALL_PURSUIT = {"env.num_envs": 2, "env.kwargs": {"n_pursuers": 3, "n_evaders": 2, "x_size": 7, "y_size": 7,
                                                   "obs_range": 7, "n_catch": 2, "surround": True,
                                                   "shared_reward": False},
                 "model.num_cells": [16, 16], "replay.buffer_size": 500, "replay.batch_size": 8,
                 "replay.memmap": False, "sharing.mode": "quantile", "train.lr": 0.01}


def _learner_and_optimiser(tmp_path, name: str, batch, max_grad_norm: float):
    cfg = make_config("iql", "pursuit-super", {**SMALL_PURSUIT, "logger.run_dir": str(tmp_path / name),
                                               "train.max_grad_norm": max_grad_norm, "loss.hard_update_interval": 2})
    run = start_run(cfg, False, qlearning.checked_iterations)
    torch.manual_seed(0)  # the same networks for both
    learner = qlearning.build_learners(run.env, run.cfg, run.device, None)["pursuer"]
    learner.replay.extend(batch)
    return learner, make_optimiser(learner.loss.parameters(), cfg.train.lr, cfg.train.adam_eps), cfg


def _state(learner, optimiser) -> dict[str, torch.Tensor]:
    """Everything an update changes: the weights, Adam's moments and counts, the priorities."""
    params = list(learner.loss.parameters())
    state = {f"param{i}": p.detach().clone() for i, p in enumerate(params)}
    for i, p in enumerate(params):
        for key, value in optimiser.state[p].items():
            state[f"{key}{i}"] = value.clone()
    table = learner.replay.table
    state.update(raw=table.raw.clone(), scaled=table.scaled.clone(), block_sum=table.block_sum.clone())
    state["max_priority"] = torch.tensor([b.sampler.max_priority for b in learner.replay.buffers])
    return state


@pytest.mark.parametrize("max_grad_norm", [40.0, 0.05], ids=["clip idle", "clip acting"])
def test_compiled_update_makes_the_eager_updates_steps(tmp_path, max_grad_norm):
    """Four updates from the same state and random numbers, eager and compiled: the same draws, losses,
    weights, Adam state and priorities (to float precision); the clip (idle or acting), a hard target update
    (after the 2nd step, so the 3rd reads the new target) and a skipped non-finite step included."""
    from marlkit.envs import make_env

    env = make_env("pursuit", num_envs=2, seed=3, **SMALL_PURSUIT["env.kwargs"])
    torch.manual_seed(3)  # the rollout's random actions
    batch = env.rollout(60, break_when_any_done=False).reshape(-1)  # 120 transitions per agent
    eager, eager_opt, cfg = _learner_and_optimiser(tmp_path, "eager", batch, max_grad_norm)
    fused, fused_opt, _ = _learner_and_optimiser(tmp_path, "compiled", batch, max_grad_norm)
    compiled = CompiledQUpdate("pursuer", fused, fused_opt, max_grad_norm)
    start = _state(eager, eager_opt)
    target = {k: v.clone() for k, v in fused.loss.target_params().items(True, True)}
    for step in range(4):
        if step == 2:  # the target copy made after the 2nd step is the one the compiled graph reads
            assert all(not torch.equal(target[k], v) for k, v in compiled.target.items())
        if step == 3:  # non-finite observations in every agent's storage: both skip the step and flag it
            for learner in (eager, fused):
                for fields in learner.replay._columns():
                    fields[("pursuer", "observation")].fill_(float("nan"))
        torch.manual_seed(10 + step)
        minibatch = eager.replay.sample()
        out = eager.loss(minibatch)
        gradient_step(eager, eager_opt, out, max_grad_norm)
        eager.replay.update_priority(minibatch, minibatch.get(eager.priority_key))
        torch.manual_seed(10 + step)
        fused_out = compiled()
        if step < 3:
            assert torch.isfinite(out["loss"])
            torch.testing.assert_close(fused_out["loss"], out["loss"], rtol=1e-5, atol=1e-7)
        else:
            assert not torch.isfinite(fused_out["loss"])
    before, after, fused_after = start, _state(eager, eager_opt), _state(fused, fused_opt)
    assert after.keys() == fused_after.keys()
    for key in after:
        if key.startswith("param"):  # the change each step made, so that a wrong step size shows
            # (Adam scales every change to about lr = 0.01 whatever the gradient's size, so where a gradient is
            # as small as Adam's eps its rounding shows: 1% of a step; the moments below are compared tightly)
            torch.testing.assert_close(fused_after[key] - before[key], after[key] - before[key], rtol=1e-3, atol=1e-4)
        # priorities are |TD errors|, differences of close numbers: 0.1% of each
        torch.testing.assert_close(fused_after[key], after[key], rtol=1e-3, atol=1e-6)
    assert torch.equal(fused_after["step0"], torch.tensor(3.0))  # the non-finite step was skipped
    assert torch.equal(fused.nonfinite, eager.nonfinite) and fused.nonfinite.all()


@pytest.mark.parametrize("args,match", [
    (["vdn", "--env", "gridworld"], r"train.compile=true compiles independent learners' updates: algorithm='vdn' needs iql"),
    (["iql", "--env", "gridworld", "model.share_params=false"], r"set replay.prioritized=true"),
    (["iql", "--env", "gridworld", "replay.prioritized=true", "model.share_params=true"],
     r"model.share_params=True; use model.kind=mlp and model.share_params=false"),
    (["iql", "--env", "gridworld", "replay.prioritized=true", "model.kind=gru"], r"got model.kind='gru'"),
])
def test_compile_is_refused_where_it_does_not_apply(args, match, cli_rejects):
    cli_rejects(["train", *args, "train.compile=true"], match)


def test_compile_is_refused_for_a_group_without_per_agent_replay(tmp_path):
    cfg = make_config("iql", "pursuit-super", {**SMALL_PURSUIT, "logger.run_dir": str(tmp_path),
                                               "env.kwargs": {**SMALL_PURSUIT["env.kwargs"], "n_pursuers": 1}})
    run = start_run(cfg, False, qlearning.checked_iterations)
    learner = qlearning.build_learners(run.env, run.cfg, run.device, None)["pursuer"]
    with pytest.raises(ValueError, match="per-agent prioritized replay; set train.compile=false"):
        CompiledQUpdate("pursuer", learner, make_optimiser(learner.loss.parameters(), 0.01, 1e-8), 40.0)


def test_compiled_update_keeps_weights_and_moments_in_the_gradients_layout(tmp_path):
    """The batched weights are stored as their gradients come out of the backward (``[agents, in, out]`` in
    memory) with their values kept; a resumed run's moments, loaded in the usual layout, are moved to the
    weights' layout with their values: the step from them is the step from the same moments laid out so."""
    from marlkit.envs import make_env

    env = make_env("pursuit", num_envs=2, seed=3, **SMALL_PURSUIT["env.kwargs"])
    torch.manual_seed(3)
    batch = env.rollout(30, break_when_any_done=False).reshape(-1)
    laid_out, laid_out_opt, _ = _learner_and_optimiser(tmp_path, "laid_out", batch, 40.0)
    loaded, loaded_opt, _ = _learner_and_optimiser(tmp_path, "loaded", batch, 40.0)
    weights = [p for p in loaded.loss.parameters() if p.dim() == 3]
    assert weights and all(p.is_contiguous() for p in weights)
    before = [p.detach().clone() for p in weights]
    moments = [(torch.rand(p.shape) * 1e-2, torch.rand(p.shape) * 1e-4) for p in loaded.loss.parameters()]
    for p, (m, v) in zip(loaded.loss.parameters(), moments, strict=True):  # as a checkpoint loads them: contiguous
        loaded_opt.state[p] = {"step": torch.tensor(5.0), "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    updates = [CompiledQUpdate("pursuer", learner, opt, 40.0)
               for learner, opt in ((laid_out, laid_out_opt), (loaded, loaded_opt))]
    assert all(p.transpose(1, 2).is_contiguous() and not p.is_contiguous() for p in weights)
    assert all(torch.equal(p, value) for p, value in zip(weights, before, strict=True))
    for p, (m, v) in zip(laid_out.loss.parameters(), moments, strict=True):  # already in the weights' layout
        laid_out_opt.state[p] = {"step": torch.tensor(5.0), "exp_avg": torch.empty_like(p).copy_(m),
                                 "exp_avg_sq": torch.empty_like(p).copy_(v)}
    for update in updates:
        torch.manual_seed(11)
        update()
    for p, q in zip(laid_out.loss.parameters(), loaded.loss.parameters(), strict=True):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq"):
            assert loaded_opt.state[q][key].stride() == q.stride()
            assert torch.equal(loaded_opt.state[q][key], laid_out_opt.state[p][key])
