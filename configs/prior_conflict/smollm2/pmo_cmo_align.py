# Ablation: DPA with CMO in the align stage only (the proxy, then a plain
# instruction-tuning loss): where does CMO change DPA against PMO alone?
_base_ = './dpa.py'
finetune = dict(loss=dict(mode='vanilla'))
