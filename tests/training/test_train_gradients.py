"""The training loss's gradients equal torch autograd's through transformers' DeepSeek models.

Each tiny transformers model is saved as the hub stores it, loaded into our model, and both compute
the mean next-token cross-entropy of the same tokens. Every one of our parameter gradients, mapped
to hub names through the one name map, must match torch's to 1e-4 (norm-relative, per tensor).
Torch keeps routed experts fused in memory (gate_up_proj [E,2F,D] = gate rows then up rows,
down_proj [E,D,F]); the test splits those gradients per expert, the way save_pretrained splits them.
"""

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from checkpoints import names
from checkpoints.state_dict import load_state_dict
from hf_models import save_tiny
from mla_jax.config import Config
from mla_jax.model import model_path
from mla_jax.training.config import TrainConfig
from mla_jax.training.step import Trainer

CASES = ["v2_lite_like", "v2_bias_tied_plain_rope", "v3_like_noaux_tc_yarn", "v3_no_interleave_no_q_lora"]


def _torch_grads(model, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Hub name -> gradient of the mean shifted cross-entropy, fused experts split per expert."""
    import torch

    ids = torch.as_tensor(tokens, dtype=torch.long)
    model.zero_grad()
    logits = model(ids).logits.float()
    v = logits.shape[-1]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1))
    loss.backward()
    out = {}
    for name, p in model.named_parameters():
        g = p.grad.detach().numpy()
        if name.endswith("experts.gate_up_proj"):
            prefix, f = name[: -len("gate_up_proj")], g.shape[1] // 2
            for e in range(g.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = g[e, :f]
                out[f"{prefix}{e}.up_proj.weight"] = g[e, f:]
        elif name.endswith("experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(g.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = g[e]
        else:
            out[name] = g
    return out


def _our_grads(config: Config, tensors: dict, tokens: np.ndarray) -> dict[str, np.ndarray]:
    model = load_state_dict(config, tensors)
    trainer = Trainer(model, TrainConfig(param_dtype="float32", bias_update_speed=0.0, seq_aux_alpha=0.0,
                                         expert_aux_alpha=0.0))
    b, t = tokens.shape
    mask = np.ones((b, t), bool)
    mask[:, -1] = False  # the last token has no target
    batch = {
        "tokens": tokens[None], "targets": np.roll(tokens, -1, axis=1)[None], "loss_mask": mask[None],
        "segment_ids": np.ones((1, b, t), np.int32), "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (1, b, t)),
    }
    grads, _ = trainer.gradients(trainer.init_state(), batch)
    grads = jax.device_get(grads)
    out = {}
    for entry in names.entries(config):
        if entry.path[-1] == "e_score_correction_bias":
            continue  # a buffer in torch, a RouterBias here: neither has a gradient
        path, layer = model_path(config, entry.path)  # the model stacks its layers
        g = np.asarray(grads[".".join(map(str, path))])
        g = g if layer is None else g[layer]
        out[entry.hf] = names.to_hub(entry, g if entry.expert is None else g[entry.expert])
    return out


@pytest.mark.parametrize("name", CASES)
def test_cross_entropy_gradients_match_torch_autograd(name, tmp_path):
    torch_model = save_tiny(name, tmp_path, seed=1)
    config = Config.from_hf(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tokens = np.random.default_rng(7).integers(0, config.vocab_size, size=(2, 16)).astype(np.int32)
    theirs = _torch_grads(torch_model, tokens)
    with jax.default_matmul_precision("highest"):  # float32 matmuls on accelerators too
        ours = _our_grads(config, tensors, tokens)
    errors = {k: float(np.linalg.norm(ours[k] - theirs[k]) / max(np.linalg.norm(theirs[k]), 1e-30)) for k in ours}
    worst = max(errors, key=errors.get)
    assert set(ours) == set(theirs) and errors[worst] <= 1e-4, f"{worst}: relative error {errors[worst]:.2e}"
