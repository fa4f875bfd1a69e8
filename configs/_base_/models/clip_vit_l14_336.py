# CLIP ViT-L/14 at 336 px (hub: openai/clip-vit-large-patch14-336), LLaVA-1.5's
# vision tower: penultimate layer, patch features (CLS dropped), 576 tokens
# per image, images padded to a square.
vision_path = '{checkpoint_root}/clip-vit-large-patch14-336'
vision_tower = dict(type='HFVisionTower', pretrained='{vision_path}', feature_layer=-2,
                    feature_select='patch', torch_dtype='bfloat16')
image_processor = dict(type='HFImageProcessor', pretrained='{vision_path}')
pad_to_square = True
# What `tiny_standin=True` builds instead (dpa/engine/standin.py): a random
# tiny CLIP vision tower at 32 px.
vision_standin = dict(
    config=dict(model_type='clip_vision_model'),
    image_processor=dict(
        image_processor_type='CLIPImageProcessor',
        size=dict(shortest_edge=32),
        crop_size=dict(height=32, width=32)))
