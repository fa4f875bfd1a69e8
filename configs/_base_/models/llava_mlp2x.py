# LLaVA-1.5 connector; the no-image pass of CMO/CAL drops the image tokens.
model = dict(
    type='LlavaDPAModel',
    projector=dict(type='mlp2x_gelu'),
    text_pass='removed',
    gradient_checkpointing=False)
