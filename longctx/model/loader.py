"""Load a model from a local HF checkpoint folder or a GGUF file. No network.

A folder needs ``config.json``, one or more ``*.safetensors`` (sharded
checkpoints through ``model.safetensors.index.json``) and ``tokenizer.json``.
A ``.gguf`` file carries everything (weights are dequantized at load).
Loading is strict: unknown keys, missing parameters and shape mismatches are
errors that name the tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from longctx.errors import CheckpointError
from longctx.model.config import ModelConfig
from longctx.model.decoder import CausalLM
from longctx.model.tokenizer import Tokenizer

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: CausalLM
    config: ModelConfig
    tokenizer: Tokenizer | None
    source: Path


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise CheckpointError(f"unknown dtype {name!r}; choose one of: fp32, bf16, fp16")
    return DTYPES[name]


def read_config(path: str | Path) -> tuple[ModelConfig, Path]:
    """Read only the architecture of a folder or GGUF file (cheap; used by ``longctx info``)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder; expected a Hugging Face checkpoint folder or a .gguf file")
    if p.is_dir():
        cfg_path = p / "config.json"
        if not cfg_path.exists():
            raise CheckpointError(f"{p}: no config.json; expected a Hugging Face checkpoint folder or a .gguf file")
        try:
            raw = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
        except OSError as e:
            raise CheckpointError(f"{cfg_path}: cannot be read ({e.strerror or e})") from None
        return ModelConfig.from_hf(raw, str(cfg_path)), p
    from longctx.model.gguf_loader import read_gguf_config  # noqa: PLC0415 - gguf is heavy to import

    return ModelConfig.from_hf(read_gguf_config(p), str(p)), p


def load_model(path: str | Path, device: str = "cpu", dtype: str | torch.dtype = "fp32") -> LoadedModel:
    """Load weights, config and tokenizer from ``path`` onto ``device`` in ``dtype``."""
    p = Path(path).expanduser()
    torch_dtype = parse_dtype(dtype)
    _check_device(device)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder; expected a Hugging Face checkpoint folder or a .gguf file")
    if p.is_dir():
        cfg, _ = read_config(p)
        state = _read_safetensors(p)
        tokenizer = Tokenizer.from_folder(p, cfg.eos_token_ids)
    else:
        from longctx.model.gguf_loader import load_gguf  # noqa: PLC0415

        ckpt = load_gguf(p)
        cfg = ModelConfig.from_hf(ckpt.config, str(p))
        state = ckpt.state_dict
        tokenizer = Tokenizer(ckpt.tokenizer, ckpt.tokenizer_config, ckpt.generation_config, cfg.eos_token_ids)
    with torch.device("meta"):
        model = CausalLM(cfg)
    _load_state(model, state, str(p), torch_dtype)
    model = model.to(device=device).eval()
    return LoadedModel(model=model, config=cfg, tokenizer=tokenizer, source=p)


def _check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError(f"device {device!r} requested but no CUDA GPU is available; use --device cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise CheckpointError(f"unknown device {device!r}; choose cpu or cuda[:N]")


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({folder / f for f in weight_map.values()})
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: invalid index file ({type(e).__name__}: {e})") from None
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weights found")
    root = folder.resolve()
    for f in files:
        if not f.resolve().is_relative_to(root):
            raise CheckpointError(f"{index}: weight file {str(f)!r} lies outside the model folder")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{f}: listed in the index but missing")
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    state[key] = sf.get_tensor(key)
        except Exception as e:  # safetensors raises SafetensorError / OSError on corrupt headers
            raise CheckpointError(f"{f}: corrupt or unreadable safetensors file ({e})") from None
    return state


def _load_state(model: CausalLM, state: dict[str, torch.Tensor], source: str, dtype: torch.dtype) -> None:
    params = dict(model.named_parameters())
    # Tied heads may be saved too; language-model-only views of multimodal checkpoints drop a prefix.
    state = {k.removeprefix("language_model."): v for k, v in state.items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    unknown = sorted(set(state) - set(params))
    unknown = [k for k in unknown if not k.endswith("rotary_emb.inv_freq")]
    if unknown:
        raise CheckpointError(f"{source}: unexpected tensors {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    missing = sorted(set(params) - set(state))
    if missing:
        raise CheckpointError(f"{source}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for name, param in params.items():
        t = state[name]
        if tuple(t.shape) != tuple(param.shape):
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(t.shape)}, expected {tuple(param.shape)}")
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(module, attr, torch.nn.Parameter(t.to(dtype), requires_grad=False))
