# Cambrian-737K (hub dataset nyu-visionx/Cambrian-10M, jsons/Cambrian737k.jsonl):
# the instruction data of stage 3, rows with and without an image.
# Local layout: {data_root}/Cambrian-10M/jsons/Cambrian737k.jsonl, image paths
# relative to {data_root}/Cambrian-10M/.
instruct_data = dict(
    type='LLaVAMixture',
    sources=dict(
        cambrian_737k=dict(
            data_files=['{data_root}/Cambrian-10M/jsons/Cambrian737k.jsonl'],
            image_folder='{data_root}/Cambrian-10M',
            ratio=1.0)),
    seed=0)
