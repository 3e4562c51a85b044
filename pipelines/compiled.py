"""``train.compile`` for Q-learning: one whole update of independent learners with per-agent prioritized
replay (SUPER's layout: :class:`~marlkit.pipelines.replay.SharedReplay`) compiled as one graph.

An eager update of SUPER's 8 small pursuer networks (32 samples each) runs a few hundred tiny kernels, each
dispatched from Python: on a CPU the dispatching, not the arithmetic, is most of its cost. Here the draw
from the priority table, the gather from every agent's storage, the double-DQN loss, its gradient
(``torch.func.grad``), the gradient-norm clip, Adam and the new priorities are one function compiled by
``torch.compile`` (inductor), so they run as a handful of fused kernels. It computes what the eager update
computes (the same draw from the same random numbers, TorchRL's TD(0) target, distance loss and weighted
mean, ``clip_grad_norm_``'s scale, ``torch.optim.Adam``'s step, a step skipped when the loss or the gradient
norm is not finite); the fused kernels round differently, so results agree to float precision, not bit for bit.

The parameters, the Adam moments and step counts (in the optimiser's own ``state``, so checkpoints and
resume are unchanged), the target copy and the priority table are updated in place; the batched weights and
what follows them are kept in their gradients' memory layout (:func:`in_gradient_layout`). It holds those
tensors from when it is built, which :func:`marlkit.pipelines.qlearning.train` does after a resumed run has
loaded its state (Adam's from its first step, when the optimiser makes it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from tensordict import NestedKey, TensorDict, TensorDictBase
from torchrl.objectives.utils import distance_loss
from torchrl.objectives.value.functional import td0_return_estimate

from marlkit.losses import IndependentDQNLoss, run_with

from .learners import finish_step, Learner
from .replay import SharedReplay

Params = dict[tuple[str, ...], torch.Tensor]


def _nested(key: NestedKey) -> tuple[str, ...]:
    return (key,) if isinstance(key, str) else tuple(key)


def clip_scale(grads: list[torch.Tensor], max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``clip_grad_norm_``'s arithmetic as tensor code: the norm over all ``grads`` and the factor (at most 1)
    every gradient is multiplied by."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    return norm, torch.clamp(max_norm / (norm + 1e-6), max=1.0)


def adam_values(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step_size: torch.Tensor,
                root_correction: torch.Tensor, betas: tuple[float, float],
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.optim.Adam``'s step as tensor code (no weight decay): the new parameter and moments, with
    ``step_size = lr / (1 - beta1^t)`` and ``root_correction = sqrt(1 - beta2^t)`` for step ``t``."""
    beta1, beta2 = betas
    m = torch.lerp(m, g, 1 - beta1)
    v = beta2 * v + (1 - beta2) * g * g
    return p - step_size * m / (v.sqrt() / root_correction + eps), m, v


def bias_corrections(lr: float, betas: tuple[float, float], count: float) -> tuple[float, float]:
    """Adam's ``step_size = lr / (1 - beta1^t)`` and ``root_correction = sqrt(1 - beta2^t)`` for step ``t``
    (``count``), in double precision as the fused kernel computes them."""
    beta1, beta2 = betas
    return lr / (1 - beta1 ** count), math.sqrt(1 - beta2 ** count)


def in_gradient_layout(tensor: torch.Tensor) -> None:
    """Store a batched weight ``[agents, out, in]`` (same shape and values) as the transpose of a contiguous
    ``[agents, in, out]`` tensor, the layout its gradient comes out of the batched matmul's backward in.

    The fused clip + Adam kernel reads each weight, its gradient and its moments element by element: with the
    weight in the usual layout it read the gradient through transposed tiles. In the gradient's layout (the
    moments follow the weight's) every read runs along memory: 18-24% less time per compiled SUPER update, in
    blocks alternated in one process (benchmarks/results/super_compiled/gradient_layout.txt). The values are
    the same; the products' rounding is not, so runs differ from those made in the other layout."""
    if tensor.dim() == 3 and tensor.stride(1) != 1:
        tensor.data = tensor.data.transpose(1, 2).contiguous().transpose(1, 2)


def compile_problem(algorithm: str, model_kind: str, share_params: bool, prioritized: bool) -> str | None:
    """Why ``train.compile=true`` cannot run with these settings (the fix included), or None."""
    if algorithm != "iql":
        return f"train.compile=true compiles independent learners' updates: algorithm={algorithm!r} needs iql"
    if model_kind != "mlp" or share_params:
        return (f"train.compile=true compiles per-agent MLP Q networks: got model.kind={model_kind!r}, "
                f"model.share_params={share_params}; use model.kind=mlp and model.share_params=false")
    if not prioritized:
        return "train.compile=true compiles the per-agent prioritized replay's draw: set replay.prioritized=true"
    return None


class CompiledQUpdate:
    """One learner's update (sample, loss, gradient, clip, Adam, new priorities) as one compiled graph.

    Calling it makes one optimiser step and returns the loss output (``loss``) for logging, as the eager
    steps in :func:`marlkit.pipelines.qlearning.train` do. Raises ``ValueError`` at construction for a
    layout it does not compile, naming what differs.
    """

    def __init__(self, name: str, learner: Learner, optimiser: torch.optim.Optimizer, max_grad_norm: float):
        replay, loss = learner.replay, learner.loss
        where = f"train.compile=true (learner {name!r})"
        if not isinstance(replay, SharedReplay) or not replay.prioritized:
            raise ValueError(f"{where} compiles a group of several agents with per-agent prioritized replay; "
                             "set train.compile=false for this env")
        layout = loss.batched_layout() if isinstance(loss, IndependentDQNLoss) else None
        if layout is None or loss.reduction != "mean":
            raise ValueError(f"{where} compiles the TD(0) DQN loss of per-agent MLP Q networks without action "
                             "masks; this group's loss differs: set train.compile=false")
        values, owner, obs_key, mask_key = layout
        trained = list(loss.parameters())
        group = optimiser.param_groups
        if (len(group) != 1 or {id(p) for p in group[0]["params"]} != {id(p) for p in trained}
                or group[0]["weight_decay"] or group[0]["amsgrad"] or group[0]["maximize"]):
            raise ValueError(f"{where} compiles plain Adam over the Q networks' parameters; set train.compile=false")
        self.learner, self.optimiser, self.replay = learner, optimiser, replay
        self.values, self.owner, self.max_grad_norm = values, owner, max_grad_norm
        self.online_params = values[owner].params  # the Parameters the optimiser trains, in place
        if {id(p) for p in self.online_params.values(True, True)} != {id(p) for p in trained}:
            raise ValueError(f"{where}: the loss's parameters are not its network's; set train.compile=false")
        estimated = loss.value_estimator.tensor_keys
        self.fields = (obs_key, ("next", *_nested(obs_key)), loss.tensor_keys.action,
                       ("next", *_nested(estimated.reward)), ("next", *_nested(estimated.terminated)))
        self.fields += (mask_key,) if mask_key is not None else ()
        self.gamma = float(loss.value_estimator.gamma)
        self.priority_eps, self.beta, self.table = replay.buffers[0].sampler.eps, replay.beta, replay.table
        self.double_dqn, self.loss_function = loss.double_dqn, loss.loss_function
        self.weighted = loss.use_prioritized_weights is not False  # TorchRL's weighted mean, else the plain one
        for tensor in [*self.online_params.values(True, True), *loss.target_params().values(True, True)]:
            in_gradient_layout(tensor)  # in place (the same tensor objects), before anything reads them
        # Trained in place, so read once: the optimiser's parameters and the target copy (hard updates copy
        # into it); Adam's state once the first step has made it.
        self.online = {key: p.detach() for key, p in self.online_params.items(True, True)}
        self.target = dict(loss.target_params().items(True, True))
        self.adam: tuple[Params, Params, Params] | None = None
        self._columns: tuple[list, list[tuple[torch.Tensor, ...]]] | None = None
        # The graph reads the network modules, whose structure never changes during training (their
        # parameters come in as inputs): checking them before each call cost more than the update's kernels.
        # cpp_wrapper calls the kernels from C++ instead of from a Python wrapper one at a time: the same kernels
        # and numbers, 4-10% less training time per SUPER iteration (benchmarks/results/super_compiled/
        # tenth_budget_cpp_wrapper.txt).
        self._graph = torch.compile(self._update, dynamic=False, fullgraph=True,
                                    options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
                                             "cpp_wrapper": True})

    def _adam_state(self, params: Mapping[tuple[str, ...], torch.Tensor]) -> tuple[Params, Params, Params]:
        """The optimiser's moments and step counts per parameter, made as ``torch.optim.Adam`` makes them
        before its first step (so a checkpoint holds the usual optimiser state)."""
        first, second, steps = {}, {}, {}
        for key, p in params.items():
            state = self.optimiser.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            for name in ("exp_avg", "exp_avg_sq"):  # a resumed run's moments in the parameter's layout
                if state[name].stride() != p.stride():
                    state[name] = torch.empty_like(p).copy_(state[name])
            first[key], second[key], steps[key] = state["exp_avg"], state["exp_avg_sq"], state["step"]
        return first, second, steps

    def __call__(self) -> TensorDictBase:
        """One optimiser step; the loss output for logging."""
        replay = self.replay
        lengths = replay.lengths()
        if min(lengths) == 0:
            raise RuntimeError("cannot sample from an empty buffer")
        uniform = torch.rand(replay.n_agents, replay.batch_size, dtype=torch.float64)  # the eager draw's numbers
        if self.adam is None:
            self.adam = self._adam_state(dict(self.online_params.items(True, True)))
        first, second, steps = self.adam
        group = self.optimiser.param_groups[0]
        (beta1, beta2), count = group["betas"], self.next_count()
        # Adam's bias corrections for this step, as tensors: one value for all parameters, and a new number
        # every step (a Python number would recompile the graph)
        corrections = torch.tensor([*bias_corrections(group["lr"], (beta1, beta2), count), count])
        stored = replay._columns()  # the same list until a storage is replaced (first write, resume)
        if self._columns is None or self._columns[0] is not stored:
            self._columns = (stored, [tuple(fields[key] for key in self.fields) for fields in stored])
        columns = self._columns[1]
        with torch.no_grad():  # the graph takes its own gradient (torch.func.grad); the rest updates in place
            loss, bad, largest = self._graph(self.online, first, second, steps, self.target, columns,
                                             torch.as_tensor(lengths), uniform, corrections, beta1, beta2,
                                             float(group["eps"]))
        for sampler, value in zip((buffer.sampler for buffer in replay.buffers), largest.tolist(), strict=True):
            sampler.max_priority = max(sampler.max_priority, value)
        finish_step(self.learner, bad)
        return TensorDict(loss=loss)

    def next_count(self) -> float:
        """The number of the coming Adam step (every parameter's count is the same)."""
        return float(next(iter(self.adam[2].values()))) + 1

    def _update(self, online: Params, first: Params, second: Params, steps: Params, target: Params,
                columns: list[tuple[torch.Tensor, ...]], lengths: torch.Tensor, uniform: torch.Tensor,
                corrections: torch.Tensor, beta1: float, beta2: float,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The compiled update: returns the loss, the non-finite flags (loss, gradient norm) and each
        agent's largest new priority."""
        index, batch, weight = self.draw(columns, lengths, uniform)

        def objective(params: Params) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
            return self._loss(params, target, *batch, weight)

        grads, (loss, squared) = torch.func.grad(objective, has_aux=True)(online)
        norm, scale = clip_scale(list(grads.values()), self.max_grad_norm)  # one norm over all parameters
        bad = ~torch.isfinite(torch.stack([loss, norm]))
        skip = bad.any()  # a non-finite step is skipped, as the fused Adam's found_inf skips it
        step_size, root_correction, count = corrections.unbind()
        for key, p in online.items():
            new, m, v = adam_values(p, grads[key] * scale, first[key], second[key], step_size, root_correction,
                                    (beta1, beta2), eps)
            p.copy_(torch.where(skip, p, new))
            first[key].copy_(torch.where(skip, first[key], m))
            second[key].copy_(torch.where(skip, second[key], v))
            steps[key].copy_(torch.where(skip, steps[key], count))
        # agent i's slots get agent i's |TD| + eps (a non-finite one 0 + eps, as td_priority does)
        priority = squared.sqrt().t().nan_to_num(nan=0.0, posinf=0.0) + self.priority_eps
        self.table.set_all_rows(index, priority)
        return loss, bad, priority.amax(1)

    def draw(self, columns: list[tuple[torch.Tensor, ...]], lengths: torch.Tensor,
             uniform: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """The minibatch drawn with ``uniform`` (tensor code, traced into the graph): the slots
        ``[n_agents, B]``, each field ``[B, n_agents, ...]`` (agent i's from its own buffer) and the importance
        weights ``[B, n_agents]``."""
        index, weight = self.table.draw_with(torch.arange(len(columns)), lengths, uniform, self.beta)
        batch = [torch.stack([column[k].index_select(0, row) for column, row in zip(columns, index.unbind(0))], dim=1)
                 for k in range(len(self.fields))]
        return index, batch, weight.t()

    def _loss(self, params: Params, target: Params, obs: torch.Tensor, next_obs: torch.Tensor, action: torch.Tensor,
              reward: torch.Tensor, terminated: torch.Tensor, *mask_and_weight: torch.Tensor
              ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """:class:`IndependentDQNLoss`'s loss (TD(0), double DQN or not; the importance-weighted mean over live
        agents, as TorchRL reduces it) and the squared TD errors ``[B, n_agents]``."""
        *mask, weight = mask_and_weight
        values, owner = self.values, self.owner
        chosen = torch.gather(run_with(values, owner, params, obs), -1, action.unsqueeze(-1)).squeeze(-1)
        next_target = run_with(values, owner, target, next_obs)
        chooser = run_with(values, owner, params, next_obs) if self.double_dqn else next_target
        next_action = torch.argmax(chooser.detach(), dim=-1)
        next_value = torch.gather(next_target, -1, next_action.unsqueeze(-1))
        goal = td0_return_estimate(self.gamma, next_value, reward, terminated).squeeze(-1).detach()
        squared = (chosen - goal).detach().pow(2)
        error = distance_loss(chosen, goal, self.loss_function)
        if not self.weighted:
            weight = torch.ones_like(weight)  # the plain mean
        if mask:  # dead agents' entries left out
            error = torch.where(mask[0], error, torch.zeros_like(error))
            weight = weight * mask[0].to(weight.dtype)
        mean = (error * weight).sum() / weight.sum()
        return mean, (mean.detach(), squared)
