"""Decoupled Proxy Alignment (DPA) for LLaVA-style multimodal LLMs.

Importing the package registers its models, datasets, hooks, loops and
schedulers with mmengine."""
import dpa.datasets  # noqa: F401
import dpa.engine  # noqa: F401
import dpa.models  # noqa: F401

__version__ = '0.1.0'
