"""`device: auto | cpu | cuda`: resolved per rank, refused in one line where it cannot be honoured.

On this CPU machine: auto and cpu train on the CPU with the same losses; device=cuda is refused by
the training rank (never by `plan` / `submit`, which run on machines without GPUs) before any weight
is read; every engine accepts device=cuda (megatron-core refuses device=cpu where CUDA is). CUDA itself is
checked by bench/gpu_check.sh when a GPU is lent.
"""

from __future__ import annotations

import pytest
import torch
import yaml

from launchers.cli import main
from tests.helpers import losses, run_config
from toolkit.config import ConfigError, config_from_dict, to_dict
from toolkit.distributed.device import resolve_device, resolve_megatron_device
from toolkit.train import run_recipe

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without CUDA")


def test_resolution_without_cuda():
    assert resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"^device=cuda: CUDA is not available here \(torch 2\.13\.0\+cpu: "
                                          r"this torch is a CPU build\); set device: auto or cpu"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match=r"^teacher\.device: must be one of auto, cpu, cuda, got 'gpu'"):
        resolve_device("gpu", field="teacher.device")


def _recipe(tmp_path, model_dir, **top) -> dict:
    cfg = to_dict(run_config(tmp_path, model_dir))
    cfg["stages"] = cfg["stages"][:1]
    cfg["stages"][0]["steps"] = 2
    cfg.update(top)
    return cfg


def test_cpu_and_auto_train_the_same_steps(tmp_path, tiny_llama_dir):
    runs = {}
    for device in ("auto", "cpu"):
        cfg = _recipe(tmp_path, tiny_llama_dir, device=device, output_dir=str(tmp_path / device))
        run_recipe(config_from_dict(cfg))
        runs[device] = losses(tmp_path / device)
    assert runs["auto"] == runs["cpu"] and len(runs["cpu"]) == 2


def test_train_refuses_cuda_in_one_line_before_reading_weights(tmp_path, tiny_llama_dir, capsys):
    path = tmp_path / "cuda.yaml"
    path.write_text(yaml.safe_dump(_recipe(tmp_path, tiny_llama_dir, device="cuda")))
    assert main(["plan", str(path), "--gpus", "1"]) == 0  # planning a GPU run needs no GPU here
    capsys.readouterr()
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "device=cuda: CUDA is not available here" in err and "\n" not in err


def test_every_engine_plans_cuda_and_megatron_refuses_the_cpu_where_cuda_is(tmp_path, tiny_llama_dir, capsys,
                                                                              monkeypatch):
    """hf, deepspeed and megatron all train on CUDA (bench/gpu_check.sh runs each there): a CUDA recipe
    plans on this machine for each; megatron-core's CPU path exists only without CUDA, so on a CUDA
    machine device=cpu is refused in one line (the CUDA check is emulated: this machine has none)."""
    for engine in ("hf", "deepspeed", "megatron"):
        cfg = _recipe(tmp_path, tiny_llama_dir, device="cuda", engine=engine)
        cfg["stages"][0]["objective"]["mntp"]["mask_token"] = "eos"
        path = tmp_path / f"{engine}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        assert main(["plan", str(path), "--gpus", "1"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert resolve_megatron_device("auto") == torch.device("cpu")  # no CUDA here: the shimmed CPU path
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match=r"^teacher --device=cpu: megatron-core runs on the GPUs when CUDA is "
                                          r"present .*; set teacher --device: auto$"):
        resolve_megatron_device("cpu", field="teacher --device")