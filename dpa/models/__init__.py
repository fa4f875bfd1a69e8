from dpa.models.builders import (PROCESSORS, HFCausalLM, HFImageProcessor, HFTokenizer,
                                 HFVisionModel, TinyTokenizer, num_image_tokens)
from dpa.models.chunked_loss import SplitCausalLM, chunked_target_scores
from dpa.models.losses import VisualRelevanceLoss, relevance_weights, target_scores
from dpa.models.mllm import LlavaDPAModel
from dpa.models.projector import LinearProjector, MLP2xGELUProjector
from dpa.models.proxy import ProxyLLMWrapper
from dpa.models.vision import HFVisionTower

__all__ = ['PROCESSORS', 'HFCausalLM', 'HFImageProcessor', 'HFTokenizer', 'HFVisionModel',
           'HFVisionTower', 'LinearProjector', 'LlavaDPAModel', 'MLP2xGELUProjector',
           'ProxyLLMWrapper', 'SplitCausalLM', 'TinyTokenizer', 'VisualRelevanceLoss',
           'chunked_target_scores', 'num_image_tokens', 'relevance_weights', 'target_scores']
