# Ablation: DPA with CMO in the finetune stage only (align against the proxy
# with a plain loss, then CMO in instruction tuning).
_base_ = './dpa.py'
align = dict(loss=dict(mode='vanilla'))
