"""Data: sources (annotation files, TFDS, ArrayRecord), BLIP-2 transforms, grain pipelines.

    from blip2_jax import data
    src = data.AnnotationSource.from_file("train.jsonl", images_dir="/data/images")
    loader = data.make_train_loader(src, global_batch_size=256, image_size=224, tokenizer=tok, seed=0)

See pipeline.py for the batch layout, the skip counter ("num_skipped") and resuming; input_shards.py
and capfilt_shards.py for CapFilt's input (img2dataset tars, annotation files, ArrayRecord) and output.
"""
from blip2_jax.data.annotations import expand_captions, read_annotations, validate_annotations
from blip2_jax.data.capfilt_shards import CapfiltOutput
from blip2_jax.data.input_shards import InputShard, Sample, list_input_shards, shards_for_process
from blip2_jax.data.pipeline import (
                                     SKIPPED,
                                     caption_text,
                                     eval_num_batches,
                                     make_eval_loader,
                                     make_tokenize_fn,
                                     make_train_loader,
)
from blip2_jax.data.sources import (
                                     AnnotationSource,
                                     ArrayRecordSource,
                                     TfdsSource,
                                     deserialize_record,
                                     serialize_record,
                                     shard_paths,
)
from blip2_jax.data.transforms import (
                                     decode_image,
                                     pre_caption,
                                     pre_question,
                                     random_resized_crop_params,
                                     train_image_transform,
)

__all__ = [
    "SKIPPED", "caption_text", "eval_num_batches", "make_eval_loader", "make_tokenize_fn", "make_train_loader",
    "AnnotationSource", "ArrayRecordSource", "TfdsSource", "deserialize_record", "expand_captions",
    "read_annotations", "serialize_record", "shard_paths", "validate_annotations", "decode_image", "pre_caption", "pre_question",
    "random_resized_crop_params", "train_image_transform", "CapfiltOutput", "InputShard", "Sample",
    "list_input_shards", "shards_for_process",
]
