"""Connectors from vision features to the LLM's embedding space."""
from torch import nn

from dpa.registry import MODELS


@MODELS.register_module(name='mlp2x_gelu')
class MLP2xGELUProjector(nn.Module):
    """LLaVA-1.5's connector. Parameter names match transformers'
    ``LlavaMultiModalProjector`` so the weights export as they are."""

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, llm_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, features):
        return self.linear_2(self.act(self.linear_1(features)))


@MODELS.register_module(name='linear')
class LinearProjector(nn.Module):
    """LLaVA-1.0's connector: one linear layer."""

    def __init__(self, vision_dim: int, llm_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, llm_dim)

    def forward(self, features):
        return self.linear_1(features)
