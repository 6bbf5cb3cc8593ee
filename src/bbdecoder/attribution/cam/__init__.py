"""The CAM family over one template (:class:`BaseCAM`): a method is one small file."""

from bbdecoder.attribution.cam.ablationcam import AblationCAM
from bbdecoder.attribution.cam.base import BaseCAM, CAMContext, LayerRecord
from bbdecoder.attribution.cam.eigencam import EigenCAM
from bbdecoder.attribution.cam.gradcam_plusplus import GradCAMPlusPlus
from bbdecoder.attribution.cam.hirescam import HiResCAM
from bbdecoder.attribution.cam.layercam import LayerCAM
from bbdecoder.attribution.cam.reshape import channels_last, tokens
from bbdecoder.attribution.cam.scorecam import ScoreCAM
from bbdecoder.attribution.cam.xgradcam import XGradCAM

__all__ = [
    "AblationCAM",
    "BaseCAM",
    "CAMContext",
    "EigenCAM",
    "GradCAMPlusPlus",
    "HiResCAM",
    "LayerCAM",
    "LayerRecord",
    "ScoreCAM",
    "XGradCAM",
    "channels_last",
    "tokens",
]
