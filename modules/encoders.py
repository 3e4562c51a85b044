"""What every module factory starts from: specs per group, observation encoders and the agent MLP.

Observations of any shape work: vectors go straight to a ``MultiAgentMLP``, images (``H x W x C`` with
``C <= 4``, as in pistonball or pursuit) go through a ``MultiAgentConvNet`` first, anything else is
flattened.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tensordict import TensorDictBase
from torch import nn
from torchrl.data import TensorSpec
from torchrl.envs import EnvBase
from torchrl.modules import MultiAgentConvNet, MultiAgentMLP

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
}


def activation_class(name: str) -> type[nn.Module]:
    """The ``nn.Module`` class for an activation name, or ``ValueError`` listing the accepted ones."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r} is not supported; accepted: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def group_spec(env: EnvBase, group: str, key: str) -> TensorSpec:
    """The spec of ``(group, key)`` without the env's batch dims: shape ``[n_agents, *feature]``."""
    if key == "action":
        spec = env.full_action_spec[group, key]
    else:
        spec = env.full_observation_spec[group, key]
    for _ in env.batch_size:
        spec = spec[0]
    return spec


def action_indices(action: torch.Tensor) -> torch.Tensor:
    """Discrete actions as indices ``[*B, n_agents]``, whether the env gives indices or one-hot vectors."""
    if action.dtype.is_floating_point or action.dtype == torch.bool:
        return action.argmax(-1)
    return action.long()


def _is_image(shape: torch.Size) -> bool:
    return len(shape) == 3 and shape[-1] <= 4 and shape[0] > 4 and shape[1] > 4


class _ImageToChannelsFirst(nn.Module):
    """``[*B, n_agents, H, W, C]`` (any dtype) -> ``[*B, n_agents, C, H, W]`` floats (uint8 / 255)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.movedim(-1, -3).float() * self.scale


class _FlattenFeatures(nn.Module):
    """Flattens everything after the agent dim: ``[*B, n_agents, a, b]`` -> ``[*B, n_agents, a*b]``."""

    def __init__(self, feature_dims: int):
        super().__init__()
        self.feature_dims = feature_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(-self.feature_dims).float()


def make_encoder(
    obs_spec: TensorSpec, n_agents: int, *, share_params: bool, device: torch.device | str = "cpu",
    flatten_images: bool = False,
) -> tuple[nn.Module, int]:
    """Per-agent feature extractor for observations of ``obs_spec`` (shape ``[n_agents, *obs]``).

    Returns the module and its per-agent output size. Images get a ``MultiAgentConvNet`` (strided
    Atari-style layers for large frames, 3x3 convolutions for small local views) unless
    ``flatten_images``, which feeds them to the MLP flat (small local views, as the SUPER paper's MLP).
    """
    shape = obs_spec.shape[1:]
    if len(shape) == 1:
        return nn.Identity(), shape[0]
    if _is_image(shape) and not flatten_images:
        height, width, channels = shape
        scale = 1.0 / 255.0 if obs_spec.dtype == torch.uint8 else 1.0
        if min(height, width) >= 36:
            conv_kwargs = dict(num_cells=[32, 64, 64], kernel_sizes=[8, 4, 3], strides=[4, 2, 1])
        else:
            conv_kwargs = dict(num_cells=[32, 32], kernel_sizes=3, strides=1)
        conv = MultiAgentConvNet(
            n_agents=n_agents,
            centralized=False,
            share_params=share_params,
            in_features=channels,
            activation_class=nn.ReLU,
            device=device,
            **conv_kwargs,
        )
        encoder = nn.Sequential(_ImageToChannelsFirst(scale), conv)
        with torch.no_grad():
            probe = torch.zeros(1, n_agents, height, width, channels, device=device)
            out_features = encoder(probe).shape[-1]
        return encoder, out_features
    encoder = _FlattenFeatures(len(shape))
    return encoder, int(torch.Size(shape).numel())


def _observation_encoder(
    env: EnvBase, group: str, share_params: bool, device: torch.device | str | None, flatten_images: bool = False
) -> tuple[torch.device | str, int, nn.Module, int]:
    """What every factory starts from: the device, the group's agent count and its encoder."""
    device = env.device if device is None else device
    obs_spec = group_spec(env, group, "observation")
    n_agents = obs_spec.shape[0]
    encoder, features = make_encoder(obs_spec, n_agents, share_params=share_params, device=device,
                                     flatten_images=flatten_images)
    return device, n_agents, encoder, features


class AgentMLP(MultiAgentMLP):
    """TorchRL's ``MultiAgentMLP``, with the same parameters and state dict, whose forward without
    parameter sharing runs each layer for all agents as one batched matmul instead of a ``torch.vmap``
    over a functional call: the vmap re-binds every agent's parameters to a module at each call, which
    was half the cost of a SUPER update's Q-learning loss (8 agents, 32 samples).

    The results match the vmapped forward's bit for bit (tested, outputs and gradients). Shared
    parameters, lazy (uninitialised) layers, layers other than ``Linear`` and parameter-free
    activations, and export fall back to TorchRL's forward.
    """

    _layers: list[tuple[str, nn.Module]] | None = None

    def _batched_layers(self) -> list[tuple[str, nn.Module]] | None:
        if self._layers is None and not self.share_params and self.initialized:
            layers = list(self._empty_net.named_children())
            if all(isinstance(m, nn.Linear) or not any(True for _ in m.parameters()) for _, m in layers):
                self._layers = layers
        return self._layers

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        layers = self._batched_layers()
        if layers is None or torch.compiler.is_exporting():
            return super().forward(*inputs)
        return self.forward_with(self.params, *inputs)

    def takes_params(self) -> bool:
        """Whether :meth:`forward_with` can run this network (the batched layout)."""
        return self._batched_layers() is not None

    def forward_with(self, params: TensorDictBase, *inputs: torch.Tensor) -> torch.Tensor:
        """The forward pass with ``params`` (a TensorDict shaped as ``self.params``, e.g. a target
        network's copy) in place of the module's own, without swapping them in: the same operations
        as :meth:`forward`, so the same result as ``params.to_module(self)`` then ``self(*inputs)``."""
        layers = self._batched_layers()
        if layers is None:
            raise RuntimeError("forward_with needs the batched layout (see takes_params)")
        x = torch.cat(inputs, -1) if len(inputs) > 1 else inputs[0]
        if x.shape[-2] != self.n_agents:
            return super().forward(x)  # TorchRL's message for the wrong agent count
        if self.centralized:  # every agent's network reads all agents' inputs
            x = x.flatten(-2).unsqueeze(-2).expand(*x.shape[:-2], self.n_agents, -1)
        batch = x.shape[:-2]
        h = x.movedim(-2, 0).reshape(self.n_agents, -1, x.shape[-1])  # [agents, samples, features]
        for name, module in layers:
            if isinstance(module, nn.Linear):
                weight, bias = params[name, "weight"], params.get((name, "bias"))
                h = torch.bmm(h, weight.transpose(1, 2))  # then the bias, as vmap's linear does (bit for bit)
                if bias is not None:
                    h = h + bias.unsqueeze(1)
            else:
                h = module(h)
        return h.reshape(self.n_agents, *batch, h.shape[-1]).movedim(0, -2)


def reads_agents_first(values: nn.Module) -> bool:
    """Whether the per-agent network ``values`` (an encoder, then the MLP, ...) only reshapes its
    observations before :class:`AgentMLP`'s batched matmuls, which move the agent dim first: then
    observations handed over agent-major (a ``[B, n_agents, ...]`` view of ``[n_agents, B, ...]``) need no
    copy there and give the same numbers. A conv encoder would see other strides and may round differently."""
    layers = list(values) if isinstance(values, nn.Sequential) else []
    return (len(layers) >= 2 and isinstance(layers[0], (nn.Identity, _FlattenFeatures))
            and isinstance(layers[1], AgentMLP) and layers[1].takes_params() and not layers[1].centralized)


def _mlp(
    in_features: int,
    out_features: int,
    n_agents: int,
    *,
    centralised: bool,
    share_params: bool,
    num_cells: Sequence[int],
    activation: str,
    device: torch.device | str,
) -> MultiAgentMLP:
    return AgentMLP(
        n_agent_inputs=in_features,
        n_agent_outputs=out_features,
        n_agents=n_agents,
        centralized=centralised,
        share_params=share_params,
        num_cells=list(num_cells),
        activation_class=activation_class(activation),
        device=device,
    )
