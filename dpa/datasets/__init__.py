from dpa.datasets.llava import BadSampleError, LLaVADataset, dpa_collate, read_rows
from dpa.datasets.mixture import LLaVAMixture, data_sources
from dpa.datasets.packing import pack_rows, packed_collate
from dpa.datasets.samplers import ModalityLengthGroupedSampler, padding_fraction
from dpa.datasets.synthetic import make_synthetic_data

__all__ = ['BadSampleError', 'LLaVADataset', 'LLaVAMixture', 'ModalityLengthGroupedSampler',
           'data_sources', 'dpa_collate', 'make_synthetic_data', 'pack_rows', 'packed_collate',
           'padding_fraction', 'read_rows']
