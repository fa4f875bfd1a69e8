"""Decoupled Proxy Alignment (DPA) for LLaVA-style multimodal LLMs.

Importing the package registers its models, datasets, hooks, loops,
schedulers and pipeline stages with mmengine's registries (the layers and
what each may import: docs/architecture.md)."""
import dpa.datasets  # noqa: F401
import dpa.engine  # noqa: F401
import dpa.evaluation  # noqa: F401
import dpa.models  # noqa: F401

__version__ = '0.1.0'
