"""Communicating actors (``model.kind=commnet|attention``) and the probe tasks that isolate capabilities:
module shapes and message flow, the probe envs' specs, optimum and chance, every actor pipeline on a
tiny run, and bad input."""

from __future__ import annotations

import sys

import pytest
import torch
from torchrl.envs.utils import check_env_specs

from marlkit.envs import make_env
from marlkit.modules import agent_net, AttentionComm, CommNet, DeepSets, GraphNet, make_stochastic_actor
from marlkit.pipelines import make_config, pipeline_for
from marlkit.pipelines.checks import check_model_config
from marlkit.pipelines.config import ModelConfig

KINDS = ("commnet", "attention", "deepsets", "gnn")


@pytest.fixture(autouse=True)
def _generated_modules_in_tmp_path(temp_files_in_tmp_path):
    """torch_geometric writes the GATv2Conv modules it generates into tempfile's folder and never removes them."""


def _net(kind: str, n_agents: int = 3):
    return agent_net(kind, 6, 4, n_agents, centralised=False, share_params=True, num_cells=[16, 16],
                     activation="tanh", device="cpu", comm_rounds=2)


@pytest.mark.parametrize("kind", KINDS)
def test_comm_net_shapes_equivariance_and_messages(kind):
    torch.manual_seed(0)
    net = _net(kind)
    assert type(net) is {"commnet": CommNet, "attention": AttentionComm, "deepsets": DeepSets, "gnn": GraphNet}[kind]
    x = torch.randn(5, 7, 3, 6, requires_grad=True)
    y = net(x)
    assert y.shape == (5, 7, 3, 4)
    perm = torch.tensor([2, 0, 1])
    torch.testing.assert_close(net(x[..., perm, :]), y[..., perm, :])  # the agents' order does not matter
    y[..., 1, :].sum().backward()
    assert x.grad[..., 0, :].abs().sum() > 0 and x.grad[..., 2, :].abs().sum() > 0  # agent 1 hears 0 and 2
    lone = net(torch.randn(2, 1, 6))  # one agent: nobody to hear, still a finite output
    assert lone.shape == (2, 1, 4) and torch.isfinite(lone).all()
    assert net(torch.randn(4, 5, 6)).shape == (4, 5, 4)  # the same weights run on more agents


def test_gnn_radius_links_only_near_agents():
    net = agent_net("gnn", 6, 4, 3, centralised=False, share_params=True, num_cells=[16], activation="tanh",
                    device="cpu", comm_rounds=2, gnn_topology="radius", gnn_radius=1.0, gnn_position_dims=[0, 1])
    x = torch.zeros(2, 3, 6)
    x[:, 1, :2] = 0.5  # agent 1 within 1.0 of agent 0 (at the origin); agent 2 far away
    x[:, 2, :2] = 5.0
    x[..., 2:] = torch.randn(2, 3, 4)
    x.requires_grad_(True)
    edges, features = net.edges(x.detach())
    assert sorted(map(tuple, edges.t().tolist())) == [(0, 1), (1, 0), (3, 4), (4, 3)]  # per graph: 0 <-> 1 only
    # each edge carries the sender's position relative to the receiver, then their distance
    expected = {(0, 1): [-0.5, -0.5], (1, 0): [0.5, 0.5], (3, 4): [-0.5, -0.5], (4, 3): [0.5, 0.5]}
    for (sender, receiver), feature in zip(edges.t().tolist(), features.tolist()):
        assert feature == pytest.approx(expected[sender, receiver] + [0.5 ** 0.5])
    net(x)[:, 0].sum().backward()
    assert x.grad[:, 1, 2:].abs().sum() > 0 and x.grad[:, 2].abs().sum() == 0


def test_gnn_without_positions_has_no_edge_features_and_radius_needs_them():
    net = agent_net("gnn", 6, 4, 3, centralised=False, share_params=True, num_cells=[16], activation="tanh",
                    device="cpu", comm_rounds=1, gnn_position_dims=[])
    edges, features = net.edges(torch.randn(2, 3, 6))
    assert edges.shape == (2, 12) and features is None and net(torch.randn(2, 3, 6)).shape == (2, 3, 4)
    with pytest.raises(ValueError, match=r"model.gnn_topology=radius links agents by distance: set model.gnn_position_dims"):
        check_model_config(ModelConfig(kind="gnn", gnn_topology="radius", gnn_position_dims=[]))
    with pytest.raises(ValueError, match=r"model.gnn_position_dims=\[7\] are not observation entries"):
        agent_net("gnn", 6, 4, 3, centralised=False, share_params=True, num_cells=[16], activation="tanh",
                  device="cpu", gnn_position_dims=[7])


def test_gnn_without_torch_geometric_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_geometric", None)
    with pytest.raises(ValueError, match=r"model.kind=gnn needs the 'torch-geometric' package, .*marlkit\[graph\]"):
        check_model_config(ModelConfig(kind="gnn"))
    with pytest.raises(ImportError, match=r"marlkit\[graph\]"):
        _net("gnn")


def test_mlp_agents_hear_nothing():
    """The check above can fail: an MLP's agent 1 output has no gradient from agent 0's input."""
    x = torch.randn(5, 3, 6, requires_grad=True)
    _net("mlp")(x)[..., 1, :].sum().backward()
    assert x.grad[..., 0, :].abs().sum() == 0


@pytest.mark.parametrize("task,kwargs,length", [("communication", {"n_symbols": 3, "max_steps": 6}, 6),
                                                ("memory", {"delay": 4, "n_cues": 3}, 5)])
def test_probe_specs_optimum_chance_and_state(task, kwargs, length):
    env = make_env(f"probe/{task}", num_envs=64, seed=0, **kwargs)
    check_env_specs(env)
    n_choices = kwargs.get("n_symbols", kwargs.get("n_cues"))

    def oracle(td):  # reads what a perfect policy would know: the symbol (speaker's view) or the cue
        base = env.base_env
        answer = base.symbol.unsqueeze(-1).expand(-1, base.n_agents) if task == "communication" else base.cue
        td["agents", "action"] = answer.clone()
        return td

    def constant(td):
        td["agents", "action"] = torch.zeros(64, 2, dtype=torch.long)
        return td

    best = env.rollout(length, oracle)
    assert best["next", "done"][:, -1].all() and not best["next", "done"][:, :-1].any()
    returns = best["next", "agents", "episode_reward"][:, -1]
    assert torch.equal(returns, torch.full_like(returns, float(length if task == "communication" else 1)))
    chance = env.rollout(length, constant)["next", "agents", "episode_reward"][:, -1]
    expected = (length if task == "communication" else 1) / n_choices
    assert abs(chance.mean().item() - expected) < 0.15 * max(expected, 1)  # a fixed answer is right 1/n of the time
    state = env.base_env.simulator_state()
    first = env.rollout(3, constant, auto_reset=False, tensordict=env.reset())
    env.base_env.load_simulator_state(state)
    second = env.rollout(3, constant, auto_reset=False, tensordict=env.reset())
    torch.testing.assert_close(first["agents", "observation"], second["agents", "observation"])


def test_probe_communication_listener_sees_nothing_of_the_symbol():
    env = make_env("probe/communication", num_envs=32, seed=1, n_agents=3)
    obs = env.reset()["agents", "observation"]
    symbol = env.base_env.symbol
    assert torch.equal(obs[:, 0, 3:].argmax(-1), symbol) and obs[:, 1:, 3:].abs().sum() == 0


NAVIGATION = ("vmas/navigation", {"env.n_agents": 2, "env.max_steps": 10})
PIPELINES = {"mappo": ("probe/communication", {}), "ippo": ("probe/communication", {}),
             "maa2c": ("probe/communication", {}), "coma": ("probe/communication", {}),
             "maddpg": NAVIGATION, "masac": NAVIGATION}
CASES = [(algorithm, kind) for algorithm in PIPELINES for kind in ("commnet", "gnn")] + [
    ("mappo", "attention"), ("mappo", "deepsets"), ("maddpg", "attention"), ("masac", "deepsets")]


@pytest.mark.parametrize("algorithm,kind", CASES, ids=[f"{a}-{k}" for a, k in CASES])
def test_comm_actor_trains_in_every_actor_pipeline(algorithm, kind, tiny_config, tmp_run_dir, read_metrics):
    env, overrides = PIPELINES[algorithm]
    cfg = tiny_config(algorithm, env, tmp_run_dir, **{"model.kind": kind, "model.comm_rounds": 1, **overrides})
    result = pipeline_for(algorithm).train(cfg)
    assert result.frames == 200 and len(read_metrics(tmp_run_dir)) == 2


@pytest.mark.parametrize("model,match", [
    ({"kind": "transformer"},
     r"model.kind='transformer' is not a network kind; accepted: mlp, commnet, attention, deepsets, gnn, gru, lstm"),
    ({"kind": "gnn", "gnn_topology": "ring"}, r"model.gnn_topology='ring'; accepted: full, radius"),
    ({"kind": "gnn", "gnn_radius": 0.0}, r"model.gnn_radius must be finite and > 0, got 0.0"),
    ({"kind": "commnet", "comm_rounds": 0}, r"model.comm_rounds must be an integer >= 1, got 0"),
    ({"kind": "attention", "share_params": False}, r"model.kind=attention shares one network .* model.share_params=true"),
])
def test_bad_model_kinds_are_refused(model, match):
    with pytest.raises(ValueError, match=match):
        check_model_config(ModelConfig(**model))


def test_qlearning_refuses_a_comm_kind_and_probe_names_are_checked(cli_rejects):
    cli_rejects(["train", "qmix", "--env", "probe/communication", "model.kind=commnet"],
                r"model.kind=commnet picks an actor's network; qmix's Q networks are MLPs")
    cli_rejects(["train", "mappo", "--env", "probe/memory", "env.max_steps=5"],
                r"probe/memory lasts delay \+ 1 steps; set env.max_steps=null and use env.delay")
    cli_rejects(["train", "mappo", "--env", "probe/telepathy"], r"unknown probe task 'telepathy'; available: probe/")
    with pytest.raises(ValueError, match=r"unknown probe/memory arguments \['n_symbols'\]; accepted"):
        make_env("probe/memory", n_symbols=3)
    with pytest.raises(ValueError, match=r"probe/communication needs n_agents >= 2"):
        make_env("probe/communication", n_agents=1)


def test_comm_actor_from_the_factory_in_a_notebook():
    env = make_env("probe/communication", num_envs=4, seed=0)
    actor = make_stochastic_actor(env, "agents", num_cells=[8], kind="attention", comm_rounds=3)
    td = actor(env.reset())
    assert td["agents", "action"].shape == (4, 2) and td["agents", "logits"].shape == (4, 2, 4)
    cfg = make_config("mappo", overrides={"model.kind": "attention"})
    assert cfg.model.kind == "attention" and cfg.model.comm_rounds == 2


def test_a_shared_policy_is_evaluated_on_more_agents(tiny_config, tmp_path, capsys):
    """Trained with 3 agents, evaluated with 5: the GNN's and a shared MLP's weights fit any agent count
    (the centralised critic, sized for 3, is left out); one set of weights per agent does not."""
    from marlkit.pipelines.cli import main as cli_main

    runs = {}
    for name, extra in (("gnn", {"model.kind": "gnn"}), ("separate", {"model.share_params": False})):
        runs[name] = tmp_path / name
        pipeline_for("mappo").train(tiny_config("mappo", "vmas/navigation", runs[name], **{
            "env.n_agents": 3, "env.max_steps": 10, "train.minibatch_size": 50, **extra}))
    assert cli_main(["eval", str(runs["gnn"]), "--episodes", "2", "env.n_agents=5"]) == 0
    assert "agents: mean return" in capsys.readouterr().out and (runs["gnn"] / "eval_n_agents=5.json").exists()
    with pytest.raises(SystemExit):
        cli_main(["eval", str(runs["separate"]), "--episodes", "2", "env.n_agents=5"])
    err = capsys.readouterr().err
    assert "does not fit vmas/navigation env.n_agents=5" in err and "other shapes" in err and err.count("\n") == 1
    with pytest.raises(SystemExit):
        cli_main(["eval", str(runs["gnn"]), "train.lr=1"])
    assert "only env.* settings change for an evaluation" in capsys.readouterr().err
