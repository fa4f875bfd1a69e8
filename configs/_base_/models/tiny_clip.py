# A random tiny CLIP vision tower. A real one is a local checkpoint directory:
#   vision_tower = dict(type='HFVisionTower', pretrained='/ckpt/clip-vit-large-patch14-336')
#   image_processor = dict(type='HFImageProcessor', pretrained='/ckpt/clip-vit-large-patch14-336')
vision_tower = dict(
    type='HFVisionTower',
    config=dict(
        model_type='clip_vision_model',
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8),
    feature_layer=-2,
    feature_select='patch',
    torch_dtype='float32')
image_processor = dict(
    type='HFImageProcessor',
    config=dict(
        image_processor_type='CLIPImageProcessor',
        size=dict(shortest_edge=32),
        crop_size=dict(height=32, width=32)))
pad_to_square = True
