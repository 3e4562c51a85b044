"""Check: does TorchRL's PPO path give the same numbers in marlkit's TorchRL and in BenchMARL's?

BenchMARL 1.5.2 needs torchrl < 0.12 (0.11.1) while marlkit runs 0.14.1. This script collects one
batch of VMAS balance (3 agents, 60 copies x 100 steps) with a MAPPO-shaped actor and centralised
critic, saves the batch and the weights, then, in each Python given, rebuilds the same modules from
plain TorchRL parts, loads the weights and computes GAE (gamma 0.99, lambda 0.9) and ``ClipPPOLoss``
(clip 0.2, L2 critic) on the first 400 frames, with the gradient norms of actor and critic. It prints the
largest absolute difference of each quantity between the two.

``--marlkit-task TASK`` checks the other half: marlkit's own MAPPO learner (actor, critic and loss built by
``pipelines/mappo.py`` from ``learning_vs_benchmarl``'s settings for TASK) against the same plain TorchRL
parts carrying its weights, on one batch of TASK collected by marlkit's env and policy.

    python benchmarks/ppo_versions.py [--other-python /tmp/benchmarl-venv/bin/python] [--envs 60] [--steps 100]
    python benchmarks/ppo_versions.py --marlkit-task dispersion
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def modules(env, n_agents: int):
    from tensordict.nn import NormalParamExtractor, TensorDictModule
    from torchrl.modules import MultiAgentMLP, ProbabilisticActor, TanhNormal

    spec = env.full_action_spec["agents", "action"]
    obs = env.observation_spec["agents", "observation"].shape[-1]
    net = torch.nn.Sequential(MultiAgentMLP(n_agent_inputs=obs, n_agent_outputs=2 * spec.shape[-1], n_agents=n_agents,
                                            centralised=False, share_params=True, num_cells=[256, 256],
                                            activation_class=torch.nn.Tanh), NormalParamExtractor())
    actor = ProbabilisticActor(
        TensorDictModule(net, in_keys=[("agents", "observation")], out_keys=[("agents", "loc"), ("agents", "scale")]),
        spec=spec, in_keys=[("agents", "loc"), ("agents", "scale")], out_keys=[("agents", "action")],
        distribution_class=TanhNormal, distribution_kwargs={"low": spec.space.low, "high": spec.space.high},
        return_log_prob=True, log_prob_key=("agents", "sample_log_prob"))
    critic = TensorDictModule(
        MultiAgentMLP(n_agent_inputs=obs, n_agent_outputs=1, n_agents=n_agents, centralised=True, share_params=True,
                      num_cells=[256, 256], activation_class=torch.nn.Tanh),
        in_keys=[("agents", "observation")], out_keys=[("agents", "state_value")])
    return actor, critic


def worker(mode: str, path: Path, envs: int, steps: int) -> None:
    """``make``: collect and save; otherwise compute and save the results as ``res_<mode>.pt``."""
    from tensordict import TensorDict
    from torchrl.envs.libs.vmas import VmasEnv
    from torchrl.envs.utils import ExplorationType, set_exploration_type

    torch.manual_seed(0)
    env = VmasEnv("balance", num_envs=envs, continuous_actions=True, max_steps=100, seed=0, n_agents=3)
    actor, critic = modules(env, 3)
    if mode == "make":
        with torch.no_grad(), set_exploration_type(ExplorationType.RANDOM):
            batch = env.rollout(steps, actor, break_when_any_done=False)
        torch.save({"batch": batch.to_dict(), "actor": [p.detach().clone() for p in actor.parameters()],
                    "critic": [p.detach().clone() for p in critic.parameters()]}, path / "data.pt")
        return
    data = torch.load(path / "data.pt", weights_only=False)
    batch = TensorDict(data["batch"], batch_size=[envs, steps])
    with torch.no_grad():  # the weights by position: the two versions name them differently
        for module, saved in ((actor, data["actor"]), (critic, data["critic"])):
            for p, q in zip(module.parameters(), saved, strict=True):
                p.copy_(q)
    for flag in ("done", "terminated"):
        batch["next", "agents", flag] = batch["next", flag].unsqueeze(-1).expand(envs, steps, 3, 1)
    torch.save(gae_and_loss(plain_loss(actor, critic, 0.99, 0.9), batch), path / f"res_{mode}.pt")


def plain_loss(actor, critic, gamma: float, lmbda: float):
    """TorchRL's ClipPPOLoss (clip 0.2, L2 critic, no entropy, no advantage normalisation) with GAE."""
    from torchrl.objectives import ClipPPOLoss, ValueEstimators


    loss = ClipPPOLoss(actor_network=actor, critic_network=critic, clip_epsilon=0.2, entropy_bonus=False,
                       critic_coeff=1.0, loss_critic_type="l2", normalize_advantage=False)
    loss.set_keys(reward=("agents", "reward"), action=("agents", "action"), done=("agents", "done"),
                  terminated=("agents", "terminated"), advantage=("agents", "advantage"),
                  value_target=("agents", "value_target"), value=("agents", "state_value"),
                  sample_log_prob=("agents", "sample_log_prob"))
    loss.make_value_estimator(ValueEstimators.GAE, gamma=gamma, lmbda=lmbda)
    return loss


def gae_and_loss(loss, batch) -> dict[str, torch.Tensor]:
    """GAE over ``batch``, then the loss and its gradient norms on its first 400 frames."""
    with torch.no_grad():
        loss.value_estimator(batch, params=loss.critic_network_params, target_params=loss.target_critic_network_params)
    out = loss(batch.reshape(-1)[:400])
    (out["loss_objective"] + out["loss_critic"]).backward()

    def norm(params) -> torch.Tensor:
        return torch.stack([p.grad.norm() for p in params.values(True, True)]).norm()

    return {"advantage": batch["agents", "advantage"], "value_target": batch["agents", "value_target"],
            "loss_objective": out["loss_objective"].detach(), "loss_critic": out["loss_critic"].detach(),
            "actor_grad_norm": norm(loss.actor_network_params), "critic_grad_norm": norm(loss.critic_network_params)}


def marlkit_against_plain(task: str, envs: int, steps: int) -> None:
    """marlkit's MAPPO learner for ``task`` against plain TorchRL parts with its weights, on one batch."""
    from learning_vs_benchmarl import ARMS, MAPPO, marlkit_overrides
    from torchrl.envs.libs.vmas import VmasEnv
    from torchrl.envs.utils import ExplorationType, set_exploration_type

    from marlkit.pipelines import make_config
    from marlkit.pipelines.environment import build_env
    from marlkit.pipelines.mappo import build_group

    torch.manual_seed(0)
    cfg = make_config("mappo", None, {**marlkit_overrides(MAPPO, task, 0, 300_000), **ARMS["marlkit"], "env.num_envs": envs})
    env = build_env(cfg.env, device="cpu", seed=0, model=cfg.model)
    marlkit = build_group(env, "agents", cfg, torch.device("cpu")).loss
    n_agents = len(env.group_map["agents"])
    actor, critic = modules(VmasEnv(task, num_envs=1, continuous_actions=True, **cfg.env.kwargs), n_agents)
    with torch.no_grad():
        for plain, ours in ((actor, marlkit.actor_network), (critic, marlkit.critic_network)):
            for p, q in zip(plain.parameters(), ours.parameters(), strict=True):
                p.copy_(q)
        with set_exploration_type(ExplorationType.RANDOM):
            batch = env.rollout(steps, marlkit.actor_network, break_when_any_done=False)
    plain_batch = batch.clone()
    plain_batch["agents", "sample_log_prob"] = plain_batch["agents", "action_log_prob"]
    plain = plain_loss(actor, critic, cfg.loss.gamma, cfg.loss.lmbda)
    ours, theirs = gae_and_loss(marlkit, batch), gae_and_loss(plain, plain_batch)
    print(f"marlkit's MAPPO learner against plain TorchRL parts with its weights, one {task} batch of {envs} x {steps} "
          f"collected by marlkit (episodes ended: {int(batch['next', 'done'].sum())})\n")
    print("| quantity | mean size | largest difference |")
    print("|---|---|---|")
    for key, value in ours.items():
        print(f"| {key} | {float(value.abs().mean()):.6g} | {float((value - theirs[key]).abs().max()):.3g} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--other-python", default="/tmp/benchmarl-venv/bin/python")
    parser.add_argument("--envs", type=int, default=60)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--marlkit-task", default=None, help="compare marlkit's learner with plain TorchRL on this task")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.marlkit_task:
        marlkit_against_plain(args.marlkit_task, args.envs, args.steps)
        return
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]), args.envs, args.steps)
        return
    with tempfile.TemporaryDirectory() as tmp:
        versions = {}
        for mode, python in (("make", sys.executable), ("this", sys.executable), ("other", args.other_python)):
            cmd = [python, __file__, "--envs", str(args.envs), "--steps", str(args.steps), "--worker", mode, tmp]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{python} failed:\n{done.stderr[-2000:]}")
            versions[mode] = subprocess.run([python, "-c", "import torchrl; print(torchrl.__version__)"],
                                            capture_output=True, text=True).stdout.strip()
        this, other = (torch.load(Path(tmp) / f"res_{m}.pt") for m in ("this", "other"))
    print(f"torchrl {versions['this']} ({sys.executable}) against torchrl {versions['other']} ({args.other_python}), "
          f"one balance batch of {args.envs} x {args.steps}, the same weights\n")
    print("| quantity | mean size | largest difference |")
    print("|---|---|---|")
    for key, value in this.items():
        print(f"| {key} | {float(value.abs().mean()):.6g} | {float((value - other[key]).abs().max()):.3g} |")


if __name__ == "__main__":
    main()
