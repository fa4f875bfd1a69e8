"""tools/data/pixmo_cap_to_llava.py: PixMo-Cap rows + downloaded images ->
LLaVA json, with every row left out reported."""
import hashlib
import json
import os.path as osp
import subprocess
import sys

import pytest
from PIL import Image

import dpa  # noqa: F401
from dpa.datasets.llava import LLaVADataset

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONVERTER = osp.join(REPO, 'tools', 'data', 'pixmo_cap_to_llava.py')
URL = 'https://images.example.org/photos/{}.jpg'


def sha(url):
    return hashlib.sha256(url.encode()).hexdigest()


@pytest.fixture
def pixmo(tmp_path):
    """Five rows: two downloaded (one in a subfolder), one never downloaded,
    one empty file, one without a caption."""
    images = tmp_path / 'images'
    (images / 'part1').mkdir(parents=True)
    rows = [dict(image_url=URL.format(i), caption=f'A photo number {i}.') for i in range(5)]
    rows[4]['caption'] = '  '
    Image.new('RGB', (20, 10), 'red').save(images / f'{sha(rows[0]["image_url"])}.jpg')
    Image.new('RGB', (20, 10), 'blue').save(images / 'part1' / f'{sha(rows[1]["image_url"])}.png')
    (images / f'{sha(rows[3]["image_url"])}.jpg').write_bytes(b'')
    Image.new('RGB', (20, 10), 'green').save(images / f'{sha(rows[4]["image_url"])}.jpg')
    path = tmp_path / 'pixmo_cap.jsonl'
    path.write_text('\n'.join(json.dumps(row) for row in rows))
    return path, images, rows


def run(*args):
    return subprocess.run([sys.executable, CONVERTER, *map(str, args)], capture_output=True,
                          text=True, check=True)


def test_converts_downloaded_rows_and_reports_the_rest(pixmo, tmp_path):
    rows_path, images, rows = pixmo
    output = tmp_path / 'pixmo_cap_llava.json'
    result = run(rows_path, images, output)
    converted = json.loads(output.read_text())
    assert [row['id'] for row in converted] == ['pixmo_cap_0000000', 'pixmo_cap_0000001']
    assert converted[0]['image'] == f'{sha(rows[0]["image_url"])}.jpg'
    assert converted[1]['image'] == osp.join('part1', f'{sha(rows[1]["image_url"])}.png')
    assert converted[1]['conversations'] == [
        {'from': 'human', 'value': '<image>\nDescribe this image in detail.'},
        {'from': 'gpt', 'value': 'A photo number 1.'}]

    missing = [json.loads(line) for line in
               (tmp_path / 'pixmo_cap_llava.json.missing.jsonl').read_text().splitlines()]
    assert missing == [
        dict(row=2, image_url=URL.format(2), reason='image not downloaded'),
        dict(row=3, image_url=URL.format(3), reason='empty image file'),
        dict(row=4, image_url=URL.format(4), reason='empty caption')]
    assert '2 of 5 rows converted' in result.stdout
    assert ('3 rows left out (1 empty caption, 1 empty image file, 1 image not downloaded)'
            in result.stdout)

    # The output is what the PixMo-Cap dataset config reads.
    dataset = LLaVADataset(data_files=[str(output)], image_folder=str(images), template='plain',
                           tokenizer=dict(type='TinyTokenizer'),
                           image_processor=dict(type='HFImageProcessor', config=dict(
                               image_processor_type='CLIPImageProcessor',
                               size=dict(shortest_edge=32), crop_size=dict(height=32, width=32))),
                           num_image_tokens=16)
    assert len(dataset) == 2
    assert dataset.prepare_data(1)['pixel_values'].shape == (3, 32, 32)


def test_images_named_by_url_basename(tmp_path):
    images = tmp_path / 'images'
    images.mkdir()
    Image.new('RGB', (8, 8), 'red').save(images / '0.jpg')
    rows = tmp_path / 'rows.json'
    rows.write_text(json.dumps([dict(image_url=URL.format(0), caption='A red square.'),
                                dict(image_url=URL.format(1), caption='Gone.')]))
    output = tmp_path / 'out.json'
    result = run(rows, images, output, '--naming', 'url_basename')
    assert [row['image'] for row in json.loads(output.read_text())] == ['0.jpg']
    assert '1 rows left out (1 image not downloaded)' in result.stdout
