"""SonicMotionBucketPredict: audio + reference image -> per-frame motion buckets (type SONIC_MOTION)."""

from __future__ import annotations

from . import runtime
from .runtime import core

PREDICT = core("config").BUCKET_PREDICT  # fixed-bucket value meaning "use the prediction"
LIMIT_OF = {"head_motion_scale": "motion_scale", "expression_scale": "motion_scale",
            "fixed_head_bucket": "fixed_bucket", "fixed_expression_bucket": "fixed_bucket"}


def _range(name: str) -> dict:
    """default, min and max of a widget from config.LIMITS."""
    limit = core("config").LIMITS[name]
    return {"default": limit.default, "min": limit.lo, "max": limit.hi}


class SonicMotionBucketPredict:
    DESCRIPTION = (
        "Predicts Sonic's two motion buckets for every video frame from the audio and the "
        "reference image (audio2bucket): head movement and facial expression, "
        "bucket = raw * 16 + 16 (about 0..128). The scales multiply them (official "
        "dynamic_scale multiplies both: 0.5 mild, 1.0 normal, 2.0 intense); a fixed value "
        "replaces a prediction for every frame."
    )
    CATEGORY = "Sonic"
    SEARCH_ALIASES = runtime.search_aliases("motion bucket", "head motion", "expression", "动作幅度")
    # inputs whose official value is right for almost everyone: hidden until the user asks
    ADVANCED_INPUTS = ("fixed_head_bucket", "fixed_expression_bucket")
    FUNCTION = "predict"
    RETURN_TYPES = ("SONIC_MOTION",)
    RETURN_NAMES = ("sonic_motion",)
    OUTPUT_TOOLTIPS = ("Per-frame motion buckets (head, expression) for the Sonic Sampler.",)

    @classmethod
    def INPUT_TYPES(cls):
        cfg = core("config")
        return runtime.advanced({
            "required": {
                "sonic_model": (
                    "SONIC_MODEL",
                    {"tooltip": "From Sonic Model Loader (audio2bucket is used)."},
                ),
                "sonic_audio": ("SONIC_AUDIO", {"tooltip": "From Whisper Audio Encode."}),
                "clip_vision": (
                    "CLIP_VISION",
                    {
                        "tooltip": "SVD-xt image encoder (CLIP ViT-H/14), e.g. from "
                        "the svd_xt checkpoint or SVD VAE + Image Encoder Loader."
                    },
                ),
                "image": (
                    "IMAGE",
                    {
                        "tooltip": "The reference portrait, the same image the sampler gets "
                        "(first of a batch)."
                    },
                ),
                "head_motion_scale": (
                    "FLOAT",
                    {
                        **_range("motion_scale"),
                        "step": 0.05,
                        "tooltip": (
                            "Multiplies the head-movement bucket (official dynamic_scale; "
                            "1.0 = as predicted)."
                        ),
                    },
                ),
                "expression_scale": (
                    "FLOAT",
                    {
                        **_range("motion_scale"),
                        "step": 0.05,
                        "tooltip": (
                            "Multiplies the expression bucket (official dynamic_scale; 1.0 = as predicted)."
                        ),
                    },
                ),
            },
            "optional": {
                "min_resolution": (
                    "INT",
                    {
                        **_range("min_resolution"),
                        "step": cfg.SIZE_MULTIPLE,
                        "tooltip": (
                            "Working short side for the image embedding; keep it equal to the sampler's "
                            "min_resolution (official: the embedding of the working-size image)."
                        ),
                    },
                ),
                "fixed_head_bucket": (
                    "FLOAT",
                    {
                        **_range("fixed_bucket"),
                        "step": 1.0,
                        "tooltip": (
                            "-1 = predict. Otherwise this head-movement bucket is used for every frame as is "
                            "(the scale does not apply)."
                        ),
                    },
                ),
                "fixed_expression_bucket": (
                    "FLOAT",
                    {
                        **_range("fixed_bucket"),
                        "step": 1.0,
                        "tooltip": (
                            "-1 = predict. Otherwise this expression bucket is used for every frame as is "
                            "(the scale does not apply)."
                        ),
                    },
                ),
            },
        }, cls.ADVANCED_INPUTS)

    def predict(
        self,
        sonic_model,
        sonic_audio,
        clip_vision,
        image,
        head_motion_scale=1.0,
        expression_scale=1.0,
        min_resolution=512,
        fixed_head_bucket=PREDICT,
        fixed_expression_bucket=PREDICT,
    ):
        if not hasattr(sonic_audio, "bucket_windows"):
            raise ValueError(f"sonic_audio is a {type(sonic_audio).__name__}; connect Whisper Audio Encode")
        n = core("config").check_inputs(dict(  # NaN, inf and out of range (linked inputs too), before loading
            head_motion_scale=head_motion_scale, expression_scale=expression_scale, min_resolution=min_resolution,
            fixed_head_bucket=fixed_head_bucket, fixed_expression_bucket=fixed_expression_bucket), LIMIT_OF)
        head_motion_scale, expression_scale = n["head_motion_scale"], n["expression_scale"]
        min_resolution = n["min_resolution"]
        fixed_head_bucket, fixed_expression_bucket = n["fixed_head_bucket"], n["fixed_expression_bucket"]
        motion = core("motion")
        embeds = motion.reference_embeds(clip_vision, image, int(min_resolution))  # [1, D]
        progress = runtime.Progress(1, "Motion bucket predict")
        result = motion.predict_motion(
            sonic_model.load("audio2bucket"),
            sonic_audio,
            embeds,
            float(head_motion_scale),
            float(expression_scale),
            fixed_head=None if fixed_head_bucket < 0 else float(fixed_head_bucket),
            fixed_expression=None if fixed_expression_bucket < 0 else float(fixed_expression_bucket),
            callback=progress.callback(),
        )
        return (result,)


NODE_CLASS_MAPPINGS = {"SonicMotionBucketPredict": SonicMotionBucketPredict}
NODE_DISPLAY_NAME_MAPPINGS = {"SonicMotionBucketPredict": "Motion Bucket Predict"}
