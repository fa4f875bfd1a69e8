# SigLIP so400m/14 at 384 px (hub: google/siglip-so400m-patch14-384): no CLS
# token, so every patch feature is kept ('full'), 729 tokens per image, from
# the penultimate layer as in LLaVA-OneVision.
vision_path = '{checkpoint_root}/siglip-so400m-patch14-384'
vision_tower = dict(type='HFVisionTower', pretrained='{vision_path}', feature_layer=-2,
                    feature_select='full', torch_dtype='bfloat16')
image_processor = dict(type='HFImageProcessor', pretrained='{vision_path}')
pad_to_square = True
# What `tiny_standin=True` builds instead (dpa/engine/standin.py): a random
# tiny SigLIP vision tower at 32 px.
vision_standin = dict(
    config=dict(model_type='siglip_vision_model'),
    image_processor=dict(image_processor_type='SiglipImageProcessor',
                         size=dict(height=32, width=32)))
