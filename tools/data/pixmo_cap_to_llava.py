"""Convert PixMo-Cap (allenai/pixmo-cap) to LLaVA json, offline.

PixMo-Cap ships rows of (``image_url``, ``caption``); the images are
downloaded separately. Given the rows and a folder of downloaded images, this
writes the LLaVA caption json that ``configs/_base_/datasets/pixmo_cap.py``
reads. Nothing is fetched: rows whose image is not in the folder (or whose
caption is empty) are not converted, and every one of them is listed, with
the reason, in ``<output>.missing.jsonl`` and counted on stdout.

An image is found by the name the downloader gave it: ``url_sha256`` (the
default: the SHA-256 hex digest of the URL, any extension) or ``url_basename``
(the last path segment of the URL).

    python tools/data/pixmo_cap_to_llava.py ROWS IMAGE_FOLDER OUTPUT.json
        ROWS: .parquet (needs pyarrow), .jsonl or .json rows with image_url and caption
"""
import argparse
import hashlib
import json
import os
import os.path as osp
import posixpath
import sys
from typing import Dict, Iterator, List, Tuple
from urllib.parse import urlparse

CAPTION_PROMPT = '<image>\nDescribe this image in detail.'
NAMINGS = ('url_sha256', 'url_basename')


def read_rows(path: str) -> Iterator[dict]:
    """PixMo-Cap rows from a parquet, jsonl or json file."""
    if path.endswith('.parquet'):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            sys.exit('reading parquet needs pyarrow (pip install pyarrow); or export the rows '
                     'to jsonl first')
        for batch in pq.ParquetFile(path).iter_batches(columns=['image_url', 'caption']):
            yield from batch.to_pylist()
    elif path.endswith('.jsonl'):
        with open(path, encoding='utf-8') as f:
            yield from (json.loads(line) for line in f if line.strip())
    else:
        with open(path, encoding='utf-8') as f:
            yield from json.load(f)


def image_key(url: str, naming: str) -> str:
    if naming == 'url_sha256':
        return hashlib.sha256(url.encode('utf-8')).hexdigest()
    return posixpath.basename(urlparse(url).path)


def index_images(image_folder: str, naming: str) -> Dict[str, str]:
    """Downloaded image files by the key :func:`image_key` gives their URL,
    as paths relative to ``image_folder`` (subfolders included)."""
    index = {}
    for root, _, files in os.walk(image_folder):
        for name in files:
            relative = osp.relpath(osp.join(root, name), image_folder)
            key = osp.splitext(name)[0] if naming == 'url_sha256' else name
            index.setdefault(key, relative)
    return index


def convert(rows, image_folder: str, naming: str = 'url_sha256') -> Tuple[List[dict], List[dict]]:
    """LLaVA caption rows, and a record for every row left out.

    Args:
        rows: PixMo-Cap rows (``image_url``, ``caption``).
        image_folder: the downloaded images.
        naming: how the downloader named the images, one of ``NAMINGS``.
    """
    if naming not in NAMINGS:
        raise ValueError(f'naming must be one of {NAMINGS}, got {naming!r}')
    images = index_images(image_folder, naming)
    converted, missing = [], []
    for index, row in enumerate(rows):
        url, caption = row.get('image_url') or '', (row.get('caption') or '').strip()
        image = images.get(image_key(url, naming)) if url else None
        if image is None or osp.getsize(osp.join(image_folder, image)) == 0:
            reason = 'no image_url' if not url else (
                'image not downloaded' if image is None else 'empty image file')
            missing.append(dict(row=index, image_url=url, reason=reason))
            continue
        if not caption:
            missing.append(dict(row=index, image_url=url, reason='empty caption'))
            continue
        converted.append(dict(
            id=f'pixmo_cap_{index:07d}', image=image,
            conversations=[{'from': 'human', 'value': CAPTION_PROMPT},
                           {'from': 'gpt', 'value': caption}]))
    return converted, missing


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('rows', help='PixMo-Cap rows: .parquet, .jsonl or .json')
    parser.add_argument('image_folder', help='folder of the downloaded images')
    parser.add_argument('output', help='LLaVA json to write')
    parser.add_argument('--naming', choices=NAMINGS, default='url_sha256',
                        help='how the images were named when downloaded')
    args = parser.parse_args(argv)

    converted, missing = convert(read_rows(args.rows), args.image_folder, args.naming)
    with open(args.output, 'w', encoding='utf-8') as f:
        json.dump(converted, f, ensure_ascii=False)
    report = args.output + '.missing.jsonl'
    with open(report, 'w', encoding='utf-8') as f:
        f.writelines(json.dumps(record) + '\n' for record in missing)
    total = len(converted) + len(missing)
    print(f'{len(converted)} of {total} rows converted to {args.output}')
    if missing:
        reasons = {}
        for record in missing:
            reasons[record['reason']] = reasons.get(record['reason'], 0) + 1
        summary = ', '.join(f'{n} {reason}' for reason, n in sorted(reasons.items()))
        print(f'{len(missing)} rows left out ({summary}); listed in {report}')


if __name__ == '__main__':
    main()
