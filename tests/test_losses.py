"""Every loss on hand-made TensorDicts: PPO (with GAE), DDPG and SAC (with target updates), DQN and the
VDN / QMIX mixers; and that agents that died leave each of them."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from torchrl.data import Bounded, Categorical

from marlkit.losses import (
    DDPG_LOSS_TERMS,
    make_ddpg_loss,
    make_dqn_loss,
    make_ppo_loss,
    make_qmixer_loss,
    make_sac_loss,
    make_target_updater,
    PPO_LOSS_TERMS,
    SAC_LOSS_TERMS,
)
from marlkit.modules import (
    make_deterministic_actor,
    make_q_critic,
    make_q_network,
    make_stochastic_actor,
    make_value_critic,
)


# --- PPO (MAPPO / IPPO) ------------------------------------------------------------------------

PB, PN = 4, 3
P_CONTINUOUS = Bounded(-1.0, 1.0, shape=(PB, PN, 2))
P_DISCRETE = Categorical(5, shape=(PB, PN))


def _hand_made_batch(action: torch.Tensor, obs_dim: int, steps: int = 6) -> TensorDict:
    """A [PB, T] batch of transitions written by hand: rewards, dones, log-probs and observations."""
    g = torch.Generator().manual_seed(0)
    shape = (PB, steps, PN)
    done = torch.zeros(*shape, 1, dtype=torch.bool)
    done[:, -1] = True
    return TensorDict(
        {
            "agents": {
                "observation": torch.randn(*shape, obs_dim, generator=g),
                "action": action,
                "action_log_prob": torch.full(shape, -1.0),
            },
            "next": {
                "agents": {
                    "observation": torch.randn(*shape, obs_dim, generator=g),
                    "reward": torch.randn(*shape, 1, generator=g),
                    "done": done,
                    "terminated": done.clone(),
                },
            },
        },
        batch_size=(PB, steps),
    )


@pytest.mark.parametrize("discrete", [False, True])
@pytest.mark.parametrize("normalize_value_target", [False, True])
def test_ppo_loss_on_hand_made_batch(discrete, normalize_value_target, spec_env):
    obs_dim, steps = 5, 6
    if discrete:
        env = spec_env((obs_dim,), P_DISCRETE)
        action = torch.randint(0, 5, (PB, steps, PN))
    else:
        env = spec_env((obs_dim,), P_CONTINUOUS)
        action = torch.rand(PB, steps, PN, 2) * 1.8 - 0.9
    actor = make_stochastic_actor(env, "agents", num_cells=[16])
    critic = make_value_critic(env, "agents", centralised=True, num_cells=[16])
    loss = make_ppo_loss(actor, critic, "agents", entropy_coef=0.01, normalize_advantage=True,
                         normalize_value_target=normalize_value_target)
    batch = _hand_made_batch(action, obs_dim, steps)
    with torch.no_grad():
        loss.value_estimator(batch, params=loss.critic_network_params, target_params=loss.target_critic_network_params)
    assert batch["agents", "advantage"].shape == (PB, steps, PN, 1)
    assert batch["agents", "value_target"].shape == (PB, steps, PN, 1)
    out = loss(batch.reshape(-1))
    total = sum(out[k] for k in PPO_LOSS_TERMS)
    assert all(torch.isfinite(out[k]).all() for k in PPO_LOSS_TERMS)
    total.backward()
    for name, net in (("actor", actor), ("critic", critic)):
        grads = [p.grad for p in net.parameters()]
        assert all(g is not None for g in grads), name
        assert sum(g.abs().sum() for g in grads) > 0, name


def test_gae_uses_group_done_flags(spec_env):
    # With gamma=1 and lambda=1 the value target is the return to the end of each episode.
    env = spec_env((3,), P_DISCRETE)
    actor = make_stochastic_actor(env, "agents", num_cells=[4])
    critic = make_value_critic(env, "agents", centralised=False, num_cells=[4])
    for p in critic.parameters():
        torch.nn.init.zeros_(p)  # V == 0 everywhere
    loss = make_ppo_loss(actor, critic, "agents", gamma=1.0, lmbda=1.0)
    batch = _hand_made_batch(torch.zeros(PB, 4, PN, dtype=torch.long), 3, steps=4)
    batch["next", "agents", "reward"] = torch.ones(PB, 4, PN, 1)
    batch["next", "agents", "done"][:, 1] = True  # episodes end at t=1 and t=3
    batch["next", "agents", "terminated"] = batch["next", "agents", "done"].clone()
    with torch.no_grad():
        loss.value_estimator(batch, params=loss.critic_network_params, target_params=loss.target_critic_network_params)
    target = batch["agents", "value_target"][0, :, 0, 0]
    assert target.tolist() == [2.0, 1.0, 2.0, 1.0]


def test_ppo_loss_leaves_dead_agents_out(spec_env):
    env = spec_env((5,), P_DISCRETE)
    actor = make_stochastic_actor(env, "agents", num_cells=[16])
    critic = make_value_critic(env, "agents", centralised=False, num_cells=[16])
    loss = make_ppo_loss(actor, critic, "agents", mask_key=("agents", "mask"))
    batch = _hand_made_batch(torch.randint(0, 5, (PB, 6, PN)), 5).reshape(-1)
    batch["agents", "advantage"] = torch.randn(PB * 6, PN, 1)
    batch["agents", "value_target"] = torch.randn(PB * 6, PN, 1)
    batch["agents", "mask"] = torch.ones(PB * 6, PN, dtype=torch.bool)
    batch["agents", "mask"][:10, 1] = False  # agent 1 died in the first 10 steps
    changed = batch.clone()
    changed["agents", "advantage"][:10, 1] = 1000.0
    changed["agents", "value_target"][:10, 1] = -1000.0
    for term in ("loss_objective", "loss_critic"):
        assert torch.allclose(loss(batch.clone())[term], loss(changed.clone())[term]), term
    live = batch.clone()
    live["agents", "advantage"][:10, 0] = 1000.0
    assert not torch.allclose(loss(batch.clone())["loss_objective"], loss(live)["loss_objective"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(loss_critic_type="huber"), "loss_critic_type='huber'.*l2"),
    (dict(gamma=1.5), "gamma must be in"),
    (dict(clip_epsilon=0.0), "clip_epsilon must be > 0"),
])
def test_ppo_loss_bad_input(kwargs, match, spec_env):
    env = spec_env((3,), P_DISCRETE)
    actor = make_stochastic_actor(env, "agents", num_cells=[4])
    critic = make_value_critic(env, "agents", centralised=False, num_cells=[4])
    with pytest.raises(ValueError, match=match):
        make_ppo_loss(actor, critic, "agents", **kwargs)


@pytest.mark.parametrize("action", ["tanh-normal", "normal", "categorical", "masked"])
@pytest.mark.parametrize("centralised,share_params", [(True, True), (False, False)])
@pytest.mark.parametrize("extras", ["plain", "entropy-norms-mask", "smooth_l1"])
def test_ppo_loss_equals_torchrl_clip_ppo_loss_bit_for_bit(action, centralised, share_params, extras, spec_env):
    """marlkit's PPO loss works on the networks' tensors; every entry it returns and every gradient are
    ``ClipPPOLoss.forward``'s exactly (continuous bounded / unbounded, discrete with and without action
    masks; entropy bonus, advantage and value normalisation, live-agent mask, other critic losses)."""
    import copy

    from torchrl.data import Unbounded
    from torchrl.objectives import ClipPPOLoss

    steps, obs_dim = 6, 5
    g = torch.Generator().manual_seed(5)
    spec = {"tanh-normal": P_CONTINUOUS, "normal": Unbounded(shape=(PB, PN, 2))}.get(action, P_DISCRETE)
    env = spec_env((obs_dim,), spec, mask=action == "masked")
    actor = make_stochastic_actor(env, "agents", num_cells=[16], share_params=share_params)
    critic = make_value_critic(env, "agents", centralised=centralised, num_cells=[16], share_params=share_params)
    full = extras == "entropy-norms-mask"
    loss = make_ppo_loss(actor, critic, "agents", entropy_coef=0.01 if full else 0.0, normalize_advantage=full,
                         normalize_value_target=full, mask_key=("agents", "mask") if full else None,
                         loss_critic_type="smooth_l1" if extras == "smooth_l1" else "l2")
    assert loss._tensor_parts() is not None  # the comparison runs marlkit's path, not TorchRL's twice
    n = PB * steps
    if spec is P_DISCRETE:
        taken = torch.randint(0, 5, (n, PN), generator=g)
    else:
        taken = torch.rand(n, PN, 2, generator=g) * 1.8 - 0.9
    td = _hand_made_batch(taken.reshape(PB, steps, *taken.shape[1:]), obs_dim, steps).reshape(-1)
    td["agents", "action_log_prob"] = -torch.rand(n, PN, generator=g) * 3
    td["agents", "advantage"] = torch.randn(n, PN, 1, generator=g)
    td["agents", "value_target"] = torch.randn(n, PN, 1, generator=g)
    if action == "masked":
        allowed = torch.rand(n, PN, 5, generator=g) < 0.6
        allowed.scatter_(-1, taken.unsqueeze(-1), True)
        td["agents", "action_mask"] = allowed
    if full:
        td["agents", "mask"] = torch.rand(n, PN, generator=g) < 0.8
    start = copy.deepcopy(loss.state_dict())  # the value normaliser's statistics move on each forward
    results = []
    for forward in (ClipPPOLoss.forward, type(loss).forward):
        loss.load_state_dict(start)
        torch.manual_seed(0)  # TanhNormal's entropy is a Monte-Carlo estimate: the same draws for both
        out = forward(loss, td.clone())
        sum(out[k] for k in PPO_LOSS_TERMS if k in out.keys()).backward()
        results.append((out, [p.grad.clone() for p in loss.parameters()], copy.deepcopy(loss.state_dict())))
        loss.zero_grad()
    (expected, expected_grads, expected_state), (got, grads, state) = results
    assert list(got.keys()) == list(expected.keys()) and ("loss_entropy" in got.keys()) == full
    assert all(torch.equal(got[k], expected[k]) for k in expected.keys()), [
        k for k in expected.keys() if not torch.equal(got[k], expected[k])]
    assert len(grads) > 0 and all(torch.equal(a, b) for a, b in zip(expected_grads, grads, strict=True))
    assert all(torch.equal(state[k], expected_state[k]) for k in expected_state)


# --- DDPG and SAC (MADDPG, MASAC and their independent forms), target updates ------------------

AB, AN, AOBS, AACT = 8, 3, 5, 2
A_BOX = Bounded(-1.0, 1.0, shape=(AB, AN, AACT))


def _transitions() -> TensorDict:
    g = torch.Generator().manual_seed(1)
    done = torch.zeros(AB, AN, 1, dtype=torch.bool)
    done[: AB // 2] = True
    return TensorDict({
        "agents": {"observation": torch.randn(AB, AN, AOBS, generator=g),
                   "action": torch.rand(AB, AN, AACT, generator=g) * 2 - 1},
        "next": {"agents": {"observation": torch.randn(AB, AN, AOBS, generator=g),
                            "reward": torch.randn(AB, AN, 1, generator=g),
                            "done": done, "terminated": done.clone()}},
    }, batch_size=(AB,))


def _modules(spec_env, stochastic: bool, centralised: bool = True):
    env = spec_env((AOBS,), A_BOX, batch=AB)
    make_actor = make_stochastic_actor if stochastic else make_deterministic_actor
    actor = make_actor(env, "agents", num_cells=[16])
    critic = make_q_critic(env, "agents", centralised=centralised, num_cells=[16])
    return env, actor, critic


def _check_grads(net) -> None:
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


@pytest.mark.parametrize("centralised", [True, False])
def test_ddpg_loss_on_hand_made_batch(centralised, spec_env):
    _, actor, critic = _modules(spec_env, stochastic=False, centralised=centralised)
    loss = make_ddpg_loss(actor, critic, "agents", gamma=0.9)
    out = loss(_transitions())
    assert all(torch.isfinite(out[k]) for k in DDPG_LOSS_TERMS)
    sum(out[k] for k in DDPG_LOSS_TERMS).backward()
    _check_grads(actor)
    _check_grads(critic)


def test_sac_loss_on_hand_made_batch(spec_env):
    _, actor, critic = _modules(spec_env, stochastic=True)
    loss = make_sac_loss(actor, critic, "agents", gamma=0.9)
    assert float(loss.target_entropy) == -AACT  # per-agent heuristic
    out = loss(_transitions())
    assert all(torch.isfinite(out[k]) for k in SAC_LOSS_TERMS)
    sum(out[k] for k in SAC_LOSS_TERMS).backward()
    _check_grads(actor)
    assert loss.log_alpha.grad is not None and loss.log_alpha.grad.abs() > 0
    q_grads = [p.grad for p in loss.qvalue_network_params.values(True, True)]
    assert all(g is not None for g in q_grads) and sum(g.abs().sum() for g in q_grads) > 0


@pytest.mark.parametrize("stochastic", [False, True])
def test_soft_update_moves_targets_by_exactly_tau(stochastic, spec_env):
    _, actor, critic = _modules(spec_env, stochastic=stochastic)
    loss = (make_sac_loss if stochastic else make_ddpg_loss)(actor, critic, "agents")
    tau = 0.25
    updater = make_target_updater(loss, mode="soft", tau=tau)
    # Move the online parameters away from the targets so the update has something to do.
    with torch.no_grad():
        for p in loss.parameters():
            p.add_(1.0)
    name = "qvalue_network" if stochastic else "value_network"
    online = getattr(loss, f"{name}_params").clone()
    target_before = getattr(loss, f"target_{name}_params").clone()
    updater.step()
    target_after = getattr(loss, f"target_{name}_params")
    for key, before in target_before.items(True, True):
        expected = (1 - tau) * before + tau * online[key]
        torch.testing.assert_close(target_after[key].data, expected.data, rtol=0, atol=1e-6)
        assert not torch.equal(target_after[key].data, before.data)


def test_hard_update_copies_every_interval(spec_env):
    _, actor, critic = _modules(spec_env, stochastic=False)
    loss = make_ddpg_loss(actor, critic, "agents")
    updater = make_target_updater(loss, mode="hard", hard_update_interval=2)
    with torch.no_grad():
        for p in loss.value_network_params.values(True, True):
            p.add_(1.0)
    online = loss.value_network_params.clone()
    updater.step()
    assert not torch.equal(loss.target_value_network_params["module", "mlp", "params", "0", "weight"].data,
                           online["module", "mlp", "params", "0", "weight"].data)
    updater.step()
    for key, value in online.items(True, True):
        torch.testing.assert_close(loss.target_value_network_params[key].data, value.data)


@pytest.mark.parametrize("algorithm", ["ddpg", "sac"])
def test_losses_leave_dead_agents_out(algorithm, spec_env):
    _, actor, critic = _modules(spec_env, stochastic=algorithm == "sac")
    make = make_ddpg_loss if algorithm == "ddpg" else make_sac_loss
    terms = DDPG_LOSS_TERMS if algorithm == "ddpg" else SAC_LOSS_TERMS
    loss = make(actor, critic, "agents", mask_key=("agents", "mask"))
    td = _transitions()
    td["agents", "mask"] = torch.ones(AB, AN, dtype=torch.bool)
    td["agents", "mask"][:4, 0] = False  # agent 0 died in the first 4 transitions
    changed = td.clone()
    changed["next", "agents", "reward"][:4, 0] = 1000.0

    def value_loss(batch):
        torch.manual_seed(0)  # SAC samples actions
        return loss(batch.clone())[terms[1]]

    assert torch.allclose(value_loss(td), value_loss(changed))
    live = td.clone()
    live["next", "agents", "reward"][:4, 1] = 1000.0
    assert not torch.allclose(value_loss(td), value_loss(live))


# --- DQN (IQL) and the VDN / QMIX mixers -------------------------------------------------------

QB, QN, QOBS, QA = 16, 3, 4, 5
Q_DISCRETE = Categorical(QA, shape=(QB, QN))


def _batch(team: bool = False) -> TensorDict:
    g = torch.Generator().manual_seed(2)
    done = torch.zeros(QB, QN, 1, dtype=torch.bool)
    done[:4] = True
    td = TensorDict({
        "agents": {"observation": torch.randn(QB, QN, QOBS, generator=g), "action": torch.randint(0, QA, (QB, QN), generator=g)},
        "next": {"agents": {"observation": torch.randn(QB, QN, QOBS, generator=g), "reward": torch.randn(QB, QN, 1, generator=g),
                            "done": done, "terminated": done.clone()}},
    }, batch_size=(QB,))
    if team:
        td["next", "team", "reward"] = td["next", "agents", "reward"].mean(-2)
        td["next", "team", "done"] = done[:, 0]
        td["next", "team", "terminated"] = done[:, 0].clone()
    return td


def _q(spec_env, dueling=False):
    return make_q_network(spec_env((QOBS,), Q_DISCRETE, batch=QB), "agents", num_cells=[16], dueling=dueling)


@pytest.mark.parametrize("double_dqn", [True, False])
@pytest.mark.parametrize("dueling", [True, False])
def test_dqn_loss_on_hand_made_batch(double_dqn, dueling, spec_env):
    q = _q(spec_env, dueling)
    loss = make_dqn_loss(q, "agents", double_dqn=double_dqn)
    td = _batch()
    out = loss(td)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in q.parameters())
    assert td["agents", "td_error"].shape[:2] == (QB, QN)  # one priority per agent


def _add_action_masks(td, g, always_allowed_next):
    """Random action masks (action 0 always allowed now, ``always_allowed_next`` next), the taken actions
    made allowed ones."""
    allowed = torch.rand(QB, QN, QA, generator=g) < 0.6
    allowed[..., 0] = True
    td["agents", "action"] = torch.where(allowed.gather(-1, td["agents", "action"].unsqueeze(-1)).squeeze(-1),
                                         td["agents", "action"], 0)
    td["agents", "action_mask"], td["next", "agents", "action_mask"] = allowed, torch.rand(QB, QN, QA, generator=g) < 0.5
    td["next", "agents", "action_mask"][..., always_allowed_next] = True


def _assert_same_as_torchrl(loss, torchrl_forward, td, td_error_key):
    """marlkit's forward of ``loss`` gives TorchRL's loss, TD errors and gradients on ``td``, bit for bit."""
    results = []
    for forward in (torchrl_forward, type(loss).forward):
        batch = td.clone()
        out = forward(loss, batch)
        out["loss"].backward()
        results.append((out["loss"], batch[td_error_key], [p.grad.clone() for p in loss.parameters()]))
        loss.zero_grad()
    (expected, expected_td, expected_grads), (got, got_td, grads) = results
    assert torch.equal(got, expected) and torch.equal(got_td, expected_td)
    assert len(grads) > 0 and all(torch.equal(a, b) for a, b in zip(expected_grads, grads, strict=True))
    assert loss._tensor_parts() is not None  # the comparison ran marlkit's path, not TorchRL's again


@pytest.mark.parametrize("double_dqn", [True, False])
@pytest.mark.parametrize("dueling", [True, False])
@pytest.mark.parametrize("share_params", [True, False])
@pytest.mark.parametrize("extras", ["plain", "weights-masks", "smooth_l1"])
def test_dqn_loss_equals_torchrl_dqn_loss_bit_for_bit(double_dqn, dueling, share_params, extras, spec_env):
    """marlkit's DQN loss works on the Q network's tensors; its loss, TD errors and gradients are TorchRL's
    ``DQNLoss.forward``'s exactly (target network apart from the online one, action masks, importance
    weights, a live-agent mask, done without termination)."""
    from torchrl.objectives import DQNLoss

    masks = extras == "weights-masks"
    env = spec_env((QOBS,), Q_DISCRETE, batch=QB, mask=masks)
    q = make_q_network(env, "agents", num_cells=[16], dueling=dueling, share_params=share_params)
    loss = make_dqn_loss(q, "agents", double_dqn=double_dqn, gamma=0.95, mask_key=("agents", "mask") if masks else None,
                         loss_function="smooth_l1" if extras == "smooth_l1" else "l2")
    with torch.no_grad():  # a target network that disagrees with the online one
        for target in loss.target_value_network_params.values(True, True):
            target.add_(torch.randn(target.shape, generator=torch.Generator().manual_seed(3)))
    td = _batch()
    td["next", "agents", "done"][4:6] = True  # truncated: done, not terminated
    if masks:
        g = torch.Generator().manual_seed(4)
        _add_action_masks(td, g, always_allowed_next=3)
        td["priority_weight"] = torch.rand(QB, QN, generator=g)
        td["agents", "mask"] = torch.rand(QB, QN, generator=g) < 0.8
    _assert_same_as_torchrl(loss, DQNLoss.forward, td, ("agents", "td_error"))
    # separate networks per agent: the target pass took the target parameters as an argument (no swap)
    values = loss._tensor_parts()[0]
    assert (loss._target_owner(values) is not None) == (not share_params)


@pytest.mark.parametrize("mixer", ["vdn", "qmix"])
def test_qmixer_loss_on_hand_made_batch(mixer, spec_env):
    q = _q(spec_env)
    loss = make_qmixer_loss(q, "agents", mixer=mixer, n_agents=QN, state_key=("agents", "observation"),
                            state_shape=(QN, QOBS))
    batch = _batch(team=True)
    out = loss(batch)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in q.parameters())
    if mixer == "qmix":
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.mixer_network_params.values(True, True))
    else:  # VDN by hand: (sum_i Q_i(a_i) - r - 0.9 (1 - terminated) sum_i max_a Q_i(next, a))^2
        chosen = q(batch.clone())["agents", "action_value"].gather(-1, batch["agents", "action"].unsqueeze(-1)).sum((-2, -1))
        best_next = q(batch["next"].clone())["agents", "action_value"].max(-1).values.sum(-1)
        target = batch["next", "team", "reward"][:, 0] + 0.9 * (~batch["next", "team", "terminated"][:, 0]) * best_next
        assert out["loss"].item() == pytest.approx(((chosen - target) ** 2).mean().item(), rel=1e-5)


@pytest.mark.parametrize("mixer", ["vdn", "qmix"])
@pytest.mark.parametrize("share_params", [True, False])
@pytest.mark.parametrize("extras", ["plain", "masks-state", "l1"])
def test_mixer_loss_equals_torchrl_qmixer_loss_bit_for_bit(mixer, share_params, extras, spec_env):
    """marlkit's VDN / QMIX loss works on the networks' tensors; its loss, TD errors and gradients (agents'
    network and mixer) are TorchRL's ``QMixerLoss.forward``'s exactly, with target networks apart from the
    online ones, action masks and a global state."""
    from torchrl.objectives.multiagent import QMixerLoss

    masks = extras == "masks-state"
    env = spec_env((QOBS,), Q_DISCRETE, batch=QB, mask=masks)
    q = make_q_network(env, "agents", num_cells=[16], share_params=share_params)
    state_key, state_shape = ("state", (7,)) if masks else (("agents", "observation"), (QN, QOBS))
    loss = make_qmixer_loss(q, "agents", mixer=mixer, n_agents=QN, state_key=state_key, state_shape=state_shape,
                            gamma=0.95, loss_function="l1" if extras == "l1" else "l2")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for target in (*loss.target_local_value_network_params.values(True, True),
                       *loss.target_mixer_network_params.values(True, True)):
            target.add_(torch.randn(target.shape, generator=g))
    td = _batch(team=True)
    if masks:
        _add_action_masks(td, g, always_allowed_next=2)
        td["state"], td["next", "state"] = torch.randn(QB, 7, generator=g), torch.randn(QB, 7, generator=g)
    _assert_same_as_torchrl(loss, QMixerLoss.forward, td, ("team", "td_error"))


def test_mixer_needs_several_agents(spec_env):
    with pytest.raises(ValueError, match="group 'agents' has 1: use algorithm=iql"):
        make_qmixer_loss(_q(spec_env), "agents", mixer="qmix", n_agents=1, state_key="state", state_shape=(3,))


def test_dqn_loss_leaves_dead_agents_out(spec_env):
    q = _q(spec_env)
    loss = make_dqn_loss(q, "agents", mask_key=("agents", "mask"))
    unmasked = make_dqn_loss(q, "agents")
    td = _batch()
    td["agents", "mask"] = torch.ones(QB, QN, dtype=torch.bool)
    td["agents", "mask"][:8, 2] = False  # agent 2 died in the first 8 transitions
    changed = td.clone()
    changed["next", "agents", "reward"][:8, 2] = 1000.0  # whatever a dead agent's entries hold
    assert torch.equal(loss(td.clone())["loss"], loss(changed.clone())["loss"])
    assert not torch.equal(unmasked(td.clone())["loss"], unmasked(changed.clone())["loss"])
    live = td.clone()
    live["next", "agents", "reward"][:8, 1] = 1000.0
    assert not torch.equal(loss(td.clone())["loss"], loss(live)["loss"])
