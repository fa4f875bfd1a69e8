"""Step time and peak memory of DPA training: vanilla CE, CAL and CMO as this
toolkit computes them, beside CMO computed the reference implementation's way
(``python tools/benchmark.py --help``; the variants and shapes are described
in ``dpa/benchmark/cli.py``).

    python tools/benchmark.py                      # the default run (CPU, < 10 minutes)
    python tools/benchmark.py --json bench.json    # also write the records as JSON
"""
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from dpa.benchmark.cli import main  # noqa: E402

if __name__ == '__main__':
    main()
