"""QTRAN-base: its three losses on hand-made batches (against the formulas, with a target network that
differs from the online one), which networks each term trains, the joint network's shapes, the
pipeline on tiny configs and its refusals. Resume: tests/test_checkpoint_eval.py."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torchrl.data import Categorical

from marlkit.losses import make_qtran_loss, make_target_updater, TEAM
from marlkit.modules import make_q_network, make_qtran_joint
from marlkit.pipelines import pipeline_for

B, N, OBS, A = 8, 3, 4, 5
STATE = ("agents", "observation")  # no global state: the group's observations, as QMIX does


def _loss(spec_env, **kwargs):
    env = spec_env((OBS,), Categorical(A, shape=(B, N)), n_agents=N, batch=B)
    q_net = make_q_network(env, "agents", num_cells=[8], algorithm="qtran")
    joint = make_qtran_joint(env, "agents", state_shape=(N, OBS), num_cells=[8, 8])
    loss = make_qtran_loss(q_net, joint, "agents", state_key=STATE, gamma=0.9, **kwargs)
    with torch.no_grad():  # a target that differs from the online joint network
        loss.target_joint_network_params.apply(lambda p: p.add_(0.3))
    return loss


def _batch() -> TensorDict:
    g = torch.Generator().manual_seed(0)
    return TensorDict({
        "agents": {"observation": torch.randn(B, N, OBS, generator=g), "action": torch.randint(0, A, (B, N), generator=g)},
        "next": {"agents": {"observation": torch.randn(B, N, OBS, generator=g)},
                 TEAM: {"reward": torch.randn(B, 1, generator=g),
                        "terminated": torch.tensor([[True], [False]] * (B // 2))}},
    }, batch_size=(B,))


def _by_hand(loss, batch, lambda_opt, lambda_nopt):
    joint = loss.joint_network
    with torch.no_grad():
        with loss.value_network_params.to_module(loss.value_network):
            q = loss.value_network(batch.select(("agents", "observation")))["agents", "action_value"]
            q_next = loss.value_network(batch["next"].select(("agents", "observation")))["agents", "action_value"]
        state, next_state = batch["agents", "observation"], batch["next", "agents", "observation"]
        action, greedy, next_greedy = batch["agents", "action"], q.argmax(-1), q_next.argmax(-1)
        with loss.joint_network_params.to_module(joint):
            q_jt, q_jt_greedy, v = joint.joint_value(state, action), joint.joint_value(state, greedy), joint.state_value(state, 1)
        with loss.target_joint_network_params.to_module(joint, preserve_module_state=False):
            next_q_jt = joint.joint_value(next_state, next_greedy)
    reward, terminated = batch["next", TEAM, "reward"], batch["next", TEAM, "terminated"].float()
    target = reward + 0.9 * (1 - terminated) * next_q_jt
    td = ((q_jt - target) ** 2).mean()
    chosen = q.gather(-1, action.unsqueeze(-1)).sum(-2)
    best = q.gather(-1, greedy.unsqueeze(-1)).sum(-2)
    opt = ((best - q_jt_greedy + v) ** 2).mean()
    nopt = ((chosen - q_jt + v).clamp(max=0) ** 2).mean()
    return td, opt, nopt, td + lambda_opt * opt + lambda_nopt * nopt, (q_jt - target) ** 2


def test_the_three_losses_follow_the_formulas(spec_env):
    loss = _loss(spec_env, lambda_opt=0.7, lambda_nopt=0.3)
    batch = _batch()
    out = loss(batch)
    td, opt, nopt, total, squared_td = _by_hand(loss, batch, 0.7, 0.3)
    for key, expected in (("loss_td", td), ("loss_opt", opt), ("loss_nopt", nopt), ("loss", total)):
        assert torch.allclose(out[key], expected, atol=1e-5), key
    assert nopt > 0 and torch.allclose(batch[TEAM, "td_error"], squared_td, atol=1e-5)
    with torch.no_grad():  # the TD target comes from the target network, not the online one
        loss.target_joint_network_params.apply(lambda p: p.sub_(0.3))
    assert not torch.allclose(loss(batch.clone())["loss_td"], out["loss_td"])


def test_each_term_trains_its_own_networks(spec_env):
    """L_td trains Q_jt alone; L_opt / L_nopt train the agents' Q and V, with Q_jt held fixed."""
    batch = _batch()
    grads = {}
    for lambdas in ((0.0, 0.0), (1.0, 1.0)):
        torch.manual_seed(0)  # the same networks both times
        loss = _loss(spec_env, lambda_opt=lambdas[0], lambda_nopt=lambdas[1])
        loss(batch.clone())["loss"].backward()
        grads[lambdas] = {key: torch.zeros_like(p) if p.grad is None else p.grad
                          for key, p in loss.named_parameters() if p.requires_grad}
    td_only, everything = grads[(0.0, 0.0)], grads[(1.0, 1.0)]
    joint_q = [k for k in td_only if ".q." in k or ".embed." in k]
    agents_and_v = [k for k in td_only if "value_network" in k or ".v." in k]
    assert joint_q and agents_and_v and len(joint_q) + len(agents_and_v) == len(td_only)
    assert all(td_only[k].abs().sum() > 0 and torch.allclose(td_only[k], everything[k]) for k in joint_q)
    assert all(td_only[k].abs().sum() == 0 and everything[k].abs().sum() > 0 for k in agents_and_v)


def test_priority_weights_scale_each_transition(spec_env):
    loss = _loss(spec_env)
    batch = _batch()
    plain = loss(batch.clone())["loss"]
    weighted = batch.clone()
    weighted["priority_weight"] = torch.full((B,), 2.0)
    assert torch.allclose(loss(weighted)["loss"], 2 * plain)


def test_joint_network_tells_agents_apart_and_target_updates(spec_env):
    loss = _loss(spec_env)
    state = torch.randn(2, N, OBS)
    swapped = loss.joint_network.joint_value(state, torch.tensor([[0, 1, 2], [2, 1, 0]]))
    assert swapped.shape == (2, 1) and not torch.allclose(swapped[0], loss.joint_network.joint_value(state[:1], torch.tensor([[2, 1, 0]]))[0])
    updater = make_target_updater(loss, mode="hard", hard_update_interval=1)
    updater.step()
    online, target = loss.joint_network_params, loss.target_joint_network_params
    assert all(torch.equal(online[k], target[k]) for k in online.keys(True, True))


@pytest.mark.parametrize("env,overrides", [
    ("matrix/nonmonotonic", {}),
    ("gridworld", {"env.max_steps": 10, "replay.prioritized": True}),
    ("vmas/navigation", {"env.n_agents": 2, "env.continuous_actions": False, "env.max_steps": 10}),
])
def test_pipeline_trains_qtran(env, overrides, tiny_config, read_metrics, tmp_path):
    cfg = tiny_config("qtran", env, tmp_path, frames_per_batch=80, **{"replay.batch_size": 16, **overrides})
    result = pipeline_for("qtran").train(cfg)
    rows = read_metrics(tmp_path)
    assert result.frames == 160 and len(rows) == 2
    assert all(rows[-1][f"agents/{k}"] != "" for k in ("loss", "loss_td", "loss_opt", "loss_nopt"))
    assert float(rows[-1]["counters/optimiser_steps"]) == 4


@pytest.mark.parametrize("args,match", [
    (["train", "qtran", "--env", "gym/CartPole-v1", "--frames", "600", "env.num_envs=2",
      "collector.frames_per_batch=300"], "qtran factorises the joint value of several agents; group 'agents' has 1"),
    (["train", "qtran", "--preset", "speaker-listener-q"], "qtran's joint value is over one group's agents"),
    (["train", "qtran", "loss.lambda_nopt=-1"], r"loss.lambda_opt \(1.0\) and loss.lambda_nopt \(-1.0\) must be"),
    (["train", "qtran", "--env", "vmas/navigation"], "qtran needs discrete actions"),
])
def test_bad_qtran_input(args, match, cli_rejects):
    cli_rejects(args, match)
