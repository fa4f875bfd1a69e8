from dpa.datasets.llava import BadSampleError, LLaVADataset, dpa_collate, read_rows
from dpa.datasets.synthetic import make_synthetic_data

__all__ = ['BadSampleError', 'LLaVADataset', 'dpa_collate', 'make_synthetic_data', 'read_rows']
