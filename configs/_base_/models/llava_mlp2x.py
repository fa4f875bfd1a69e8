# LLaVA-1.5 connector; the no-image pass of CMO/CAL drops the image tokens.
model = dict(
    type='LlavaDPAModel',
    projector=dict(type='mlp2x_gelu'),
    text_pass='removed',
    gradient_checkpointing=False,
    # The loss applies the LM head to the supervised positions only, this many
    # at a time: no (batch x length x vocab) logits. None: the LLM's own forward.
    loss_chunk_size=512)
