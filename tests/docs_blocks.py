"""The command blocks of README.md and docs/*.md, collected and run
(tests/test_docs.py).

Every ```bash block carries a marker on the line just before its fence:

    <!-- runs: tiny -->               run as written, on the tiny default
    <!-- runs: dry-run -->            tools/train.py runs with --dry-run (loads no model);
                                      the other tools' arguments are parsed
    <!-- runs: dry-run standin -->    the same, with --cfg-options tiny_standin=True
                                      (for configs whose checkpoints are not here)
    <!-- runs: parse -->              every tool's arguments are parsed by its own
                                      parser; the launchers run with PYTHON=echo
    <!-- runs: ci -->                 .ci/run runs the block verbatim (checked)
    <!-- runs: no: REASON -->         not run, for the reason given

A marker may name placeholder values, ``<!-- runs: dry-run CONFIG=configs/dpa_tiny.py -->``:
each whole word CONFIG of the block is replaced before it runs.

Blocks run in a scratch folder that holds the repository's ``configs``,
``tools`` and ``dpa`` (links); tests/test_docs.py first runs the README's
``python tools/train.py configs/dpa_tiny.py`` there, so ``work_dirs/dpa_tiny``
and ``data/dpa_tiny`` are what a user's first run leaves. Set-up segments
of a ``&&`` chain (``python3 -m venv``, ``. .venv/bin/activate``, ``pip
install``) are skipped: the environment running the test is the one they
build. ``python tools/X.py ARGS`` runs in this process (``main(ARGS)``: no
interpreter start, no second torch import); any other command runs in a
subprocess.
"""
import argparse
import contextlib
import io
import os
import os.path as osp
import re
import runpy
import shlex
import subprocess
import sys
import traceback
from dataclasses import dataclass, field

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
MODES = ('tiny', 'dry-run', 'parse', 'ci', 'no')
MARKER = re.compile(r'^<!--\s*runs:\s*(?P<body>.*?)\s*-->\s*$')
LAUNCHERS = ('tools/dist_train.sh', 'tools/slurm_train.sh')


@dataclass
class Block:
    path: str
    line: int  # 1-based line of the fence
    mode: str
    text: str
    values: dict = field(default_factory=dict)
    standin: bool = False
    reason: str = ''

    @property
    def where(self):
        return f'{osp.relpath(self.path, REPO)}:{self.line}'


class DocsError(Exception):
    """A marker or block the collector cannot accept."""


def parse_marker(body: str, where: str):
    """``tiny``, ``dry-run standin CONFIG=x``, ``no: reason`` -> (mode, values,
    standin, reason)."""
    if body.startswith('no'):
        reason = body[2:].lstrip(':').strip()
        if not reason:
            raise DocsError(f'{where}: "runs: no" needs a reason ("runs: no: REASON")')
        return 'no', {}, False, reason
    words = body.split()
    if not words or words[0] not in MODES:
        raise DocsError(f'{where}: unknown marker "runs: {body}" (modes: {", ".join(MODES)})')
    mode, values, standin = words[0], {}, False
    for word in words[1:]:
        if word == 'standin' and mode == 'dry-run':
            standin = True
        elif '=' in word:
            key, value = word.split('=', 1)
            values[key] = value
        else:
            raise DocsError(f'{where}: unknown word {word!r} in "runs: {body}"')
    return mode, values, standin, ''


def collect(path: str) -> list:
    """Every ```bash block of a Markdown file with its marker; an unmarked
    block, or a marker without a block, is an error."""
    lines = open(path, encoding='utf-8').read().split('\n')
    blocks, i, fence = [], 0, None
    while i < len(lines):
        line = lines[i]
        where = f'{osp.relpath(path, REPO)}:{i + 1}'
        if fence is None and line.startswith('```'):
            fence = line
            start = i
            i += 1
            body = []
            while i < len(lines) and not lines[i].startswith('```'):
                body.append(lines[i])
                i += 1
            if fence.strip() == '```bash':
                marker = MARKER.match(lines[start - 1]) if start else None
                if not marker:
                    raise DocsError(f'{where}: a ```bash block without a "<!-- runs: ... -->" '
                                    'marker on the line before it')
                mode, values, standin, reason = parse_marker(marker['body'], where)
                blocks.append(Block(path, start + 1, mode, '\n'.join(body), values, standin,
                                    reason))
            fence = None
        elif MARKER.match(line) and not (i + 1 < len(lines) and lines[i + 1].startswith('```bash')):
            raise DocsError(f'{where}: a "runs:" marker not followed by a ```bash block')
        i += 1
    return blocks


def commands(block: Block) -> list:
    """The block's commands: continuation lines joined, comments dropped,
    placeholders filled, ``&&`` chains split; each a list of words."""
    text = block.text.replace('\\\n', ' ')
    for key, value in block.values.items():
        text = re.sub(rf'\b{re.escape(key)}\b', value, text)
    result = []
    for line in text.split('\n'):
        words = shlex.split(line, comments=True)
        segment = []
        for word in words + ['&&']:
            if word == '&&':
                if segment:
                    result.append(segment)
                segment = []
            else:
                segment.append(word)
    return result


def is_setup(words: list) -> bool:
    """Environment set-up: skipped, the test runs in the environment it builds."""
    head = words[0]
    return (words[:3] == ['python3', '-m', 'venv'] or head in ('.', 'source')
            or osp.basename(head) == 'pip' or words[:3] == ['python', '-m', 'pip'])


def split_env(words: list):
    env = {}
    while words and re.match(r'^[A-Z_][A-Z0-9_]*=', words[0]):
        key, value = words[0].split('=', 1)
        env[key] = value
        words = words[1:]
    return env, words


class _Parsed(Exception):
    pass


@contextlib.contextmanager
def parse_only():
    """Stop every tool right after argparse accepted its arguments."""
    original = argparse.ArgumentParser.parse_args

    def parse(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    argparse.ArgumentParser.parse_args = parse
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original


@contextlib.contextmanager
def environment(cwd: str, env: dict):
    old_cwd, old_env, old_stdin, old_path = os.getcwd(), dict(os.environ), sys.stdin, sys.path[:]
    os.chdir(cwd)
    os.environ.update(env)
    sys.stdin = io.StringIO('')  # an interactive tool sees Ctrl-D at once
    try:
        yield
    finally:
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)
        sys.stdin = old_stdin
        sys.path[:] = old_path  # the tools put their folder's parent first


def run_tool(tool: str, argv: list, cwd: str, env=None, parse=False):
    """``python TOOL ARGV`` in this process: (exit code, output)."""
    out = io.StringIO()
    code = 0
    old_argv = sys.argv
    sys.argv = [tool] + list(argv)  # argparse names the tool in its messages
    with environment(cwd, env or {}), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(out):
        try:
            entry = runpy.run_path(tool, run_name='docs_test')['main']
            with parse_only() if parse else contextlib.nullcontext():
                result = entry(argv)
            code = result if isinstance(result, int) else 0
        except _Parsed:
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            if not isinstance(exit_.code, (int, type(None))):
                print(exit_.code, file=out)
        except Exception as err:  # noqa: BLE001 - a traceback is a failed command
            traceback.print_exc(file=out)
            code = f'{type(err).__name__}: {err}'
        finally:
            sys.argv = old_argv
    return code, out.getvalue()


def launcher_argv(words: list, cwd: str, env: dict):
    """Run a launcher script with PYTHON=echo (and a stub srun): its own
    checks run, nothing launches; returns (code, output, train.py args)."""
    stub = osp.join(cwd, '.stub_bin')
    os.makedirs(stub, exist_ok=True)
    srun = osp.join(stub, 'srun')
    with open(srun, 'w') as f:
        f.write('#!/bin/sh\necho "$@"\n')
    os.chmod(srun, 0o755)
    full_env = dict(os.environ, **env, PYTHON='echo', PATH=stub + os.pathsep + os.environ['PATH'])
    proc = subprocess.run(['bash'] + words, cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=60)
    output = proc.stdout + proc.stderr
    printed = shlex.split(proc.stdout.strip().split('\n')[-1]) if proc.stdout.strip() else []
    train = [i for i, w in enumerate(printed) if w.endswith('train.py')]
    return proc.returncode, output, (printed[train[0] + 1:] if train else None)


def with_dry_run(argv: list, standin: bool) -> list:
    argv = list(argv) + ['--dry-run']
    if standin:
        if '--cfg-options' in argv:
            argv.insert(argv.index('--cfg-options') + 1, 'tiny_standin=True')
        else:
            argv += ['--cfg-options', 'tiny_standin=True']
    return argv


def run_block(block: Block, cwd: str, timeout: int = 600) -> list:
    """Run a block's commands in ``cwd``: a list of (command, exit code,
    output, how); a code other than 0 is a failure."""
    results = []
    for words in commands(block):
        env, words = split_env(words)
        command = shlex.join(words)
        if not words or is_setup(words):
            continue
        if words[:3] == ['python', '-m', 'pytest']:
            results.append((command, 0, '', 'skipped: a test run'))
            continue
        if words[0] in ('python', 'python3') and len(words) > 1 and words[1].startswith('tools/'):
            tool, argv = words[1], words[2:]
            if block.mode == 'tiny':
                how = 'ran'
            elif block.mode == 'dry-run' and tool == 'tools/train.py':
                argv, how = with_dry_run(argv, block.standin), 'dry run'
            else:
                how = 'parsed'
            code, output = run_tool(tool, argv, cwd, env, parse=how == 'parsed')
            results.append((shlex.join(['python', tool] + argv), code, output, how))
        elif words[0] in LAUNCHERS:
            code, output, train_argv = launcher_argv(words, cwd, env)
            if code == 0 and train_argv is None:
                code, output = 'no train.py command printed', output
            results.append((command, code, output, 'launcher with PYTHON=echo'))
            if code == 0:
                parse = not (block.mode == 'dry-run')
                if not parse:
                    train_argv = with_dry_run([a for a in train_argv if a not in
                                               ('--launcher', 'pytorch', 'slurm')],
                                              block.standin)
                code, output = run_tool('tools/train.py', train_argv, cwd, parse=parse)
                results.append(('python tools/train.py ' + shlex.join(train_argv), code, output,
                                'parsed' if parse else 'dry run'))
        elif block.mode == 'tiny':
            argv = [sys.executable if words[0] in ('python', 'python3') else words[0]] + words[1:]
            proc = subprocess.run(argv, cwd=cwd, env=dict(os.environ, **env),
                                  capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
            results.append((command, proc.returncode, proc.stdout + proc.stderr, 'ran'))
        else:
            results.append((command, 0, '', f'skipped: not a tool, in a {block.mode} block'))
    return results


def scratch_folder(path: str):
    """The folder blocks run in, holding links to the repository's configs,
    tools and dpa."""
    os.makedirs(path, exist_ok=True)
    for name in ('configs', 'tools', 'dpa'):
        if not osp.exists(osp.join(path, name)):
            os.symlink(osp.join(REPO, name), osp.join(path, name))
    return path
