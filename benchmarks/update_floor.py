"""Benchmark: the floor under a SUPER (``pursuit-super``) update, and what ``torch.compile`` takes off it.

One update of the 8 pursuers' dueling double DQN, written as plain tensor code with no TensorDict, replay or
loss module around it: the online network on 32 observations per agent (7x7x3, flat), the target and online
networks on the next ones (double Q), the TD target, the importance-weighted Huber loss (the preset's
``smooth_l1``; the squared errors are the new priorities), backward, one gradient-norm clip over all
parameters and fused Adam. The networks (tanh, as the preset since 2026-12-06; ReLU and the squared error
before, in the results committed until then) are one batched matmul per layer for all agents, as marlkit's
``AgentMLP`` runs them. It is timed eagerly and with the loss compiled
(``torch.compile``, inductor; its backward is compiled with it), interleaved round by round, one thread.
``python benchmarks/super_update_cost.py`` times marlkit's whole update (replay draw and re-prioritisation
included) for comparison.

``compiled step`` compiles the whole step as one graph: the loss's gradient through ``torch.func.grad``, the
clip and Adam written as tensor code (:func:`functional_step`, with the arithmetic ``train.compile`` runs,
from ``marlkit.pipelines.compiled``), so nothing of the step runs eagerly between kernels. It is what a fully
compiled update could cost; it also rounds differently from the eager step.

``--replay`` puts the replay around it, still without TensorDict or TorchRL: every agent's minibatch drawn in
one pass over marlkit's priority table (``PriorityBlocks``, the code ``SharedReplay`` runs, on buffers of
``--capacity`` slots, full), gathered from each agent's storage tensors (one ``index_select`` per agent and
field, as ``SharedReplay.sample`` does), and the agents' slots re-prioritised with the new |TD errors|.
``--obs-bytes`` stores the observations as ``uint8`` and converts the gathered ones to float (exact for
pursuit's 0/1 walls and small counts, a quarter of the memory to read; marlkit stores float32). It
prints the three parts (draw and gather, update, re-prioritise) and the whole. The eager figure is what an
update of marlkit's SUPER would cost on this CPU with no framework around the same operations; the compiled
one rounds differently.

    python benchmarks/update_floor.py [--rounds 3] [--updates 2000] [--threads 1] [--no-compile] [--whole-step]
        [--replay [--capacity 120000] [--obs-bytes]]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from marlkit.pipelines.compiled import adam_values, clip_scale
from marlkit.pipelines.replay import PriorityBlocks, td_priority

AGENTS, BATCH, OBS, HIDDEN, ACTIONS = 8, 32, 7 * 7 * 3, 64, 5


def q_values(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Dueling Q values ``[agents, batch, actions]`` of every agent's MLP [64, 64] (tanh, as the preset)."""
    w1, b1, w2, b2, w3, b3 = params
    h = torch.tanh(torch.bmm(x, w1.transpose(1, 2)) + b1.unsqueeze(1))
    h = torch.tanh(torch.bmm(h, w2.transpose(1, 2)) + b2.unsqueeze(1))
    out = torch.bmm(h, w3.transpose(1, 2)) + b3.unsqueeze(1)
    value, advantage = out[..., :1], out[..., 1:]
    return value + advantage - advantage.mean(-1, keepdim=True)


def td_loss(params: list[torch.Tensor], target: list[torch.Tensor], obs: torch.Tensor, next_obs: torch.Tensor,
            action: torch.Tensor, reward: torch.Tensor, terminated: torch.Tensor,
            weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance-weighted double-DQN loss and the squared TD errors (the new priorities)."""
    chosen = q_values(params, obs).gather(-1, action.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        best = q_values(params, next_obs).argmax(-1, keepdim=True)
        next_value = q_values(target, next_obs).gather(-1, best).squeeze(-1)
        goal = reward + 0.99 * next_value * (~terminated)
    huber = torch.nn.functional.smooth_l1_loss(chosen, goal, reduction="none")
    return (huber * weight).mean(), (chosen - goal).detach().pow(2)


ADAM = {"lr": 1.6e-4, "betas": (0.9, 0.999), "eps": 1e-8}
MAX_GRAD_NORM = 40.0


def initial_params(generator: torch.Generator) -> list[torch.Tensor]:
    """The 8 networks' weights and biases, each layer batched over the agents (as :func:`q_values` reads them)."""
    shapes = [(AGENTS, HIDDEN, OBS), (AGENTS, HIDDEN), (AGENTS, HIDDEN, HIDDEN), (AGENTS, HIDDEN),
              (AGENTS, ACTIONS + 1, HIDDEN), (AGENTS, ACTIONS + 1)]
    return [torch.randn(shape, generator=generator) * 0.1 for shape in shapes]


def fresh_state(params: list[torch.Tensor]) -> list:
    """:func:`functional_step`'s state before the first step: a copy of ``params``, zero moments, count 0."""
    return [[p.detach().clone() for p in params], [torch.zeros_like(p) for p in params],
            [torch.zeros_like(p) for p in params], torch.zeros(())]


def functional_step(params: list[torch.Tensor], moments: list[torch.Tensor], squares: list[torch.Tensor],
                    count: torch.Tensor, target: list[torch.Tensor], *batch: torch.Tensor
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """One whole update as a pure function: gradient of :func:`td_loss`, one norm clip over all parameters
    (``clip_grad_norm_``'s scale) and an Adam step (``torch.optim.Adam``'s update); returns the new parameters,
    first and second moments, step count and the squared TD errors."""
    grads, squared = torch.func.grad(lambda ps: td_loss(ps, target, *batch), has_aux=True)(params)
    _, scale = clip_scale(grads, MAX_GRAD_NORM)
    count = count + 1
    (beta1, beta2), lr, eps = ADAM["betas"], ADAM["lr"], ADAM["eps"]
    step_size = lr / (1 - beta1 ** count)
    root_correction = torch.sqrt(1 - beta2 ** count)
    new_params, new_moments, new_squares = [], [], []
    for p, g, m, v in zip(params, grads, moments, squares, strict=True):
        p, m, v = adam_values(p, g * scale, m, v, step_size, root_correction, (beta1, beta2), eps)
        new_params.append(p)
        new_moments.append(m)
        new_squares.append(v)
    return new_params, new_moments, new_squares, count, squared


class Replay:
    """Every agent's full buffer as plain tensors and its priorities in marlkit's ``PriorityBlocks``."""

    def __init__(self, capacity: int, generator: torch.Generator, obs_bytes: bool = False):
        def per_agent(make: Callable[[], torch.Tensor]) -> list[torch.Tensor]:
            return [make() for _ in range(AGENTS)]

        self.capacity = capacity
        if obs_bytes:  # small counts, as pursuit observes them
            self.obs = per_agent(lambda: torch.randint(0, 3, (capacity, OBS), generator=generator, dtype=torch.uint8))
            self.next_obs = per_agent(lambda: torch.randint(0, 3, (capacity, OBS), generator=generator, dtype=torch.uint8))
        else:
            self.obs = per_agent(lambda: torch.rand(capacity, OBS, generator=generator))
            self.next_obs = per_agent(lambda: torch.rand(capacity, OBS, generator=generator))
        self.action = per_agent(lambda: torch.randint(0, ACTIONS, (capacity,), generator=generator))
        self.reward = per_agent(lambda: torch.randn(capacity, generator=generator))
        self.terminated = per_agent(lambda: torch.zeros(capacity, dtype=torch.bool))
        self.table = PriorityBlocks(AGENTS, capacity, 0.6)
        self.table.raw[:, :capacity] = torch.rand(AGENTS, capacity, generator=generator) + 0.01
        self.table.refresh()

    def draw(self) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Each agent's slots (``[agents, batch]``) and the minibatch as ``td_loss`` takes it."""
        index, weight = self.table.draw(list(range(AGENTS)), [self.capacity] * AGENTS, BATCH, 0.4)
        rows = index.unbind(0)
        stored = self.obs[0].dtype
        obs, next_obs = torch.empty(AGENTS, BATCH, OBS, dtype=stored), torch.empty(AGENTS, BATCH, OBS, dtype=stored)
        for i, row in enumerate(rows):  # agent-major observations, written in place as SharedReplay does
            torch.index_select(self.obs[i], 0, row, out=obs[i])
            torch.index_select(self.next_obs[i], 0, row, out=next_obs[i])

        def gathered(fields: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack([field.index_select(0, row) for field, row in zip(fields, rows, strict=True)])

        obs, next_obs = obs.float(), next_obs.float()  # no copy when stored as float
        return index, (obs, next_obs, gathered(self.action), gathered(self.reward), gathered(self.terminated), weight)

    def reprioritise(self, index: torch.Tensor, squared: torch.Tensor) -> None:
        """The drawn slots get priority |TD error| + eps, as ``SharedReplay.update_priority`` sets them."""
        self.table.set(index, td_priority(squared.sqrt(), 1e-6))


def timed(loss_fn, rounds_of: int, replay: Replay | None = None, whole_step: Callable | None = None) -> list[float]:
    """Milliseconds per update (median of 5 blocks of ``rounds_of // 5`` updates, after a warm-up); with
    ``replay`` also the medians of its parts: draw and gather, update, re-prioritise. With ``whole_step``
    (:func:`functional_step`, compiled or not) that function makes each update and ``loss_fn`` is unused."""
    g = torch.Generator().manual_seed(0)
    params = [p.requires_grad_() for p in initial_params(g)]
    target = [p.detach().clone() for p in params]
    data = (torch.rand(AGENTS, BATCH, OBS, generator=g), torch.rand(AGENTS, BATCH, OBS, generator=g),
            torch.randint(0, ACTIONS, (AGENTS, BATCH), generator=g), torch.randn(AGENTS, BATCH, generator=g),
            torch.zeros(AGENTS, BATCH, dtype=torch.bool), torch.rand(AGENTS, BATCH, generator=g))
    adam = torch.optim.Adam(params, lr=ADAM["lr"], betas=ADAM["betas"], eps=ADAM["eps"], fused=True)
    parts: list[tuple[float, float, float]] = []
    state = fresh_state(params)

    def step(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if whole_step is not None:
            *new_state, squared = whole_step(*state, target, *batch)
            state[:] = new_state
            return squared
        loss, squared = loss_fn(params, target, *batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        adam.step()
        adam.zero_grad(set_to_none=True)
        return squared

    def update() -> None:
        if replay is None:
            step(data)
            return
        start = time.perf_counter()
        index, batch = replay.draw()
        drawn = time.perf_counter()
        squared = step(batch)
        stepped = time.perf_counter()
        replay.reprioritise(index, squared)
        parts.append((drawn - start, stepped - drawn, time.perf_counter() - stepped))

    for _ in range(50):
        update()
    parts.clear()
    blocks = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(rounds_of // 5):
            update()
        blocks.append((time.perf_counter() - start) / (rounds_of // 5) * 1000)
    return [statistics.median(blocks), *(statistics.median(part) * 1000 for part in zip(*parts))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--updates", type=int, default=2000, help="timed updates per measurement")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-compile", action="store_true", help="eager only (no inductor compilation)")
    parser.add_argument("--whole-step", action="store_true",
                        help="also time the whole step (gradient, clip, Adam) compiled as one graph")
    parser.add_argument("--replay", action="store_true", help="draw, gather and re-prioritise around each update")
    parser.add_argument("--capacity", type=int, default=120_000, help="--replay: slots per agent's buffer (full)")
    parser.add_argument("--obs-bytes", action="store_true", help="--replay: observations stored as uint8")
    args = parser.parse_args()
    if args.rounds < 1 or args.updates < 5:
        raise SystemExit(f"--rounds must be >= 1 and --updates >= 5, got {args.rounds} and {args.updates}")
    if args.capacity < BATCH:
        raise SystemExit(f"--capacity must be at least the {BATCH} samples drawn per agent, got {args.capacity}")
    if args.whole_step and args.no_compile:
        raise SystemExit("--whole-step times a compiled step: drop --no-compile")
    if args.obs_bytes and not args.replay:
        raise SystemExit("--obs-bytes changes how the replay stores observations: add --replay")
    torch.set_num_threads(args.threads)
    replay = Replay(args.capacity, torch.Generator().manual_seed(1), args.obs_bytes) if args.replay else None
    variants: dict[str, tuple[Callable, Callable | None]] = {"eager": (td_loss, None)}
    if not args.no_compile:
        start = time.perf_counter()
        compiled = torch.compile(td_loss)
        timed(compiled, 5, replay)  # compiles forward and backward
        print(f"compiling took {time.perf_counter() - start:.1f} s", flush=True)
        variants["compiled"] = (compiled, None)
    if args.whole_step:
        start = time.perf_counter()
        compiled_step = torch.compile(functional_step)
        timed(td_loss, 5, replay, compiled_step)
        print(f"compiling the whole step took {time.perf_counter() - start:.1f} s", flush=True)
        variants["compiled step"] = (td_loss, compiled_step)
    results: dict[str, list[list[float]]] = {name: [] for name in variants}
    for round_ in range(args.rounds):
        for name, (fn, whole_step) in variants.items():
            results[name].append(timed(fn, args.updates, replay, whole_step))
            whole, *parts = results[name][-1]
            split = f" (draw and gather {parts[0]:.3f}, update {parts[1]:.3f}, re-prioritise {parts[2]:.3f})" if parts else ""
            print(f"round {round_}: {name} {whole:.3f} ms per update{split}", flush=True)
    what = "with draw, gather and re-prioritisation" if replay else "update only"
    what += ", observations stored as uint8" if args.obs_bytes else ""
    print(f"\n| variant | ms per update, {what} (each round, {args.threads} thread(s)) | median |"
          + (" draw and gather | update | re-prioritise |" if replay else ""))
    print("|---|---|---|" + ("---|---|---|" if replay else ""))
    for name, rounds in results.items():
        wholes = [r[0] for r in rounds]
        medians = "".join(f" {statistics.median(r[k] for r in rounds):.3f} |" for k in (1, 2, 3)) if replay else ""
        print(f"| {name} | {', '.join(f'{v:.3f}' for v in wholes)} | {statistics.median(wholes):.3f} |{medians}")


if __name__ == "__main__":
    main()
