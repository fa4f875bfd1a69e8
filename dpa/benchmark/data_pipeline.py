"""Data-pipeline throughput: can the loader feed the GPU?

    python tools/benchmark.py --data-pipeline configs/dpa_tiny.py
    python tools/benchmark.py --data-pipeline configs/dpa_qwen2_5_7b.py \\
        --cfg-options tiny_standin=True --real-images --workers 0 1 2

For each stage of a config and each worker count, the stage's own dataset and
collate function (the ones the pipeline builds: image decoding, padding to a
square, the image processor, tokenisation with the stage's template, packing)
run through a ``torch.utils.data.DataLoader`` at the recipe's per-device batch;
after one untimed batch (worker start-up), ``--batches`` batches are timed.
Reported: images/s, samples/s and tokens/s (image tokens included, padding not).

Beside them, the step time a GPU needs for that batch, *estimated* from FLOPs
(nothing is run on a GPU): ``flops = batch x tokens/sample x c x N`` for an LLM
of ``N`` parameters, ``c = 2`` (forward) + 2 (backward to the activations) + 2
(weight gradients, when the LLM trains) + 2 (recomputed forward, with gradient
checkpointing); plus the vision tower's forward (``2 x params x patches`` per
image) and, for CMO/CAL, the no-image forward over the text tokens. At
``--peak-tflops`` (H100 SXM, bf16 dense: 989) and ``--mfu`` (default 0.4, an
assumption) it gives seconds per step, hence the images/s one GPU consumes.
The verdict compares that with what the loader delivers on this machine
(*per training process*: each GPU has its own loader and workers).

``--real-images`` (with ``tiny_standin=True``): the stand-in's 32-pixel PNGs
become ``--source-size`` JPEGs and the image processor and image-token count
those of the config's real vision tower (336-pixel CLIP: 576 tokens), so the
decoding and preprocessing cost is the real one while nothing is loaded from
a checkpoint.
"""
import copy
import json
import os
import os.path as osp
import tempfile
import time
from functools import partial
from typing import Dict, List, Optional, Sequence

import numpy as np
from mmengine.config import Config
from PIL import Image
from torch.utils.data import DataLoader, SequentialSampler

from dpa.datasets.mixture import data_sources
from dpa.datasets.synthetic import make_synthetic_data
from dpa.engine.pipeline import prepare_synthetic_data
from dpa.engine.preflight import resolve_config
from dpa.engine.stage_config import STAGES, stage_collate_config, stage_dataset_config
from dpa.registry import DATASETS, FUNCTIONS

# Parameters of the checkpoints the model bases name (their model cards), by the
# directory name of `llm_path` / `vision_path`; --llm-params overrides.
LLM_PARAMS = {
    'Qwen2.5-1.5B-Instruct': 1.54e9, 'Qwen2.5-3B-Instruct': 3.09e9,
    'Qwen2.5-7B-Instruct': 7.62e9, 'Qwen2.5-14B-Instruct': 14.7e9,
    'Qwen2.5-32B-Instruct': 32.5e9, 'Llama-3.1-8B-Instruct': 8.03e9,
    'gemma-2-9b-it': 9.24e9, 'internlm2-chat-7b': 7.74e9,
}
# Vision towers: parameters, input resolution, patch size, features per image
# the LLM receives (CLS dropped for CLIP), token positions the tower runs.
VISION = {
    'clip-vit-large-patch14-336': dict(params=0.304e9, resolution=336, image_tokens=576,
                                       positions=577),
    'siglip-so400m-patch14-384': dict(params=0.428e9, resolution=384, image_tokens=729,
                                      positions=729),
}
H100_BF16_DENSE_TFLOPS = 989.0


def _checkpoint_name(path: Optional[str]) -> Optional[str]:
    return osp.basename(path.rstrip('/')) if isinstance(path, str) else None


def _real_processor(standin: dict, resolution: int) -> dict:
    """The stand-in's image processor config at the real tower's resolution."""
    processor = copy.deepcopy(dict(standin))
    if 'crop_size' in processor:  # CLIP: shortest edge, then centre crop
        processor.update(size=dict(shortest_edge=resolution),
                         crop_size=dict(height=resolution, width=resolution))
    else:  # SigLIP: resized to a square
        processor.update(size=dict(height=resolution, width=resolution))
    return dict(type='HFImageProcessor', config=processor)


def write_real_size_images(paths: Dict[str, str], out_dir: str, size: Sequence[int],
                           quality: int = 90) -> Dict[str, str]:
    """Copy the synthetic set with every image as a ``size`` JPEG (upscaled,
    with noise, so the file and its decoding cost look like a photo's).

    Returns:
        The copy's ``captions``, ``instructions`` and ``image_folder``.
    """
    folder = osp.join(out_dir, 'images')
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    out = dict(image_folder=folder)
    for key in ('captions', 'instructions'):
        with open(paths[key]) as f:
            rows = json.load(f) if paths[key].endswith('.json') else \
                [json.loads(line) for line in f if line.strip()]
        for row in rows:
            if row.get('image'):
                name = osp.splitext(row['image'])[0] + '.jpg'
                target = osp.join(folder, name)
                if not osp.exists(target):
                    image = Image.open(osp.join(paths['image_folder'], row['image']))
                    pixels = np.asarray(image.convert('RGB').resize(tuple(size), Image.BICUBIC),
                                        dtype=np.float32)
                    pixels += rng.normal(0, 12, pixels.shape)
                    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
                        target, quality=quality)
                row['image'] = name
        out[key] = osp.join(out_dir, osp.basename(paths[key]).replace('.jsonl', '.json'))
        with open(out[key], 'w') as f:
            json.dump(rows, f)
    return out


def _counting_collate(collate, samples):
    """The stage's collate, plus the real tokens (image tokens included) and
    images of the batch, counted where the batch is made (in the worker)."""
    tokens = sum(len(s['input_ids']) for s in samples)
    images = sum(s.get('pixel_values') is not None for s in samples)
    return collate(samples), tokens, images


def measure_loader(dataset, collate, batch_size: int, workers: int, batches: int) -> dict:
    """Throughput of ``batches`` batches through a DataLoader (after one
    untimed batch: worker start-up and the first prefetches)."""
    loader = DataLoader(dataset, batch_size=batch_size, sampler=SequentialSampler(dataset),
                        num_workers=workers, collate_fn=partial(_counting_collate, collate),
                        prefetch_factor=2 if workers else None, drop_last=True)
    if len(loader) < batches + 1:
        raise ValueError(f'{len(dataset)} samples give {len(loader)} batches of {batch_size}; '
                         f'{batches + 1} are needed')
    start = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    first = time.perf_counter() - start
    tokens = images = samples = 0
    start = time.perf_counter()
    for _ in range(batches):
        _, batch_tokens, batch_images = next(iterator)
        tokens, images, samples = tokens + batch_tokens, images + batch_images, \
            samples + batch_size
    seconds = time.perf_counter() - start
    del iterator
    return dict(workers=workers, first_batch_s=first, seconds=seconds, samples=samples,
                images=images, tokens=tokens, samples_per_s=samples / seconds,
                images_per_s=images / seconds, tokens_per_s=tokens / seconds)


def gpu_step_estimate(stage: str, batch_size: int, tokens_per_sample: float,
                      images_per_sample: float, image_tokens: int, llm_params: float,
                      vision: Optional[dict], checkpointing: bool, text_pass: bool,
                      peak_tflops: float, mfu: float) -> float:
    """Seconds of one training step of ``batch_size`` samples on one GPU
    (see the module docstring for the FLOP count)."""
    passes = 2 + 2 + (2 if stage == 'finetune' else 0) + (2 if checkpointing else 0)
    flops = passes * llm_params * tokens_per_sample
    if vision is not None and images_per_sample:
        flops += images_per_sample * 2 * vision['params'] * vision['positions']
        if text_pass:
            text_tokens = tokens_per_sample - images_per_sample * image_tokens
            flops += images_per_sample * 2 * llm_params * text_tokens
    return batch_size * flops / (peak_tflops * 1e12 * mfu)


def run_data_pipeline(config: str, options: Optional[dict] = None,
                      stages: Sequence[str] = STAGES, workers: Sequence[int] = (0, 1, 2),
                      batches: int = 8, real_images: bool = False,
                      source_size: Sequence[int] = (640, 480), llm_params: Optional[float] = None,
                      peak_tflops: float = H100_BF16_DENSE_TFLOPS, mfu: float = 0.4,
                      work_dir: Optional[str] = None) -> List[dict]:
    """Loader throughput per stage and worker count, and the GPU step estimate.

    Args:
        config: a pipeline config file.
        options: ``--cfg-options`` (e.g. ``tiny_standin=True``).
        stages: the stages to measure (those the config has).
        workers: worker counts to measure.
        batches: timed batches per measurement.
        real_images: real-size JPEGs and the real tower's processor under the
            tiny stand-in switch (see the module docstring).
        source_size: (width, height) of those JPEGs.
        llm_params: the LLM's parameters; default: :data:`LLM_PARAMS` by the
            config's ``llm_path``.
        peak_tflops, mfu: the GPU's peak and the assumed model FLOPs utilisation.
        work_dir: where the stand-in's data and the JPEG copy go (default: a
            temporary directory).

    Returns:
        One record per (stage, worker count).
    """
    original = Config.fromfile(config)
    if options:
        original.merge_from_dict(options)
    llm_name, vision_name = (_checkpoint_name(original.get('llm_path')),
                             _checkpoint_name(original.get('vision_path')))
    vision = VISION.get(vision_name)
    if real_images and not original.get('tiny_standin'):
        raise ValueError('--real-images replaces the stand-in images: add --cfg-options '
                         'tiny_standin=True')
    if real_images and vision is None:
        raise ValueError(f'--real-images: no resolution known for the vision tower '
                         f'{vision_name!r} (known: {sorted(VISION)})')
    work_dir = work_dir or tempfile.mkdtemp(prefix='dpa_data_pipeline_')
    # Enough rows for the timed batches of the largest per-device batch.
    rows = dict(num_captions=max(original[s].batch_size for s in stages if s in original)
                * (batches + 2))
    rows['num_instructions'] = rows['num_captions']
    if original.get('tiny_standin'):
        original.standin_data_root = osp.join(work_dir, 'standin_data')
        original.standin_data = rows
    elif original.get('synthetic_data'):
        original.synthetic_data.update(root=osp.join(work_dir, 'synthetic_data'), **rows)
    if original.get('work_dir') is None:
        original.work_dir = osp.join(work_dir, 'work')  # checked, never written
    cfg, _ = resolve_config(copy.deepcopy(original))
    prepare_synthetic_data(cfg)
    if real_images:
        copy_paths = write_real_size_images(make_synthetic_data(**cfg.synthetic_data),
                                            osp.join(work_dir, 'real_size'), source_size)
        for data_key, files in (('caption_data', 'captions'), ('instruct_data', 'instructions')):
            for source in data_sources(cfg[data_key]).values():
                source.update(data_files=[copy_paths[files]],
                              image_folder=copy_paths['image_folder'])
        cfg.image_processor = _real_processor(cfg.vision_standin.image_processor,
                                              vision['resolution'])
    params = llm_params or LLM_PARAMS.get(llm_name)
    records = []
    for stage in stages:
        if stage not in cfg:
            continue
        batch_size = original[stage].batch_size
        dataset_cfg = stage_dataset_config(cfg, stage)
        if real_images and stage != 'proxy':
            dataset_cfg['num_image_tokens'] = vision['image_tokens']
        dataset = DATASETS.build(dataset_cfg)
        collate_cfg = dict(stage_collate_config(cfg, stage))
        collate = partial(FUNCTIONS.get(collate_cfg.pop('type')), **collate_cfg)
        for count in workers:
            record = measure_loader(dataset, collate, batch_size, count, batches)
            record.update(config=osp.basename(config), stage=stage, batch_size=batch_size,
                          real_images=real_images)
            if params:
                loss = original[stage].loss.get('mode', 'vanilla')
                step = gpu_step_estimate(
                    stage, batch_size, record['tokens'] / record['samples'],
                    record['images'] / record['samples'], dataset_cfg.get('num_image_tokens', 0),
                    params, vision if stage != 'proxy' else None,
                    bool(original.model.get('gradient_checkpointing')),
                    loss in ('cmo', 'cal'), peak_tflops, mfu)
                record.update(gpu_step_s=step, gpu_samples_per_s=batch_size / step,
                              llm_params=params, peak_tflops=peak_tflops, mfu=mfu)
                # In-process loading (0 workers) runs between the steps, not beside them.
                record['serial_s'] = batch_size / record['samples_per_s'] if count == 0 else 0.0
                record['starves'] = (count == 0 or
                                     record['samples_per_s'] < record['gpu_samples_per_s'])
            records.append(record)
    return records


def verdict(record: dict) -> str:
    """Whether the loader of ``record`` would keep the GPU waiting."""
    if record['workers'] == 0:
        return (f"GPU waits {record['serial_s']:.2f} s per step "
                f"(+{record['serial_s'] / record['gpu_step_s']:.0%}): loading is in the step")
    margin = record['samples_per_s'] / record['gpu_samples_per_s']
    return f"**starves the GPU** ({margin:.2f}x)" if margin < 1 else f'keeps up ({margin:.1f}x)'


def data_pipeline_markdown(records: List[dict]) -> str:
    """The records as a markdown table."""
    lines = ['| config | stage | batch | workers | images/s | samples/s | tokens/s | '
             'first batch (s) | est. GPU step (s) | GPU needs samples/s | loader |',
             '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|']
    for r in records:
        gpu = (f"{r['gpu_step_s']:.2f} | {r['gpu_samples_per_s']:.1f} | " + verdict(r)
               if 'gpu_step_s' in r else 'n/a | n/a | no GPU estimate (tiny model)')
        lines.append(f"| {r['config']}{' (real-size images)' if r['real_images'] else ''} | "
                     f"{r['stage']} | {r['batch_size']} | {r['workers']} | "
                     f"{r['images_per_s']:.1f} | {r['samples_per_s']:.1f} | "
                     f"{r['tokens_per_s']:.0f} | {r['first_batch_s']:.2f} | {gpu} |")
    return '\n'.join(lines)
