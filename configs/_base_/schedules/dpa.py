# The three DPA stages with the paper's recipe (one file per stage).
_base_ = ['proxy.py', 'align.py', 'finetune.py']
stages = ['proxy', 'align', 'finetune']
