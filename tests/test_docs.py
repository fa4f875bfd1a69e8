"""The README and docs/ as a user meets them: every command block marked
runnable runs (tests/docs_blocks.py says how blocks are marked and run), every
relative link and anchor resolves, and each tool's documented option table
equals what its ``--help`` prints.

The runnable blocks share one scratch folder: the README's main command
(``python tools/train.py configs/dpa_tiny.py``) trains the tiny default there,
and the other blocks score, chat with and analyse that model, and reuse its
work dir; ``test_tiny_summary_numbers`` compares the summary printed in
docs/getting_started.md with that run, within the tolerance the page states.
"""
import argparse
import glob
import json
import os.path as osp
import re
import runpy
import time

import pytest

from docs_blocks import (REPO, Block, DocsError, collect, commands, run_block,
                         scratch_folder)

pytestmark = pytest.mark.usefixtures('one_thread')

PAGES = [osp.join(REPO, 'README.md')] + sorted(glob.glob(osp.join(REPO, 'docs', '*.md')))


def all_blocks():
    blocks, errors = [], []
    for page in PAGES:
        try:
            blocks += collect(page)
        except DocsError as err:
            errors.append(str(err))
    return blocks, errors


BLOCKS, COLLECT_ERRORS = all_blocks()
RUNNABLE = [b for b in BLOCKS if b.mode in ('tiny', 'dry-run', 'parse')]


def test_every_command_block_is_marked():
    assert not COLLECT_ERRORS, '\n'.join(COLLECT_ERRORS)
    assert RUNNABLE, 'no runnable blocks found'


@pytest.fixture(scope='module')
def scratch(tmp_path_factory):
    """The folder the blocks run in. The README's tiny command runs first, a
    real run of the tiny default there (a copy of conftest's ``finished`` run
    would not do: its manifests record its own data paths, and the command
    rightly refuses such stages as stale); the blocks after it use the work
    dir it leaves."""
    path = scratch_folder(str(tmp_path_factory.mktemp('docs')))
    first = [b for b in BLOCKS if b.mode == 'tiny' and b.path.endswith('README.md')
             and 'tools/train.py configs/dpa_tiny.py' in b.text][0]
    results = run_block(first, path)
    assert results and all(code == 0 for _, code, _, _ in results), results
    return path


@pytest.mark.parametrize('block', RUNNABLE, ids=[f'{osp.relpath(b.path, REPO)}:{b.line}'
                                                  for b in RUNNABLE])
def test_documented_block_runs(block, scratch):
    start = time.process_time()
    results = run_block(block, scratch)
    failed = [r for r in results if r[1] != 0]
    report = '\n'.join(f'[{how}] exit {code}: {cmd}' for cmd, code, _, how in results)
    assert results, f'{block.where}: nothing to run in a "{block.mode}" block'
    assert not failed, (f'{block.where} ({block.mode}):\n{report}\n\n'
                        + '\n\n'.join(f'$ {cmd}\n{out[-3000:]}' for cmd, _, out, _ in failed))
    print(f'{block.where}: {time.process_time() - start:.1f} s CPU\n{report}')


def test_tiny_summary_numbers(scratch):
    """The tiny default's summary in docs/getting_started.md against the run
    of the README's command: iterations exactly, losses within 0.02 and the CMO
    weight mean within 0.005 (float arithmetic moves with torch's version,
    the CPU and the thread count; the page says so)."""
    text = open(osp.join(REPO, 'docs', 'getting_started.md'), encoding='utf-8').read()
    shown = re.findall(r'^  (\w+) +trained: (\d+) iterations, loss ([\d.]+) -> ([\d.]+)\n'
                       r' +CMO weight mean ([\d.]+)', text, flags=re.M)
    assert shown, 'no stage summary found in docs/getting_started.md'
    for stage, iterations, first, last, w_mean in shown:
        m = json.load(open(osp.join(scratch, 'work_dirs', 'dpa_tiny', stage, 'manifest.json')))
        measured = (m['iterations'], m['first_loss'], m['last_loss'], m['cmo']['w_mean'])
        assert int(iterations) == m['iterations'], (stage, measured)
        assert abs(float(first) - m['first_loss']) <= 0.02, (stage, measured)
        assert abs(float(last) - m['last_loss']) <= 0.02, (stage, measured)
        assert abs(float(w_mean) - m['cmo']['w_mean']) <= 0.005, (stage, measured)


def test_ci_blocks_are_what_ci_runs():
    """A block marked ``ci`` is a line of .ci/run, verbatim."""
    ci = open(osp.join(REPO, '.ci', 'run')).read().split('\n')
    marked = [b for b in BLOCKS if b.mode == 'ci']
    assert len(marked) >= 2  # the test command and the lmms-eval environment
    for block in marked:
        assert block.text.strip() in ci, f'{block.where}: not a line of .ci/run'


def test_readme_is_a_front_page():
    """The README stays a front page (issue 33: at most ~250 lines; the manual
    is docs/), and the real-weights demo is one block between its markers."""
    text = open(osp.join(REPO, 'README.md'), encoding='utf-8').read()
    assert len(text.split('\n')) <= 250
    assert text.count('<!-- demo:start -->') == 1 and text.count('<!-- demo:end -->') == 1
    assert text.index('<!-- demo:start -->') < text.index('<!-- demo:end -->')


# ------------------------------------------------------------ the runner itself

def planted(tmp_path, marker, body):
    page = tmp_path / 'page.md'
    page.write_text(f'# A page\n\n{marker}\n```bash\n{body}\n```\n')
    return str(page)


def test_a_broken_command_fails_its_block(tmp_path, scratch):
    """The runner reports a failure for a command broken on purpose: an option
    a tool does not have, a config that does not exist, a command that exits 1."""
    broken = [('<!-- runs: parse -->',
               'python tools/train.py configs/dpa_tiny.py --no-such-option'),
              ('<!-- runs: dry-run -->', 'python tools/train.py configs/no_such_config.py'),
              ('<!-- runs: tiny -->', 'python -c "import sys; sys.exit(1)"'),
              ('<!-- runs: tiny -->',
               'python tools/eval.py work_dirs/dpa_tiny --data data/dpa_tiny/no_such.jsonl'),
              ('<!-- runs: parse -->', 'tools/dist_train.sh configs/dpa_tiny.py 0')]
    for marker, body in broken:
        (block,) = collect(planted(tmp_path, marker, body))
        results = run_block(block, scratch)
        assert results and any(code != 0 for _, code, _, _ in results), (body, results)
    good = collect(planted(tmp_path, '<!-- runs: dry-run CONFIG=configs/dpa_tiny.py -->',
                           'python tools/train.py CONFIG --stage align  # a comment'))
    assert [r[1] for r in run_block(good[0], scratch)] == [0]


def test_collector_rules(tmp_path):
    with pytest.raises(DocsError, match='without a'):
        collect(planted(tmp_path, '', 'python tools/train.py configs/dpa_tiny.py'))
    with pytest.raises(DocsError, match='needs a reason'):
        collect(planted(tmp_path, '<!-- runs: no -->', 'ls'))
    with pytest.raises(DocsError, match='unknown marker'):
        collect(planted(tmp_path, '<!-- runs: sometimes -->', 'ls'))
    page = tmp_path / 'marker.md'
    page.write_text('<!-- runs: tiny -->\n\n```bash\nls\n```\n')
    with pytest.raises(DocsError, match='not followed'):
        collect(str(page))
    block = Block('x', 1, 'tiny', 'python3 -m venv .venv && . .venv/bin/activate && pip install '
                  "-e '.[x]' && A=1 python tools/train.py X \\\n    --stage align  # c",
                  values={'X': 'configs/dpa_tiny.py'})
    assert commands(block)[-1] == ['A=1', 'python', 'tools/train.py', 'configs/dpa_tiny.py',
                                   '--stage', 'align']


def test_setup_segments_are_skipped_and_pytest_not_run(tmp_path):
    block = Block('x', 1, 'tiny', 'python3 -m venv .venv && . .venv/bin/activate && '
                  'pip install torch && python -m pytest tests -q')
    results = run_block(block, str(tmp_path))
    assert [r[3] for r in results] == ['skipped: a test run']


# ------------------------------------------------------------ links and anchors

def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r'<[^>]+>', '', heading.strip().lower())
    text = re.sub(r'[^\w\- ]', '', text)
    return text.replace(' ', '-')


def without_fences(path: str) -> str:
    return re.sub(r'^```.*?^```', '', open(path, encoding='utf-8').read(), flags=re.S | re.M)


def prose(path: str) -> str:
    """A page without its fenced code blocks and inline code."""
    return re.sub(r'`[^`\n]*`', '', without_fences(path))


def anchors(path: str) -> set:
    found, seen = set(), {}
    for heading in re.findall(r'^#{1,6} (.+)$', without_fences(path), flags=re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f'{base}-{n}')
    found.update(re.findall(r'<a (?:id|name)="([^"]+)"', open(path, encoding='utf-8').read()))
    return found


def broken_links(path: str) -> list:
    broken = []
    for target in re.findall(r'\]\(([^)\s]+)(?:\s+"[^"]*")?\)', prose(path)):
        if re.match(r'^[a-z]+:', target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition('#')
        dest = osp.normpath(osp.join(osp.dirname(path), file_part)) if file_part else path
        if not osp.exists(dest):
            broken.append(f'{target}: no {osp.relpath(dest, REPO)}')
        elif anchor and dest.endswith('.md') and anchor not in anchors(dest):
            broken.append(f'{target}: no heading #{anchor} in {osp.relpath(dest, REPO)}')
    return broken


@pytest.mark.parametrize('page', PAGES, ids=[osp.relpath(p, REPO) for p in PAGES])
def test_links_resolve(page):
    assert not broken_links(page)


def test_link_checker_finds_broken_links(tmp_path):
    (tmp_path / 'other.md').write_text('# Other page\n\n## Its `second` heading: yes\n'
                                       '```\n# not a heading\n```\n')
    page = tmp_path / 'page.md'
    page.write_text('# Page\n[a](other.md) [b](other.md#its-second-heading-yes) [c](#page) '
                    '[d](https://example.com/x)\n[e](missing.md) [f](other.md#not-a-heading) '
                    '[g](#nowhere)\n`[h](inline-code.md)`\n')
    rel = lambda name: osp.relpath(str(tmp_path / name), REPO)  # noqa: E731
    assert broken_links(str(page)) == [
        f'missing.md: no {rel("missing.md")}',
        f'other.md#not-a-heading: no heading #not-a-heading in {rel("other.md")}',
        f'#nowhere: no heading #nowhere in {rel("page.md")}']


# ------------------------------------------------------------ option tables

TOOLS = sorted(glob.glob(osp.join(REPO, 'tools', '*.py'))
               + glob.glob(osp.join(REPO, 'tools', 'data', '*.py')))
OPTIONS_MARKER = re.compile(r'^<!-- options: (\S+) -->$', re.M)


class _Grab(Exception):
    pass


def parser_options(tool: str) -> set:
    """The option strings ``TOOL --help`` prints (``-h``/``--help`` aside)."""
    original = argparse.ArgumentParser.parse_args

    def grab(self, args=None, namespace=None):
        raise _Grab(self)

    argparse.ArgumentParser.parse_args = grab
    try:
        namespace = runpy.run_path(tool, run_name='docs_test')
        entry = namespace.get('parse_args') or namespace['main']
        entry([])
    except _Grab as got:
        parser = got.args[0]
    finally:
        argparse.ArgumentParser.parse_args = original
    return {s for a in parser._actions for s in a.option_strings} - {'-h', '--help'}


def documented_options(text: str) -> dict:
    """``<!-- options: tools/X.py -->`` then a Markdown table: the ``--options``
    of its first column, per tool."""
    tables = {}
    for match in OPTIONS_MARKER.finditer(text):
        rows = []
        for line in text[match.end():].lstrip('\n').split('\n'):
            if not line.startswith('|'):
                break
            rows.append(line.split('|')[1])
        tables[match.group(1)] = {o for cell in rows[2:]
                                  for o in re.findall(r'(?<![\w-])(--?[a-z][\w-]*)', cell)}
    return tables


def docs_options() -> dict:
    tables = {}
    for page in PAGES:
        for tool, options in documented_options(open(page, encoding='utf-8').read()).items():
            assert tool not in tables, f'{tool}: two option tables'
            tables[tool] = (osp.relpath(page, REPO), options)
    return tables


@pytest.mark.parametrize('tool', TOOLS, ids=[osp.relpath(t, REPO) for t in TOOLS])
def test_option_tables_match_help(tool):
    name = osp.relpath(tool, REPO)
    tables = docs_options()
    assert name in tables, f'no "<!-- options: {name} -->" table in README.md or docs/'
    page, documented = tables[name]
    printed = parser_options(tool)
    assert printed - documented == set(), f'{page}: options of {name} not documented'
    assert documented - printed == set(), f'{page}: documented options {name} does not have'


def test_option_table_reader():
    text = ('<!-- options: tools/x.py -->\n| option | what |\n|---|---|\n'
            '| `--a N` | one, not `--z` |\n| `--b`, `--no-b` | two |\n| `config` | file |\n\nafter')
    assert documented_options(text) == {'tools/x.py': {'--a', '--b', '--no-b'}}
