"""Resumable training state in one safetensors file, written atomically.

Tensors: the model's state dict (``model.*``), the optimizer's per-parameter state (``optim.<i>.*``)
and the CPU random generator (``rng.torch``). Everything else (step, epoch, position, log, optimizer
hyper-parameters) is JSON in the file's metadata. One file means the model and the optimizer can never
come from different steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file

from stillroom import atomic


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as standalone tensors (safetensors refuses tensors that share storage, e.g. tied weights)."""
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}


def save(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    tensors = {f"model.{k}": v for k, v in _weights(model).items()}
    opt = optimizer.state_dict()
    for index, per_param in opt["state"].items():
        for name, value in per_param.items():
            tensors[f"optim.{index}.{name}"] = torch.as_tensor(value).detach().cpu().clone().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"state": json.dumps(state), "param_groups": json.dumps(opt["param_groups"])}
    with atomic.atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model, optimizer and random generator in place; returns the saved JSON state."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    per_param: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": json.loads(meta["param_groups"])})
    torch.set_rng_state(tensors["rng.torch"])
    return json.loads(meta["state"])


def save_weights(path: Path, model: torch.nn.Module) -> None:
    with atomic.atomic_path(path) as tmp:
        save_file(_weights(model), str(tmp))


def load_weights(path: Path, model: torch.nn.Module) -> None:
    model.load_state_dict(load_file(str(path)))
