# TEMPORARY (replaced by the movedown branch)
from pathlib import Path

from safetensors.torch import load_file

from toolkit.models.encoder import SPEC_FILE, load_iem_weights, load_spec  # noqa: F401


def load_encoder_weights(encoder, folder: Path) -> None:
    encoder.backbone.load_state_dict(load_file(str(folder / "model.safetensors")))
    load_head_weights(encoder, folder)


def load_head_weights(encoder, folder: Path) -> None:
    pooling_file = folder / "1_Pooling" / "model.safetensors"
    if encoder.pooling.has_parameters and pooling_file.is_file():
        state = {k.removeprefix("pooling."): v for k, v in load_file(str(pooling_file)).items()}
        encoder.pooling.load_state_dict(state)
    spec = load_spec(folder / SPEC_FILE)
    if spec.iem_hidden:
        encoder.add_iem(spec.iem_hidden)
        load_iem_weights(encoder, folder)
